"""The graph stages: export, quantize, build, profile, eval — each a handler over one :class:`GraphContext`.

A graph stage reads the in-memory state the executor hands it (the current encoder, the dense
source, the image source, the artifact folder being written and the last graph in it) and writes
its graph (build: its OpenVINO IR or TensorRT engine) into that folder, recording it in the folder's
``mimc.json``. The same handlers serve ``mimc run``, ``mimc export``, ``mimc quantize`` and ``mimc search``.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mimc.artifact import StageRecord, is_artifact, read_manifest, recorded_path, sha256_file, update_manifest
from mimc.atomic import write_json
from mimc.data import ImageSource
from mimc.errors import BadInputError, ConfigError, DataError
from mimc.latency.devices import load_profile
from mimc.pipeline.stages import ExportConfig
from mimc.quant.quantize import quantize_onnx

EVAL_IMAGES = 32  # held-out images for the quantization fidelity gate (never used for calibration)
QUANTIZE_BATCH = 16
GRAPH_SUFFIXES = (".onnx", ".xml", ".plan")  # what graph stages write: ONNX graphs, an OpenVINO IR, a TensorRT engine


@dataclass
class GraphContext:
    """What a graph stage sees: objects in memory, and the folder it writes graphs into."""

    folder: Path  # the artifact folder being written (a temporary one until the run succeeds)
    encoder: Any  # the model the graphs are exported from
    source: Any = None  # the dense source: profile's baseline, eval's reference
    images: Any = None  # mimc.data.ImageSource
    last_graph: Path | None = None
    export_config: Any = None  # the export stage's options (profile's baseline is exported alike)
    force: bool = False
    seed: int = 0
    export_options: dict[str, Any] = field(default_factory=dict)  # validate / force / seed of `mimc export`


def graph_path(ctx: GraphContext, name: str | None) -> Path | None:
    """``graph:`` of profile / eval: a file an earlier stage wrote, else the last graph."""
    if name is None:
        return ctx.last_graph
    path = ctx.folder / name
    if not path.is_file():
        written = sorted(p.name for suffix in GRAPH_SUFFIXES for p in ctx.folder.glob(f"*{suffix}"))
        raise BadInputError(f"graph '{name}' was not written by an earlier stage of this run: choose one of {written}")
    return path


# export -------------------------------------------------------------------------------------------
def export_stage(ctx: GraphContext, config) -> dict[str, Any]:
    from mimc.deploy.onnx import export_onnx

    report = export_onnx(ctx.encoder, ctx.folder / "model.onnx", **{**config.to_dict(), **ctx.export_options})
    ctx.last_graph, ctx.export_config = ctx.folder / "model.onnx", config
    return {"file": "model.onnx", "validation": report.get("validation"), "report": report}


# quantize -----------------------------------------------------------------------------------------
def split_images(images, n: int, seed: int):
    """(calibration subset, held-out subset), disjoint and seeded; held-out may be None for tiny sets."""
    total = len(images)
    order = np.random.default_rng(seed).permutation(total)
    # A full held-out set when there are enough images, else a quarter of them (calibration keeps the rest).
    n_eval = min(EVAL_IMAGES, max(total - n, total // 4))
    held, rest = order[:n_eval], order[n_eval:]
    calib = np.sort(rest[:n])
    return images.subset(calib), (images.subset(np.sort(held)) if n_eval else None)


def quantize_stage(ctx: GraphContext, config) -> dict[str, Any]:
    """The fp32 graph of the folder (exported first, with the defaults, when there is none) ->
    ``model.<precision>.onnx``, calibrated on the image source, gated on disjoint held-out images."""
    if ctx.images is None:
        raise DataError("quantization needs calibration images: give the run a data source (data)")
    graph = ctx.folder / "model.onnx"
    if not graph.is_file():
        from mimc.deploy.onnx import export_onnx

        export_onnx(ctx.encoder, graph)
    out = ctx.folder / f"model.{config.precision}.onnx"
    calib_set, held_out = split_images(ctx.images.draw(ctx.encoder.config, config.n + EVAL_IMAGES), config.n, ctx.seed)
    report = quantize_split(graph, out, calib_set, held_out, config, ctx.force, ctx.images.spec, seed=ctx.seed)
    ctx.last_graph = out
    return {"file": out.name, "validation": report["validation"], "fused_attention_blocks": report.get("fused_attention_blocks", 0),
            "calibration_sha256": report["calibration_sha256"], "report": report}


def quantize_split(graph: Path, out: Path, calib_set, held_out, config, force: bool, data_spec: str,
                   batch_size: int = QUANTIZE_BATCH, seed: int | None = None) -> dict[str, Any]:
    """Quantize one fp32 mimc graph file on ``calib_set``, gate on ``held_out`` (None: seeded normal
    inputs); recorded in the artifact's mimc.json when ``out`` sits in one (``seed``: the one that drew both)."""
    def annotate(report: dict[str, Any]) -> None:
        report["calibration_sha256"] = calib_set.sha256  # ImageSet's hash (the same bytes quantize_onnx hashed)
        report["calibration_source"] = recorded_path(str(data_spec))  # a replay reads them from any folder
        if seed is not None:  # a replay draws the same images
            report["calibration_seed"] = seed
        report["held_out_images"] = len(held_out) if held_out is not None else 0
        if is_artifact(out.parent):  # recorded before the graph is moved into place (a kill in between: no unrecorded graph)
            record_graph(out, report)

    held = held_out.batches(batch_size) if held_out is not None else None
    return quantize_onnx(graph, out, calib_set.batches(batch_size), config, held, force=force, on_commit=annotate)


