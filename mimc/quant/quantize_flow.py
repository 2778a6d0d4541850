"""MODEL argument -> calibrated int8/fp8 graph: what ``mimc quantize`` does, as one function.

Resolves the model (an fp32 mimc ONNX file, an artifact directory - exported first when it has no
``model.onnx`` - or any MODEL ``mimc.load`` accepts), checks every input before anything is
written, splits the images into a calibration set and a disjoint held-out set, quantizes, and
records the result in the artifact's ``mimc.json`` under ``files[<graph name>]``.

Quantization changes the graph, not the weights in ``model.safetensors``, so it is recorded with
the graph file (with a StageRecord-shaped ``stage`` entry) rather than appended to ``stages``,
which describe the weights.
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from mimc.artifact import MANIFEST_NAME, StageRecord, is_artifact, read_manifest, write_json
from mimc.errors import BadInputError, ConfigError, DataError
from mimc.graph import encoder_config_of_graph
from mimc.quant.quantize import QuantizeConfig, quantize_onnx

EVAL_IMAGES = 32  # held-out images for the fidelity gate (never used for calibration)


def target_for_device(device: str, precision: str) -> str:
    """A device profile name or YAML path -> the graph target; refuses precisions it lacks."""
    from mimc.latency.devices import load_profile

    profile = load_profile(device)
    if precision not in profile.precisions:
        raise ConfigError(f"device '{profile.name}' does not support {precision} (it has {', '.join(profile.precisions)}): "
                          f"pick another --device or precision")
    return "cpu" if profile.backend == "onnxruntime-cpu" else "tensorrt"


def check_model_inputs_file(spec: str, cfg) -> None:
    """An .npy/.npz of normalised model inputs (negative values) must have the model's exact shape.

    mimc.data treats float arrays as images and would resize them; model inputs of the wrong size or
    channel count would then be silently resampled instead of refused.
    """
    path = Path(spec)
    if path.suffix not in (".npy", ".npz") or not path.is_file():
        return
    try:
        loaded = np.load(path, allow_pickle=False, mmap_mode="r") if path.suffix == ".npy" else np.load(path, allow_pickle=False)
        arr = loaded if path.suffix == ".npy" else (loaded["images"] if "images" in loaded else None)
    except (ValueError, OSError):
        return  # mimc.data reports unreadable files with its own message
    if arr is None or arr.dtype.kind != "f" or arr.size == 0:
        return
    expected = tuple(cfg.input_shape)
    if float(np.min(arr[: min(len(arr), 8)])) < 0 and tuple(arr.shape[1:]) != expected:
        raise DataError(f"{path} holds model inputs of shape {tuple(arr.shape[1:])} but the model expects {expected}: "
                        "save inputs for this model or raw images (uint8) to be resized")


def split_images(images, n: int, seed: int):
    """(calibration subset, held-out subset), disjoint and seeded; held-out may be None for tiny sets."""
    total = len(images)
    order = np.random.default_rng(seed).permutation(total)
    # A full held-out set when there are enough images, else a quarter of them (calibration keeps the rest).
    n_eval = min(EVAL_IMAGES, max(total - n, total // 4))
    held, rest = order[:n_eval], order[n_eval:]
    calib = np.sort(rest[:n])
    return images.subset(calib), (images.subset(np.sort(held)) if n_eval else None)


def resolve_graph(model: str, precision: str, output: Path | None):
    """(input graph or None, encoder or None, encoder config, output path, artifact dir to record in)."""
    path = Path(model)
    suffix = ".fp8.onnx" if precision == "fp8" else ".int8.onnx"
    if path.suffix == ".onnx":
        if not path.is_file():
            raise BadInputError(f"ONNX file {path} does not exist: export one with `mimc export MODEL`")
        cfg = encoder_config_of_graph(path)
        stem = path.name[: -len(".onnx")]
        return path, None, cfg, output or path.with_name(f"{stem}{suffix}")
    if is_artifact(path):
        from mimc.models.vit import EncoderConfig

        cfg = EncoderConfig.from_dict(read_manifest(path).encoder)
        graph = path / "model.onnx"
        return (graph if graph.is_file() else None), None, cfg, output or path / f"model{suffix}"
    from mimc.models.resolve import load_model

    encoder = load_model(model)
    if output is None:
        from mimc.models.resolve import model_slug  # the shared default-name rule

        # Like `mimc export`: a new artifact ./<model>-mimc holding the weights, model.onnx and the
        # quantized graph, so `mimc eval` / `mimc profile` know its input spec.
        output = Path(f"{model_slug(model)}-mimc") / f"model{suffix}"
    return None, encoder, encoder.config, output


def quantize_model(model: str, config: QuantizeConfig, calib: str | None, output: str | Path | None = None,
                   seed: int = 0, force: bool = False, batch_size: int = 16) -> dict[str, Any]:
    from mimc.data import load_images

    if calib is None:
        raise DataError("quantization needs calibration images: pass --calib DIR (a folder, .npz/.npy or 'builtin')")
    graph, encoder, cfg, out = resolve_graph(model, config.precision, Path(output) if output is not None else None)
    new_artifact = encoder is not None and output is None
    if out.suffix != ".onnx":
        raise BadInputError(f"output {out} must end in .onnx: choose a path like model.int8.onnx")
    if new_artifact:
        if out.parent.exists() and (not out.parent.is_dir() or any(out.parent.iterdir())):
            raise BadInputError(f"output {out.parent} already exists and is not empty: choose another -o, or run `mimc quantize {out.parent}`")
    elif not out.parent.is_dir():
        raise BadInputError(f"output folder {out.parent} does not exist: create it or choose another output path")
    check_model_inputs_file(calib, cfg)
    images = load_images(calib, cfg, n=config.n + EVAL_IMAGES, seed=seed)
    calib_set, held_out = split_images(images, config.n, seed)
    held_batches = held_out.batches(batch_size) if held_out is not None else None
    if new_artifact:
        report = _quantize_into_new_artifact(encoder, out, calib, calib_set, held_out, config, force, batch_size)
    else:
        with tempfile.TemporaryDirectory(prefix=".mimc-quantize.") as tmp_dir:
            if graph is None:
                graph = _export_fp32(model, encoder, Path(tmp_dir))
            report = quantize_onnx(graph, out, calib_set.batches(batch_size), config, held_batches, force=force)
        _annotate(report, calib_set, held_out, calib)
        if is_artifact(out.parent):
            _record(out, report)
    return report


def _annotate(report: dict[str, Any], calib_set, held_out, calib: str) -> None:
    report["calibration_sha256"] = calib_set.sha256  # ImageSet's hash (the same bytes quantize_onnx hashed)
    report["calibration_source"] = str(calib)
    report["held_out_images"] = len(held_out) if held_out is not None else 0


def _quantize_into_new_artifact(encoder, out: Path, calib: str, calib_set, held_out, config, force: bool, batch_size: int):
    """Weights, model.onnx and the quantized graph in a temp dir that becomes ``out.parent`` only on success."""
    from mimc.artifact import atomic_dir, save_artifact
    from mimc.deploy.onnx import export_onnx

    with atomic_dir(out.parent) as tmp:
        save_artifact(encoder, tmp, overwrite=True)
        export_onnx(encoder, tmp / "model.onnx")
        held_batches = held_out.batches(batch_size) if held_out is not None else None
        report = quantize_onnx(tmp / "model.onnx", tmp / out.name, calib_set.batches(batch_size), config, held_batches, force=force)
        report["path"] = str(out)
        _annotate(report, calib_set, held_out, calib)
        _record(tmp / out.name, report)
    return report


def _export_fp32(model: str, encoder, tmp: Path) -> Path:
    """An artifact without model.onnx gets one (recorded in its mimc.json); other sources export to tmp."""
    from mimc.deploy.onnx import export_onnx
    from mimc.models.io import load_artifact

    if encoder is None:  # an artifact directory without model.onnx
        target = Path(model) / "model.onnx"
        export_onnx(load_artifact(model), target)
        return target
    target = tmp / "model.onnx"
    export_onnx(encoder, target)
    return target


def _record(out: Path, report: dict[str, Any]) -> None:
    manifest = read_manifest(out.parent)
    metrics = {"validation": report["validation"], "calibration_sha256": report["calibration_sha256"],
               "calibration_images": report["calibration_images"], "target": report["target"],
               "fused_attention_blocks": report["fused_attention_blocks"]}
    stage = StageRecord(name="quantize", config=report["config"], config_version=report["config_version"],
                        metrics=metrics, seconds=report["seconds"], parent_hash=report["source"]["sha256"])
    entry = {k: v for k, v in report.items() if k != "path"}
    entry["stage"] = asdict(stage)
    manifest.files[out.name] = entry
    write_json(out.parent / MANIFEST_NAME, manifest.to_dict())


__all__ = ["quantize_model", "target_for_device", "split_images", "check_model_inputs_file", "EVAL_IMAGES"]
