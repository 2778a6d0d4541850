"""ONNX Runtime sessions: the installed build, its providers, mimc's session options, one-call runs.

``onnxruntime`` and ``onnxruntime-gpu`` install the same module; :func:`onnxruntime` finds whichever
is present (or says how to install one) and :func:`onnxruntime_distribution` names the wheel. This
module imports neither torch nor the CLI: profiling workers load only it, ONNX Runtime and numpy.

References:
- ONNX Runtime session options and threading:
  https://onnxruntime.ai/docs/performance/tune-performance/threading.html (microsoft/onnxruntime)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from mimc.errors import BadInputError, DeviceUnavailableError, MissingExtraError


def onnxruntime():
    """The installed ONNX Runtime module (CPU or GPU build), or a one-line install hint."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingExtraError(
            "running ONNX graphs needs ONNX Runtime, which is not installed: pip install 'mimc[cpu]' "
            "(or 'mimc[gpu]' for onnxruntime-gpu; install only one of them)"
        ) from exc
    return ort


# Wheels that install the `onnxruntime` module; exactly one should be present.
_ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-training")


def onnxruntime_distribution() -> str:
    """Which wheel provides the installed module (``onnxruntime`` or ``onnxruntime-gpu``, ...)."""
    from importlib import metadata

    onnxruntime()
    found = []
    for name in _ORT_DISTRIBUTIONS:
        try:
            metadata.distribution(name)
            found.append(name)
        except metadata.PackageNotFoundError:
            continue
    # Two wheels overwrite each other's files; say so rather than pick one silently.
    return "+".join(found) if found else "unknown"


# Preference order when the caller asks for every available provider. TensorRT's provider is left
# out: it builds an engine on first run (minutes) - mimc builds engines explicitly instead.
_PREFERRED = ("CUDAExecutionProvider", "CPUExecutionProvider")


def resolve_providers(providers: Sequence[str] | str | None) -> list[str]:
    """None: CPU only (validation is defined on the CPU provider); "auto": best available."""
    available = list(onnxruntime().get_available_providers())
    if providers is None:
        return ["CPUExecutionProvider"]
    if providers == "auto":
        return [p for p in _PREFERRED if p in available] or ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [providers]
    missing = [p for p in providers if p not in available]
    if missing:
        raise DeviceUnavailableError(
            f"ONNX Runtime provider(s) {missing} not available here (available: {available}): "
            "install onnxruntime-gpu on a CUDA machine or use CPUExecutionProvider"
        )
    return list(providers)


def session_options(threads: int | None = None):
    """Session options mimc uses everywhere: no spinning, sequential execution."""
    ort = onnxruntime()
    so = ort.SessionOptions()
    # Idle worker threads spin after each run and steal cores from the next session or process.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: warnings about unused initializers are noise here
    return so


class Port(NamedTuple):
    """An input or output as an ORT session reports it, for the other runtimes behind the same surface."""

    name: str
    type: str
    shape: list


def _inference_session(source: str | bytes, so, providers, what: str):
    ort, chosen = onnxruntime(), resolve_providers(providers)
    try:
        return ort.InferenceSession(source, sess_options=so, providers=chosen)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types; all mean the same here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(f"ONNX Runtime cannot load {what} ({first[:300]}): "
                            "re-export it with `mimc export`") from exc


def make_session(path: str | Path, providers: Sequence[str] | str | None = None, threads: int | None = None,
                 emulate_qdq: bool = False):
    """An InferenceSession with mimc's options; BadInputError when the file is missing or unloadable.

    ``emulate_qdq``: graph optimizations off, so ORT computes a Q/DQ graph's exact math (round, clip,
    dequantize, fp32 matmul) instead of fusing DQ -> MatMul into its own int8 kernels - the way to
    judge a graph quantized for TensorRT on a CPU.
    """
    ort = onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"ONNX file {path} does not exist: export one with `mimc export MODEL`")
    so = session_options(threads)
    if emulate_qdq:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return _inference_session(str(path), so, providers, str(path))


def session_from_bytes(data: bytes, external_dir: str | Path | None = None, providers: Sequence[str] | str | None = None,
                       threads: int | None = None):
    """An InferenceSession over a serialised graph held in memory (e.g. one with extra outputs for
    calibration); ``external_dir`` is the folder its external-data tensors are read from, so a graph
    whose weights live beside it on disk is never serialised with them."""
    so = session_options(threads)
    if external_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(Path(external_dir).resolve()))
    return _inference_session(data, so, providers, "the graph")


def run_onnx(path: str | Path | Any, inputs: Any, providers: Sequence[str] | str | None = None,
             threads: int | None = None) -> dict[str, np.ndarray]:
    """Run a graph once; returns ``{output_name: array}``.

    ``path`` may also be an existing InferenceSession (reuse it across batches). ``inputs`` is one
    array/tensor (fed to the graph's only input) or a ``{input_name: array}`` mapping.
    """
    sess = path if hasattr(path, "get_inputs") else make_session(path, providers, threads)
    graph_inputs = sess.get_inputs()
    if isinstance(inputs, Mapping):
        feed = {k: _feed_array(v) for k, v in inputs.items()}
    else:
        if len(graph_inputs) != 1:
            raise BadInputError(
                f"graph has {len(graph_inputs)} inputs {[i.name for i in graph_inputs]}: pass a name -> array mapping"
            )
        feed = {graph_inputs[0].name: _feed_array(inputs)}
    wanted = {i.name for i in graph_inputs}
    if set(feed) != wanted:
        raise BadInputError(f"graph inputs are {sorted(wanted)}, got {sorted(feed)}: feed every input by name")
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feed)))


def _feed_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x)


__all__ = ["Port", "onnxruntime", "onnxruntime_distribution", "resolve_providers", "session_options",
           "make_session", "session_from_bytes", "run_onnx"]