def record_graph(out: Path, report: dict[str, Any]) -> None:
    """Quantization changes the graph, not the weights: it is recorded under ``files[<graph>]``."""
    metrics = {"validation": report["validation"], "calibration_sha256": report["calibration_sha256"],
               "calibration_images": report["calibration_images"], "target": report["target"],
               "fused_attention_blocks": report["fused_attention_blocks"]}
    stage = StageRecord(name="quantize", config=report["config"], config_version=report["config_version"],
                        metrics=metrics, seconds=report["seconds"], parent_hash=report["source"]["sha256"])
    entry = {k: v for k, v in report.items() if k != "path"}
    entry["stage"] = asdict(stage)
    update_manifest(out.parent, lambda manifest: manifest.files.update({out.name: entry}))


def target_for_device(device: str, precision: str) -> str:
    """A device profile name or YAML path -> the graph target; refuses precisions it lacks."""
    profile = load_profile(device)
    if precision not in profile.precisions:
        raise ConfigError(f"device '{profile.name}' does not support {precision} (it has {', '.join(profile.precisions)}): "
                          f"pick another device or precision")
    return {"onnxruntime-cpu": "cpu", "openvino-cpu": "openvino"}.get(profile.backend, "tensorrt")


# build --------------------------------------------------------------------------------------------
def build_stage(ctx: GraphContext, config) -> dict[str, Any]:
    """The last ONNX graph (or ``graph``) -> ``model.xml`` + ``model.bin`` (openvino-cpu) or ``model.plan``
    (TensorRT), built as ``mimc build`` builds, with its sidecar ``<file>.json``; recorded under
    ``files[<file>]`` of the folder's mimc.json. Later profile / eval stages read it."""
    from mimc.deploy.build import build

    graph = graph_path(ctx, config.graph)
    if graph is None or graph.suffix != ".onnx":
        raise BadInputError("build reads an ONNX graph: add an export (or quantize) stage before it", option="graph")
    profile = load_profile(config.device)
    out = ctx.folder / config.output_name
    start = time.perf_counter()
    built = build(graph, profile, precision=config.precision, output=out)
    seconds = round(time.perf_counter() - start, 3)
    _relative_sources(out, built["sidecar"])
    entry = record_build(out, graph, config, built["sidecar"], seconds)
    ctx.last_graph = out
    return {"file": out.name, "device": profile.name, "precision": entry["precision"], "source": graph.name,
            "sidecar": f"{out.name}.json", "report": built["sidecar"]}


def _relative_sources(out: Path, sidecar: dict[str, Any]) -> None:
    """The sidecar names the graph it was built from by its name in the artifact, not by the path of
    the run's temporary folder (gone once the run ends; the artifact may move)."""
    changed = False
    for key in ("source", "onnx"):  # OpenVINO's, TensorRT's
        value = sidecar.get(key)
        if isinstance(value, str) and Path(value).parent == out.parent.resolve():
            sidecar[key], changed = Path(value).name, True
    if changed:
        write_json(Path(f"{out}.json"), sidecar)


def record_build(out: Path, graph: Path, config, sidecar: dict[str, Any], seconds: float) -> dict[str, Any]:
    """A built deployable under ``files[<file>]`` of its artifact's mimc.json: its sha256 (and its .bin's,
    checked like a graph's external data), what it was built from, the precision it runs at."""
    weights = out.with_suffix(".bin") if out.suffix == ".xml" else None
    source_sha = read_manifest(out.parent).files.get(graph.name, {}).get("sha256") or sha256_file(graph)
    precision = sidecar.get("precision")
    entry: dict[str, Any] = {
        "kind": "openvino-ir" if weights is not None else "tensorrt-engine",
        "file": out.name,
        "sha256": sha256_file(out),
        "bytes": out.stat().st_size,
        # the IR's weights, verified like a graph's external data (mimc.artifact.verify_graph)
        "external_data": weights.name if weights is not None else None,
        "external_data_bytes": weights.stat().st_size if weights is not None else 0,
        "external_data_sha256": sha256_file(weights) if weights is not None else None,
        "sidecar": f"{out.name}.json",
        "source": graph.name,
        "source_sha256": source_sha,
        "device": config.device,
        "precision": precision,
        "runtime_precision": sidecar.get("runtime_precision"),
    }
    stage = StageRecord(name="build", config=config.to_dict(), config_version=config.version,
                        metrics={"precision": precision, "runtime_precision": sidecar.get("runtime_precision")},
                        seconds=seconds, parent_hash=source_sha)
    entry["stage"] = asdict(stage)
    update_manifest(out.parent, lambda manifest: manifest.files.update({out.name: entry}))
    return entry


