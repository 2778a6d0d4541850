"""Per-precision fidelity gates: each precision has its thresholds, and a :class:`~mimc.metrics.Fidelity` passes or not.

:func:`mimc.metrics.compare_outputs` measures, :func:`check_gate` judges, :func:`verdict` writes the
judgement into a report (the measurement under ``fidelity``, always :meth:`Fidelity.to_dict`).

References:
- Polygraphy (NVIDIA/TensorRT, tools/Polygraphy): output comparison by absolute error, cosine
  similarity or signal-to-noise ratio, one typed failure per comparison.
- SQNR as the quantization fidelity measure: Nagel et al., "A White Paper on Neural Network
  Quantization", arXiv 2106.08295 (2021).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from mimc.errors import ConfigError, ValidationError
from mimc.metrics import Fidelity


@dataclass(frozen=True)
class Gate:
    """Thresholds one precision must meet; None means the measure is not gated for it.

    ``max_abs`` is scale-aware: the allowed error is ``max(max_abs, rel_abs * |reference|_max)``.
    """

    max_abs: float | None = None
    rel_abs: float = 0.0
    min_cosine: float | None = None
    min_sqnr_db: float | None = None


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
    "int8-bf16": Gate(min_sqnr_db=20.0, min_cosine=0.99),  # int8 noise dominates bf16's 8-bit mantissa rounding
    "fp8": Gate(min_sqnr_db=20.0, min_cosine=0.99),
}


def gate_for(precision: str) -> Gate:
    if precision not in GATES:
        raise ConfigError(f"unknown precision '{precision}': valid precisions are {sorted(GATES)}")
    return GATES[precision]


def gate_failures(fidelity: Fidelity, precision: str) -> list[str]:
    """Human-readable reasons ``fidelity`` misses the gate (empty when it passes).

    The cosine judged is the worst image over every compared output (``image_cosine_min``), the SQNR
    the lowest over them; a gated measure that was not taken fails.
    """
    gate = gate_for(precision)
    failures = []
    if fidelity.max_abs is not None and math.isinf(fidelity.max_abs):  # (the allowed error may be inf too)
        failures.append("outputs hold NaN/inf values")
    elif gate.max_abs is not None:
        allowed = max(gate.max_abs, gate.rel_abs * float(fidelity.ref_max_abs or 0.0))
        if fidelity.max_abs is None:
            failures.append("max abs error not measured")
        elif not fidelity.max_abs <= allowed:  # `not <=` so NaN fails
            failures.append(f"max abs error {fidelity.max_abs:.3g} > {allowed:.3g}")
    cosine, sqnr = fidelity.image_cosine_min, fidelity.worst_sqnr_db
    if gate.min_cosine is not None and not (cosine is not None and cosine >= gate.min_cosine):
        failures.append(f"cosine {cosine:.6f} < {gate.min_cosine}" if cosine is not None else "cosine not measured")
    if gate.min_sqnr_db is not None and not (sqnr is not None and sqnr >= gate.min_sqnr_db):
        failures.append(f"SQNR {sqnr:.1f} dB < {gate.min_sqnr_db} dB" if sqnr is not None else "SQNR not measured")
    return failures


def check_gate(fidelity: Fidelity, precision: str = "fp32", what: str = "graph", force: bool = False) -> list[str]:
    """The reasons ``fidelity`` misses the gate; :class:`ValidationError` when there are any, unless ``force``."""
    failures = gate_failures(fidelity, precision)
    if failures and not force:
        raise ValidationError(
            f"{what} fails the {precision} fidelity gate ({'; '.join(failures)}): nothing written; "
            "keep it anyway with force",
            option="force",
        )
    return failures


def verdict(fidelity: Fidelity, precision: str, failures: list[str] | None = None) -> dict[str, Any]:
    """The report of one gated comparison: the measurement (``fidelity``) and the judgement."""
    failures = gate_failures(fidelity, precision) if failures is None else failures
    return {
        "fidelity": fidelity.to_dict(),
        "passed": not failures,
        "forced": bool(failures),  # a failing graph is only ever kept by force
        "failures": failures,
        "gate": {"precision": precision, **asdict(gate_for(precision))},
    }


__all__ = ["GATES", "Gate", "check_gate", "gate_failures", "gate_for", "verdict"]
