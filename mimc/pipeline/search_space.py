"""The search grid: which candidates a search builds (:class:`SearchSpace`), what each one is and
reports (:class:`Candidate`), and the (precision, runtime) pairs a device runs here."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mimc.errors import ConfigError
from mimc.options import Options, option

CPU_PRECISIONS = ("fp32", "int8")
# what each CPU runtime of a measured search runs (OpenVINO int8: the openvino target's Q/DQ graph, float layers in f32)
# (int8-bf16: the int8 graph with its float layers in bf16, where the CPU has bf16)
RUNTIME_PRECISIONS = {"ort": CPU_PRECISIONS, "openvino": ("fp32", "bf16", "int8", "int8-bf16")}
QUANTIZED = ("int8", "int8-bf16", "fp8")  # precisions built from a quantized graph
GPU_PRECISIONS = ("fp16", "int8", "fp8")
ITERS = 20  # timed runs per measured candidate (a predicted search takes no other)


@dataclass(frozen=True)
class SearchSpace(Options):
    block_ratios: tuple[float, ...] = option((0.0, 0.25, 0.5), ge=0, lt=1, min_items=1, doc="fractions of blocks removed")
    token_keeps: tuple[float, ...] = option((1.0, 0.75, 0.5), gt=0, le=1, min_items=1, doc="fractions of patches kept")
    # None: what the device runs (cpu: fp32, int8)
    precisions: tuple[str, ...] | None = option(None, choices=("fp32", "bf16", "fp16", "int8", "int8-bf16", "fp8"), min_items=1)
    # the CPU runtimes of a measured cpu search; None: every one installed here (ort, and openvino
    # when `import openvino` works; when it does not, the result says so in `skipped`)
    runtimes: tuple[str, ...] | None = option(None, choices=tuple(RUNTIME_PRECISIONS), min_items=1,
                                              doc="CPU runtimes measured (device cpu): ort, openvino; null: every one installed here")
    nm: bool | None = None  # None: 2:4 candidates where the device has sparse tensor cores
    # fractions of MLP neurons removed (width stage, activation criterion)
    mlp_ratios: tuple[float, ...] = option((0.0,), ge=0, lt=1, min_items=1, doc="fractions of MLP neurons removed")
    # the width stage under a global MAC budget (heads and neurons allocated per block): MAC ratios kept
    width_macs: tuple[float, ...] = option((), gt=0, lt=1, doc="MAC ratios of a global width allocation (width stage macs)")
    width_criterion: str = option("activation", choices=("l2", "activation", "optin"),
                                  doc="criterion of the width_macs candidates (optin: OPTIN trajectory scores)")

    def __post_init__(self) -> None:
        # blocks 0,0,0.5 or keep 1,1.0: each distinct value once (duplicates would build and time
        # the same candidate twice and list it twice)
        for name in ("block_ratios", "token_keeps", "precisions", "mlp_ratios", "width_macs", "runtimes"):
            if isinstance(getattr(self, name), (list, tuple)):
                object.__setattr__(self, name, tuple(dict.fromkeys(getattr(self, name))))
        super().__post_init__()
        if self.width_criterion != "activation" and not self.width_macs:
            raise ConfigError(f"width_criterion {self.width_criterion} ranks width_macs candidates and there are none: "
                              "give width_macs or drop width_criterion", option=("width_criterion", "width_macs"))


@dataclass
class Candidate:
    blocks: float
    keep: float
    nm: bool
    precision: str
    runtime: str = "ort"  # ort | openvino (measured cpu), tensorrt (GPU devices)
    mlp: float = 0.0
    width_macs: float | None = None  # a global width allocation keeping this MAC ratio (instead of mlp)
    width_criterion: str = "activation"
    latency_ms: float | None = None
    latency_label: str = ""
    pooled_cosine_mean: float | None = None
    macs: float = 0.0
    pareto: bool = False
    error: str | None = None
    stages: list[dict[str, Any]] = field(default_factory=list)
    graph: Path | None = None  # measured searches: the graph timed after every candidate is built

    @property
    def label(self) -> str:
        parts = [*([f"MLP -{_pct(self.mlp)}"] if self.mlp else []),
                 *([f"width MACs x{self.width_macs:g} ({self.width_criterion})"] if self.width_macs else []),
                 f"blocks -{_pct(self.blocks)}" if self.blocks else "all blocks", f"tokens {_pct(self.keep)}",
                 *(["2:4"] if self.nm else []), self.precision, *(["OpenVINO"] if self.runtime == "openvino" else [])]
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "mlp_removed": self.mlp, "width_macs": self.width_macs, "blocks_removed": self.blocks, "token_keep": self.keep, "nm_2_4": self.nm,
                "precision": self.precision, "runtime": self.runtime, "latency_ms": self.latency_ms, "latency": self.latency_label,
                "pooled_cosine_mean": self.pooled_cosine_mean, "gmacs": round(self.macs / 1e9, 4), "pareto": self.pareto,
                "error": self.error}


def _pct(fraction: float) -> str:
    """50%, 12.5%, 0.1%: never "0%" for a fraction that keeps one patch of a thousand."""
    return f"{fraction * 100:.3g}%"


def _precisions(space: SearchSpace, prof) -> tuple[str, ...]:
    wanted = space.precisions or (CPU_PRECISIONS if prof.backend == "onnxruntime-cpu" else
                                  tuple(p for p in GPU_PRECISIONS if prof.supports(p)))
    if prof.backend == "onnxruntime-cpu" and set(wanted) - set(CPU_PRECISIONS):
        raise ConfigError(f"ONNX Runtime CPU runs fp32 and int8 graphs, not {sorted(set(wanted) - set(CPU_PRECISIONS))}: give precisions fp32,int8",
                          option="precisions")
    bad = [p for p in wanted if not prof.supports(p) or p not in CPU_PRECISIONS + GPU_PRECISIONS]
    if bad:
        raise ConfigError(f"device '{prof.name}' cannot run {bad} (it has {list(prof.precisions)}): drop them from precisions", option="precisions")
    return tuple(wanted)


def installed_runtimes() -> tuple[tuple[str, ...], list[dict[str, Any]]]:
    """The CPU runtimes a measured search runs by default: ort, and openvino when it imports here;
    a runtime left out is listed with the reason and the install hint."""
    import importlib

    try:
        importlib.import_module("openvino")
    except ImportError:
        from mimc.runtime.openvino import INSTALL_HINT

        return ("ort",), [{"runtime": "openvino", "precision": None,
                           "reason": f"OpenVINO is not installed, so only ONNX Runtime was measured: {INSTALL_HINT}"}]
    return ("ort", "openvino"), []


def candidate_pairs(space: SearchSpace, prof, predict: bool) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
    """(precision, runtime) of every candidate, and what was skipped here with the reason."""
    cpu = prof.backend == "onnxruntime-cpu"
    runtimes, skipped = space.runtimes, []
    if runtimes is not None and (not cpu or predict):
        raise ConfigError(f"runtimes {','.join(runtimes)} are measured on this CPU (device cpu, measured latency), "
                          f"not on {prof.name}{' predicted' if cpu else ''}: drop runtimes", option="runtimes")
    if runtimes is None:  # every CPU runtime installed here, for a measured cpu search; else what the device runs
        runtimes, skipped = installed_runtimes() if cpu and not predict else (("ort",), [])
        if space.precisions is not None and runtimes != ("ort",):  # asked precisions: the runtimes that run them
            runtimes = tuple(r for r in runtimes if set(space.precisions) & set(RUNTIME_PRECISIONS[r])) or runtimes
    if runtimes == ("ort",):
        return [(p, "ort" if cpu else "tensorrt") for p in _precisions(space, prof)], skipped
    from mimc.runtime.openvino import cpu_bf16, openvino

    openvino()  # not installed: the install hint, before anything is built
    runs = tuple(dict.fromkeys(p for r in runtimes for p in RUNTIME_PRECISIONS[r]))
    wanted = space.precisions or runs
    bad = [p for p in wanted if p not in runs]
    if bad:
        raise ConfigError(f"runtimes {','.join(runtimes)} run {sorted(runs)} on the CPU, not {bad}: drop them from "
                          "precisions", option="precisions")
    pairs = []
    for p in wanted:
        for r in runtimes:
            if p not in RUNTIME_PRECISIONS[r]:
                continue
            if r == "openvino" and p in ("bf16", "int8-bf16") and not (info := cpu_bf16())["supported"]:
                skipped.append({"runtime": r, "precision": p, "reason": "this CPU has neither AVX-512 BF16 nor AMX (OpenVINO "
                                f"capabilities {info['optimization_capabilities']}): {p} would not run natively"})
                continue
            pairs.append((p, r))
    if not pairs:
        raise ConfigError(f"no candidate of precisions {','.join(wanted)} runs here ({'; '.join(x['reason'] for x in skipped)}): "
                          "give other precisions", option="precisions")
    return pairs, skipped


__all__ = ["SearchSpace", "Candidate", "candidate_pairs", "installed_runtimes", "RUNTIME_PRECISIONS", "QUANTIZED", "ITERS"]