# profile ------------------------------------------------------------------------------------------
def profile_stage(ctx: GraphContext, config) -> dict[str, Any]:
    """The graph and, with ``baseline``, the dense source exported the same way, profiled alike."""
    from mimc.deploy.onnx import export_onnx
    from mimc.latency.run import profile

    graph = graph_path(ctx, config.graph)
    kwargs = dict(device=config.device, predict=config.predict, batch_sizes=list(config.batch_sizes) or None,
                  warmup=config.warmup, iters=config.iters, threads=config.threads, precision=config.precision)
    entry: dict[str, Any] = {"file": graph.name, "result": {**profile(graph, **kwargs), "model": graph.name}}
    if config.baseline:
        with tempfile.TemporaryDirectory(prefix=".mimc-baseline.") as base_dir:
            base = Path(base_dir) / "dense.onnx"
            # the export stage's batch, opset and exporter: a dynamo / opset-18 graph is not timed
            # against a torchscript / opset-17 one (quantize without export exports the defaults)
            same = ctx.export_config if ctx.export_config is not None else ExportConfig()
            export_onnx(ctx.source, base, **same.to_dict(), validate=False)
            # named for what it is: the temporary export is gone once the run ends
            entry["baseline"] = {**profile(base, **kwargs), "model": "the source model, dense fp32 (exported alike)"}
            measured, backend = entry["result"].get("label") == "measured", entry["result"].get("backend")
            if measured and backend in ("onnxruntime-cpu", "openvino-cpu"):
                # Two separate worker runs would time the graphs one after the other; the ratio comes
                # from both graphs timed together in alternating rounds instead (on OpenVINO: the
                # dense graph at fp32, the result at the precision it was profiled at).
                from mimc.runtime import openvino, ort, timing

                threads = entry["result"]["threads"]  # the profile's threads when the stage names none
                if backend == "onnxruntime-cpu":
                    runs = [ort.runner(base, threads), ort.runner(graph, threads)]
                else:
                    runs = [openvino.runner(base, "fp32", threads),
                            openvino.runner(graph, entry["result"]["precision"], threads)]
                dense_ms, graph_ms = timing.interleave(runs, iters=config.iters)
                entry["interleaved_ms"] = {"dense": dense_ms, "graph": graph_ms}
            else:  # predicted, or measured on a GPU: the two reports' own latencies
                dense_ms, graph_ms = _latency(entry["baseline"]), _latency(entry["result"])
            entry["speedup_vs_dense"] = round(dense_ms / graph_ms, 3) if dense_ms and graph_ms else None
    return entry


def _latency(report: dict[str, Any]) -> float | None:
    first = (report.get("results") or [{}])[0]  # measured: p50_ms, predicted: latency_ms
    found = [first[key] for key in ("p50_ms", "latency_ms") if isinstance(first.get(key), (int, float))]
    return float(found[0]) if found else None


# eval ---------------------------------------------------------------------------------------------
def eval_stage(ctx: GraphContext, config) -> dict[str, Any]:
    from mimc.evaluation import evaluate, load_for_eval

    graph = graph_path(ctx, config.graph)
    # an IR runs on OpenVINO (at its recorded precision), an engine on TensorRT, an .onnx on ONNX Runtime
    model = load_for_eval(str(graph)) if graph is not None else ctx.encoder
    images = ctx.images if ctx.images is not None else ImageSource("builtin", ctx.seed)
    rep = evaluate(model, ctx.source, data=images, n=config.n, seed=ctx.seed, batch_size=config.batch_size, val=config.val)
    return {"file": graph.name if graph is not None else "model.safetensors", **rep}


GRAPH_HANDLERS: dict[str, Callable[[GraphContext, Any], dict[str, Any]]] = {
    "export": export_stage, "quantize": quantize_stage, "build": build_stage, "profile": profile_stage,
    "eval": eval_stage}

__all__ = ["GraphContext", "GRAPH_HANDLERS", "EVAL_IMAGES", "split_images", "quantize_split", "record_graph",
           "record_build", "target_for_device", "GRAPH_SUFFIXES"]
