"""``profile``: one entry point that picks how to measure (or predict) a graph on a device profile.

- ``.onnx`` on an ``onnxruntime-cpu`` device: measured here by :mod:`mimc.latency.ort_cpu`.
- ``.onnx`` or an OpenVINO IR ``.xml`` on an ``openvino-cpu`` device: measured here by
  :mod:`mimc.latency.openvino_cpu` at ``precision`` (default: an IR's recorded precision, an ONNX
  graph's fp32; bf16 where the CPU has it).
- ``predict=True``: a roofline estimate from the graph's FLOPs and bytes (:mod:`mimc.latency.roofline`).
- ``.plan`` / ``.engine``, or a ``tensorrt`` / ``onnxruntime-cuda`` device: measured on the GPU by
  :mod:`mimc.runtime.trt` / :mod:`mimc.runtime.cuda_ort`; without a CUDA GPU this is refused, never
  silently replaced by a prediction.

Every report carries ``"label": "measured"`` or ``"predicted"``, and one report never holds both.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

from mimc.errors import BadInputError, ConfigError, DeviceUnavailableError, whole
from mimc.latency.devices import MAX_BATCH
from mimc.runtime.openvino import IR_SUFFIXES  # an OpenVINO IR (its .bin beside it), measured on an openvino-cpu device
from mimc.runtime.timing import check_threads
from mimc.runtime.trt import ENGINE_SUFFIXES

ONNX_SUFFIXES = (".onnx",)
WARMUP, ITERS = 10, 50  # profile's default runs per batch size, untimed and timed (predict takes no other)


def parse_batch_sizes(text: str | Sequence[int] | None) -> list[int] | None:
    """``"1,8"`` -> ``[1, 8]``; refuses anything that is not a positive integer."""
    if text is None or text == "":
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    sizes = []
    for item in items:
        s = str(item).strip()
        if not s.lstrip("-").isdigit() or not 1 <= int(s) <= MAX_BATCH:
            raise BadInputError(f"batch_sizes: '{s}' is not a positive integer up to {MAX_BATCH}: give e.g. 1,8", option="batch_sizes")
        sizes.append(int(s))
    return list(dict.fromkeys(sizes))


def check_predict(predict: bool, warmup: int, iters: int, threads: int | None) -> None:
    """A roofline prediction times nothing: warmup, iters or threads given with it are refused."""
    defaults = (("warmup", warmup, WARMUP), ("iters", iters, ITERS), ("threads", threads, None))
    given = tuple(name for name, value, default in defaults if value != default)
    if predict and given:
        raise ConfigError(f"{', '.join(given)} set a measurement, which predict does not make: drop {'them' if len(given) > 1 else 'it'}",
                          option=(*given, "predict"))


def check_model_path(model_path: str | os.PathLike) -> Path:
    path = Path(model_path)
    if not path.exists():
        raise BadInputError(f"{path} does not exist: pass an .onnx file (mimc export MODEL writes one), an OpenVINO .xml IR or a TensorRT .plan")
    if path.is_dir():
        hint = f"; did you mean {path / 'model.onnx'}?" if (path / "model.onnx").is_file() else ""
        raise BadInputError(f"{path} is a directory, not an ONNX file, OpenVINO .xml IR or engine: pass the .onnx file inside it{hint}")
    if path.suffix not in ONNX_SUFFIXES + ENGINE_SUFFIXES + IR_SUFFIXES:
        raise BadInputError(f"{path} is not an ONNX graph, TensorRT engine or OpenVINO IR (expected {', '.join(ONNX_SUFFIXES + ENGINE_SUFFIXES + IR_SUFFIXES)}): export one with `mimc export MODEL`")
    return path


def cuda_available() -> bool:
    """Whether a CUDA GPU is visible (torch is a core dependency; its check needs no driver call when absent)."""
    import torch

    return bool(torch.cuda.is_available())


def profile(model_path: str | os.PathLike, device: str = "cpu", predict: bool = False,
            batch_sizes: Sequence[int] | str | None = None, warmup: int = WARMUP, iters: int = ITERS,
            threads: int | None = None, on_batch: Callable[[int], None] | None = None,
            precision: str | None = None, on_message: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Latency report for ``model_path`` on ``device`` (a profile name or YAML path).

    ``batch_sizes`` None: the graph's static batch (or the profile's ``batch_sizes`` when the batch
    is dynamic); ``threads`` None: the profile's ``threads``, else every core. ``precision`` (with
    ``predict`` only) prices the graph at that precision, e.g. an fp32 graph as the fp16 engine
    TensorRT would build from it. ``on_message`` gets TensorRT's error lines as they are logged.
    """
    from mimc.artifact import verify_graph
    from mimc.latency.devices import load_profile

    path = check_model_path(model_path)
    prof = load_profile(device)
    is_engine, is_ir = path.suffix in ENGINE_SUFFIXES, path.suffix in IR_SUFFIXES
    if not is_engine:
        verify_graph(path)  # a graph or IR its artifact lists (and its .data / .bin) must be the one recorded
    sizes = parse_batch_sizes(batch_sizes)
    check_predict(predict, warmup, iters, threads)
    if not (whole(warmup) and whole(iters)) or warmup < 0 or iters < 1:
        raise BadInputError(f"warmup must be >= 0 and iters >= 1, got {warmup!r} and {iters!r}: e.g. warmup 10, iters 50", option=("warmup", "iters"))
    check_threads(threads)
    if is_ir and (predict or prof.backend != "openvino-cpu"):
        raise BadInputError(f"{path.name} is an OpenVINO IR: profile it with device openvino-cpu{' and without predict' if predict else ''}, "
                            "or give the .onnx it came from", option=("device", "predict") if predict else "device")
    if prof.backend == "openvino-cpu" and not predict:
        if is_engine:
            raise BadInputError(f"{path.name} is a TensorRT engine but device '{prof.name}' runs OpenVINO on the CPU: pass the .onnx graph or an IR")
        from mimc.latency.openvino_cpu import precision_for, profile_openvino_cpu

        # an IR runs at the precision its build recorded, a quantized .onnx at int8; a precision its
        # graph does not run is refused
        precision = precision_for(path, precision)
        report = profile_openvino_cpu(path, sizes or _default_sizes(path, prof), warmup=warmup, iters=iters,
                                      threads=threads or prof.threads_here(), precision=precision, on_batch=on_batch)
        return {**_envelope("measured", path, prof, report.pop("results")), **report}
    if precision is not None and not predict:
        raise BadInputError(f"precision {precision} prices a graph by roofline: turn on predict, or profile a graph/engine built at {precision}", option=("precision", "predict"))

    if predict:
        if is_engine:
            raise BadInputError(f"predict reads FLOPs and bytes from an ONNX graph, not an engine: give the .onnx that {path.name} was built from", option="predict")
        from mimc.latency.roofline import predict as roofline_predict

        sizes = sizes or _default_sizes(path, prof)
        results = []
        for b in sizes:
            if on_batch is not None:
                on_batch(b)
            results.append(roofline_predict(path, prof, batch=b, precision=precision))
        return _envelope("predicted", path, prof, results, note="a roofline lower bound, not a measurement")

    if prof.backend == "onnxruntime-cpu":
        if is_engine:
            raise BadInputError(f"{path.name} is a TensorRT engine but device '{prof.name}' runs ONNX Runtime on the CPU: pass the .onnx graph")
        from mimc.latency.ort_cpu import profile_onnx_cpu

        sizes = sizes or _default_sizes(path, prof)
        report = profile_onnx_cpu(path, sizes, warmup=warmup, iters=iters, threads=threads or prof.threads_here(), on_batch=on_batch)
        return {**_envelope("measured", path, prof, report.pop("results"), note=report.pop("note", None)), **report}

    # GPU backends: measured on the device or not at all.
    if not cuda_available():
        raise DeviceUnavailableError(
            f"device {prof.name} needs a CUDA GPU, none found: run on the target or turn on predict for a roofline estimate",
            option="predict",
        )
    if is_engine:
        from mimc.latency.tensorrt_gpu import profile_engine

        report = profile_engine(path, prof, sizes or list(prof.batch_sizes), warmup, iters, on_message=on_message)
    elif prof.backend == "onnxruntime-cuda":
        from mimc.runtime.cuda_ort import profile_onnx_cuda

        report = profile_onnx_cuda(path, prof, sizes or _default_sizes(path, prof), warmup, iters)
    else:
        raise BadInputError(
            f"device '{prof.name}' runs TensorRT engines: build one with `mimc build {path} --device {prof.name}` "
            "and profile the .plan, or turn on predict",
            option="predict",
        )
    report.setdefault("label", "measured")
    return report


def _default_sizes(path: Path, prof) -> list[int]:
    """A static graph runs at its own batch only; a dynamic one at the profile's batch sizes."""
    from mimc.graph import graph_inputs, load_graph
    from mimc.latency.ort_cpu import static_batch

    if path.suffix in IR_SUFFIXES:
        from mimc.runtime.openvino import model_inputs

        fixed = static_batch(model_inputs(path))
    else:
        fixed = static_batch(graph_inputs(load_graph(path, external_data=False), path))
    return [fixed] if fixed else list(prof.batch_sizes)


def _envelope(label: str, path: Path, prof, results: list[dict[str, Any]], note: str | None = None) -> dict[str, Any]:
    from mimc.artifact import mimc_version, now_iso

    return {
        "label": label,
        "model": str(path),
        "device": prof.name,
        "backend": prof.backend,
        "results": results,
        "mimc_version": mimc_version(),
        "created": now_iso(),
        **({"note": note} if note else {}),
    }


__all__ = ["profile", "parse_batch_sizes", "check_model_path", "check_predict", "cuda_available"]
