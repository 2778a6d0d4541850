"""Fidelity of a graph to its torch model: metrics, per-precision gates, and an ONNX Runtime runner.

``compare_outputs`` measures, ``check_gate`` judges, ``run_onnx`` runs a graph on whichever ONNX
Runtime build is installed (``onnxruntime`` and ``onnxruntime-gpu`` install the same module).

References:
- Polygraphy (NVIDIA/TensorRT, tools/Polygraphy): output comparison by absolute error, cosine
  similarity or signal-to-noise ratio, one typed failure per comparison.
- SQNR as the quantization fidelity measure: Nagel et al., "A White Paper on Neural Network
  Quantization", arXiv 2106.08295 (2021).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from mimc.errors import BadInputError, ConfigError, DeviceUnavailableError, MissingExtraError, ValidationError

# Outputs that agree bit for bit have infinite SQNR; JSON has no infinity, so reports cap it here.
SQNR_CAP_DB = 200.0


@dataclass(frozen=True)
class Gate:
    """Thresholds one precision must meet; None means the measure is not gated for it.

    ``max_abs`` is scale-aware: the allowed error is ``max(max_abs, rel_abs * |reference|_max)``.
    """

    max_abs: float | None = None
    rel_abs: float = 0.0
    min_cosine: float | None = None
    min_sqnr_db: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Why these numbers:
# - fp32: the graph computes the same math in the same dtype; only summation order differs
#   (ORT's GEMM/LayerNorm kernels vs torch's). Tiny models agree to ~2e-6 and ViT-B to ~5e-6, so
#   1e-4 absolute leaves ~20x headroom while still catching a wrong op (a mis-ordered reshape or a
#   missing bias moves outputs by >1e-2). Reordering error grows with the magnitude of the outputs,
#   not with their count: a model whose features reach |x| ~ 100 (hidden states without a final
#   norm, large layer-scale models) sees ~1e-5 relative noise, so the gate becomes relative
#   (1e-6 * max|ref|, i.e. ~8 fp32 ulps) once 1e-6 * max|ref| exceeds 1e-4.
# - fp16 / bf16: 10 / 7 mantissa bits make an absolute gate meaningless; the direction of every
#   feature vector is what downstream heads and k-NN use, so gate the worst per-sample cosine
#   (0.999 for fp16 ~ 33 dB; bf16 has 8x coarser rounding, 0.995).
# - int8 / fp8: quantization noise is the signal to judge, so SQNR (20 dB = noise at 1 % of the
#   signal power) together with the worst per-sample cosine (0.99). DESIGN.md: Q/DQ restricted to
#   MatMul/Gemm/Conv kept ViT-B's feature cosine at 0.999, while quantizing LayerNorm/Softmax/Adds
#   fell to 0.947 - the gate separates the two.
GATES: dict[str, Gate] = {
    "fp32": Gate(max_abs=1e-4, rel_abs=1e-6),
    "tf32": Gate(min_cosine=0.9999),
    "fp16": Gate(min_cosine=0.999),
    "bf16": Gate(min_cosine=0.995),
    "int8": Gate(min_sqnr_db=20.0, min_cosine=0.99),
    "fp8": Gate(min_sqnr_db=20.0, min_cosine=0.99),
}


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _as_mapping(outputs: Any) -> dict[str, Any]:
    if isinstance(outputs, Mapping):
        return dict(outputs)
    if isinstance(outputs, Sequence) and not isinstance(outputs, (str, bytes)) and not hasattr(outputs, "shape"):
        fields = getattr(outputs, "_fields", None)  # EncoderOutput and other NamedTuples keep their names
        names = fields if fields else [f"output_{i}" for i in range(len(outputs))]
        return {n: o for n, o in zip(names, outputs) if o is not None}
    return {"output": outputs}


def _unnamed(outputs: dict[str, Any]) -> bool:
    return all(k == "output" or k.startswith("output_") for k in outputs)


def _metrics(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    diff = cand - ref
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    noise = float(np.sum(diff * diff))
    signal = float(np.sum(ref * ref))
    if noise == 0.0:
        sqnr = SQNR_CAP_DB
    elif signal == 0.0:
        sqnr = -SQNR_CAP_DB
    else:
        sqnr = min(SQNR_CAP_DB, 10.0 * math.log10(signal / noise))
    # Cosine per sample (everything after the batch axis flattened), worst sample reported: a mean
    # over the batch would hide one sample whose features turned.
    r = ref.reshape(ref.shape[0], -1) if ref.ndim > 1 else ref.reshape(1, -1)
    c = cand.reshape(r.shape)
    norms = np.linalg.norm(r, axis=1) * np.linalg.norm(c, axis=1)
    dots = np.sum(r * c, axis=1)
    cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(np.all(r == c, axis=1), 1.0, 0.0))
    return {
        "max_abs": max_abs,
        "cosine": float(np.min(cos)) if cos.size else 1.0,
        "sqnr_db": float(sqnr),
        "ref_max_abs": float(np.max(np.abs(ref))) if ref.size else 0.0,
    }


def compare_outputs(reference: Any, candidate: Any) -> dict[str, Any]:
    """Fidelity of ``candidate`` to ``reference``: ``max_abs``, ``cosine``, ``sqnr_db`` (+ per output).

    Both may be one array/tensor, a sequence or NamedTuple of them, or a name -> array mapping;
    outputs are matched by name (by position for plain sequences). The top-level numbers are the
    worst over outputs. ``cosine`` is the smallest per-sample cosine; ``sqnr_db`` is
    10·log10(Σref² / Σ(cand−ref)²), capped at 200 dB for identical outputs.
    """
    ref_map, cand_map = _as_mapping(reference), _as_mapping(candidate)
    if set(ref_map) != set(cand_map):
        if len(ref_map) == len(cand_map) and (_unnamed(ref_map) or _unnamed(cand_map)):
            cand_map = dict(zip(ref_map, cand_map.values()))  # plain sequences: match by position
        else:
            raise BadInputError(
                f"outputs differ: reference has {sorted(ref_map)}, candidate has {sorted(cand_map)}: compare graphs with the same outputs"
            )
    per_output = {}
    for name, ref in ref_map.items():
        r, c = _as_numpy(ref), _as_numpy(cand_map[name])
        if r.shape != c.shape:
            raise BadInputError(f"output '{name}' has shape {c.shape}, reference {r.shape}: the graph does not match the model")
        per_output[name] = _metrics(r, c)
    worst = {
        "max_abs": max(m["max_abs"] for m in per_output.values()),
        "cosine": min(m["cosine"] for m in per_output.values()),
        "sqnr_db": min(m["sqnr_db"] for m in per_output.values()),
        "ref_max_abs": max(m["ref_max_abs"] for m in per_output.values()),
    }
    return {**worst, "outputs": per_output}


def gate_for(precision: str) -> Gate:
    if precision not in GATES:
        raise ConfigError(f"unknown precision '{precision}': valid precisions are {sorted(GATES)}")
    return GATES[precision]


def gate_failures(metrics: Mapping[str, Any], precision: str, gate: Gate | None = None) -> list[str]:
    """Human-readable reasons ``metrics`` miss the gate (empty when it passes)."""
    gate = gate or gate_for(precision)
    failures = []
    if gate.max_abs is not None:
        allowed = max(gate.max_abs, gate.rel_abs * float(metrics.get("ref_max_abs", 0.0)))
        if not metrics["max_abs"] <= allowed:  # `not <=` so NaN fails
            failures.append(f"max abs error {metrics['max_abs']:.3g} > {allowed:.3g}")
    if gate.min_cosine is not None and not metrics["cosine"] >= gate.min_cosine:
        failures.append(f"cosine {metrics['cosine']:.6f} < {gate.min_cosine}")
    if gate.min_sqnr_db is not None and not metrics["sqnr_db"] >= gate.min_sqnr_db:
        failures.append(f"SQNR {metrics['sqnr_db']:.1f} dB < {gate.min_sqnr_db} dB")
    return failures


def check_gate(metrics: Mapping[str, Any], precision: str = "fp32", gate: Gate | None = None, what: str = "graph") -> None:
    """Raise :class:`ValidationError` when ``metrics`` (from :func:`compare_outputs`) miss the gate."""
    failures = gate_failures(metrics, precision, gate)
    if failures:
        raise ValidationError(
            f"{what} fails the {precision} fidelity gate ({'; '.join(failures)}): nothing written; "
            "keep it anyway with force",
            option="force",
        )


# ONNX Runtime ------------------------------------------------------------------------------------
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


def available_providers() -> list[str]:
    return list(onnxruntime().get_available_providers())


def resolve_providers(providers: Sequence[str] | str | None) -> list[str]:
    """None: CPU only (validation is defined on the CPU provider); "auto": best available."""
    available = available_providers()
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
    """Session options mimc uses everywhere: no spinning (see DESIGN.md), sequential execution."""
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


def make_session(path: str | Path, providers: Sequence[str] | str | None = None, threads: int | None = None):
    ort = onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"ONNX file {path} does not exist: export one with `mimc export MODEL`")
    chosen = resolve_providers(providers)
    try:
        return ort.InferenceSession(str(path), sess_options=session_options(threads), providers=chosen)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph types; all mean the same here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(f"ONNX Runtime cannot load {path} ({first[:300]}): re-export it with `mimc export`") from exc


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


__all__ = [
    "GATES",
    "Gate",
    "SQNR_CAP_DB",
    "compare_outputs",
    "check_gate",
    "gate_failures",
    "gate_for",
    "run_onnx",
    "make_session",
    "session_options",
    "available_providers",
    "resolve_providers",
    "onnxruntime_distribution",
    "onnxruntime",
]
