"""Search: which combination of blocks, tokens, N:M and precision is fastest at a required fidelity.

Every candidate is built for real and measured, never guessed:

- the model stages run through :func:`mimc.compression.registry.compress` (block pruning by entropy,
  MAE-native grid patch dropping, one-shot 2:4 Wanda where the device has sparse tensor cores),
  each prefix computed once and shared by the candidates built on it;
- fidelity is the mean pooled-feature cosine to the dense source on held-out images (disjoint
  from the calibration images), through the graph that would ship: the fp32 ONNX graph, mimc's CPU
  int8 graph, or the TensorRT Q/DQ graph run as its exact fp32 emulation on ONNX Runtime (each on
  ONNX Runtime, or OpenVINO for its candidates); fp16 in torch half precision;
- latency is measured on this CPU for ``--device cpu``, else predicted by the roofline of the
  device profile (labelled "predicted" per candidate, never mixed). Measured candidates are timed
  together once all are built: one warmed ONNX Runtime session or OpenVINO compiled model each, all
  in this process, timed in alternating rounds (forward, then reverse order), the median of every
  timed run — so a load spike on a shared machine lands on all candidates alike instead of on
  whichever was being timed then;
- the CPU runtime is a dimension (``runtimes``: ONNX Runtime, and OpenVINO when it imports; what each
  runs, and how an OpenVINO candidate is judged and rebuilt: README "Search").

The result lists every candidate, marks the Pareto front (no other candidate is both faster and
more faithful) and picks the fastest one at or above ``min_cosine``, saying whether it meets the
latency budget; its recipe (mimc.pipeline.recipe) rebuilds it: ``mimc run OUT/recipe.yaml``.

References: the Pareto/latency-constrained selection follows hardware-aware compression search
as in HAQ (Wang et al., CVPR 2019) and AMC (He et al., ECCV 2018), here exhaustive over a small
grid because each point is cheap to build and must be measured, not learned.
"""
from __future__ import annotations

import itertools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mimc.errors import ConfigError
from mimc.options import Options, option, plain
from mimc.metrics import FidelityMeter

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


def _pairs(space: SearchSpace, prof, predict: bool) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
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


def search(encoder, device: str, images, calib, space: SearchSpace = SearchSpace(), min_cosine: float = 0.98,
           budget_ms: float | None = None, predict: bool | None = None, iters: int = ITERS,
           on_candidate: Callable[[int, int, Candidate], None] | None = None) -> dict[str, Any]:
    """Build, measure and rank every candidate of ``space`` for ``device`` (see the module docstring).

    ``images``: held-out ImageSet for fidelity; ``calib``: calibration ImageSet (int8/fp8, Wanda).
    """
    from mimc.latency.devices import load_profile

    prof = load_profile(device)
    if prof.backend == "openvino-cpu":  # was searched as a GPU: TensorRT int8 graphs, runtime tensorrt, predicted
        raise ConfigError(f"device {prof.name} runs OpenVINO on this CPU, which a search measures with device cpu "
                          "(runtimes openvino for OpenVINO alone): give device cpu", option=("device", "runtimes"))
    number = lambda x: not isinstance(x, bool) and isinstance(x, (int, float))  # (after plain(): numpy numbers are Python ones)
    min_cosine, budget_ms = plain(min_cosine), plain(budget_ms)
    if not number(min_cosine) or not 0.0 < min_cosine <= 1.0:
        raise ConfigError(f"min_cosine must be in (0, 1], got {min_cosine!r}: e.g. 0.98", option="min_cosine")
    if budget_ms is not None and (not number(budget_ms) or not 0 < budget_ms < float("inf")):
        raise ConfigError(f"budget_ms must be a positive number of milliseconds, got {budget_ms}: e.g. 5", option="budget_ms")
    predict = prof.backend != "onnxruntime-cpu" if predict is None else predict
    if predict and iters != ITERS:
        raise ConfigError(f"iters times measured candidates, and this search on {prof.name} predicts their latency: drop iters", option="iters")
    pairs, skipped = _pairs(space, prof, predict)
    if not predict and prof.backend != "onnxruntime-cpu":
        from mimc.latency.run import cuda_available

        if not cuda_available():
            raise ConfigError(f"device {prof.name} is not here (no CUDA GPU): search it with predicted latency (predict=None or True)")
        raise ConfigError(f"measured search on {prof.name} is not built yet (it needs TensorRT engines per candidate): use predicted latency")
    nm_options = (False, True) if (space.nm if space.nm is not None else prof.sparse_tensor_cores) else (False,)
    if True in nm_options and not prof.sparse_tensor_cores:
        raise ConfigError(f"device {prof.name} has no sparse tensor cores: 2:4 weights would not run faster there; turn nm off", option="nm")
    dense_feats = _torch_features(encoder, images)
    widths = [(r, None) for r in space.mlp_ratios] + [(0.0, m) for m in space.width_macs]
    grid = list(itertools.product(widths, space.block_ratios, space.token_keeps, nm_options, pairs))
    cache: dict[tuple, Any] = {}
    graphs: dict[tuple, tuple[Path, bool, list]] = {}  # one export / quantization shared by the runtimes
    candidates = []
    with tempfile.TemporaryDirectory(prefix=".mimc-search.") as tmp_dir:
        for i, ((mlp, width_macs), blocks, keep, nm, (precision, runtime)) in enumerate(grid, 1):
            cand = Candidate(blocks, keep, nm, precision, runtime=runtime, mlp=mlp, width_macs=width_macs,
                             width_criterion=space.width_criterion)
            if on_candidate is not None:
                on_candidate(i, len(grid), cand)
            try:
                model = _model(encoder, cand, calib, cache)
                _measure(cand, model, prof, predict, images, calib, dense_feats, Path(tmp_dir) / f"c{i}", graphs)
            except ConfigError as exc:  # e.g. more tokens dropped than the model has: recorded, search goes on
                cand.error = str(exc)
            candidates.append(cand)
        ok = [c for c in candidates if c.error is None]
        if not predict:  # median batch-1 latency of every built graph, timed together in alternating rounds
            _time_together(ok, iters, prof.threads_here())
    for c in ok:
        c.pareto = not any(o is not c and o.latency_ms <= c.latency_ms and o.pooled_cosine_mean >= c.pooled_cosine_mean
                           and (o.latency_ms < c.latency_ms or o.pooled_cosine_mean > c.pooled_cosine_mean) for o in ok)
    best = min((c for c in ok if c.pooled_cosine_mean >= min_cosine), key=lambda c: c.latency_ms, default=None)
    measured = list(dict.fromkeys(r for _, r in pairs))  # the runtimes the candidates ran on
    runtimes = "ONNX Runtime and OpenVINO CPU, one process" if "openvino" in measured else "ONNX Runtime CPU"
    return {"device": prof.name, "latency": "predicted (roofline)" if predict else f"measured ({runtimes})",
            "runtimes": measured, "skipped": skipped, "min_cosine": min_cosine, "budget_ms": budget_ms, "n_eval_images": len(images),
            "candidates": [c.to_dict() for c in candidates],
            "best": best.to_dict() if best else None, "best_stages": best.stages if best else None,
            "meets_budget": None if best is None or budget_ms is None else bool(best.latency_ms <= budget_ms),
            "note": None if best else f"no candidate reaches pooled cosine {min_cosine}: lower the minimum cosine or widen the grid"}


def _model(encoder, cand: Candidate, calib, cache: dict):
    """The candidate's encoder, built by the pipeline's executor; prefixes (width, blocks, tokens,
    2:4) are built once and shared through ``cache``."""
    from mimc.compression.blocks import BlockPruningConfig
    from mimc.compression.nm import NMSparsityConfig
    from mimc.compression.tokens import TokenReductionConfig
    from mimc.compression.width import WidthPruningConfig
    from mimc.data import ImageSource
    from mimc.pipeline.executor import Job, apply_model_stages

    steps = []
    if cand.mlp:  # the activation criterion: 4x less feature error than weight norms on `ref` (ref_width_table)
        steps.append(WidthPruningConfig(mlp=cand.mlp, criterion="activation"))
    if cand.width_macs:
        steps.append(WidthPruningConfig(macs=cand.width_macs, criterion=cand.width_criterion))
    if cand.blocks:
        steps.append(BlockPruningConfig(ratio=cand.blocks))
    if cand.keep < 1.0:
        steps.append(TokenReductionConfig(method="drop", keep=cand.keep))
    if cand.nm:
        steps.append(NMSparsityConfig(method="wanda", n_calib=len(calib)))
    job = Job(source=encoder, stages=steps, images=ImageSource.of(calib), n=None, batch_size=32)
    model, _ = apply_model_stages(encoder, steps, job, cache=cache)
    cand.stages += [{config.name: config.to_dict()} for config in steps]
    return model


def _measure(cand: Candidate, model, prof, predict: bool, images, calib, dense_feats, tmp: Path, graphs: dict):
    from mimc.models.vit import flops_per_image

    precision = cand.precision
    cand.macs = float(flops_per_image(model.config))
    # a model's fp32 graph is exported once, whichever runtime reads it; the int8 graph differs
    # (ORT: QAttention-fused; OpenVINO: the openvino target's plain Q/DQ, which its frontend reads)
    quantized = precision in QUANTIZED
    # int8 and int8-bf16 on OpenVINO compile the same graph
    key = (cand.mlp, cand.width_macs, cand.width_criterion, cand.blocks, cand.keep, cand.nm,
           (precision.split("-")[0], cand.runtime) if quantized else "float")
    if key not in graphs:
        graphs[key] = _graph(model, precision, cand.runtime, prof, images, calib, tmp)
    graph, emulate, stages = graphs[key]
    cand.stages += stages
    if cand.runtime == "openvino":  # through the compiled model that ships, at its precision
        feats = _graph_features(graph, images, False, runtime="openvino", precision=precision, threads=prof.threads_here())
    elif precision == "fp16":  # (a TensorRT fp16 engine is not built here: torch half precision stands in)
        feats = _torch_features(model, images, half=True)
    else:
        feats = _graph_features(graph, images, emulate)
    meter = FidelityMeter()
    meter.update(feats, dense_feats)
    cand.pooled_cosine_mean = round(meter.result().pooled_cosine_mean, 6)
    if predict:
        from mimc.latency.roofline import predict as roofline

        rep = roofline(graph, prof, batch=1, precision="fp16" if precision == "fp16" else None)
        cand.latency_ms, cand.latency_label = round(float(rep["latency_ms"]), 4), "predicted"
    else:
        cand.graph, cand.latency_label = graph, "measured"  # timed with the others once all are built


def _graph(model, precision: str, runtime: str, prof, images, calib, tmp: Path) -> tuple[Path, bool, list[dict[str, Any]]]:
    """The batch-1 graph that ships (fp32, or mimc's int8/fp8 Q/DQ graph), whether it runs as its
    fp32 emulation here (TensorRT Q/DQ), and the recipe stages that build it. OpenVINO's int8 graph
    is the openvino target's Q/DQ layout (mimc.quant.quantize), judged through OpenVINO."""
    from mimc.pipeline.graph_stages import GraphContext, export_stage, quantize_split
    from mimc.pipeline.stages import ExportConfig

    tmp.mkdir(parents=True)
    # the pipeline's export stage, unvalidated: fidelity is measured through the graph that ships
    ctx = GraphContext(folder=tmp, encoder=model, export_options={"validate": False})
    fp32 = Path(export_stage(ctx, ExportConfig(batch=1))["report"]["path"])
    stages: list[dict[str, Any]] = [{"export": {"batch": 1}}]
    if precision not in QUANTIZED:
        return fp32, False, stages
    from mimc.quant.config import QuantizeConfig

    target = "openvino" if runtime == "openvino" else "cpu" if prof.backend == "onnxruntime-cpu" else "tensorrt"
    config = QuantizeConfig(precision=precision.split("-")[0], n=len(calib), target=target)
    graph = tmp / f"model.{config.precision}.onnx"
    quantize_split(fp32, graph, calib, images, config, True, calib.source, batch_size=8)
    return graph, target == "tensorrt", stages + [{"quantize": config.to_dict()}]


def _time_together(built: list[Candidate], iters: int, threads: int | None) -> None:
    """Every built candidate's median batch-1 latency: ORT sessions and OpenVINO compiled models
    warmed side by side in this process, then timed in the same alternating rounds."""
    import os

    from mimc.runtime import openvino, ort, timing

    threads = threads or os.cpu_count() or 1  # one thread count for both runtimes
    runs = [openvino.runner(c.graph, c.precision, threads) if c.runtime == "openvino" else ort.runner(c.graph, threads)
            for c in built]
    for c, ms in zip(built, timing.interleave(runs, iters=iters)):
        c.latency_ms = ms


def _torch_features(model, images, half: bool = False) -> np.ndarray:
    import copy

    import torch

    from mimc.evaluation import features

    if not half:
        return features(model, images).numpy().astype(np.float64)
    m = copy.deepcopy(model).half()
    with torch.no_grad():
        out = [m(x.half()).pooled.float() for x in images.batches(32)]
    return torch.cat(out).numpy().astype(np.float64)


def _graph_features(path: Path, images, emulate: bool, runtime: str = "ort", precision: str = "fp32",
                    threads: int | None = None) -> np.ndarray:
    """Pooled features from a batch-1 graph; ``emulate`` runs Q/DQ as its exact fp32 math (no fusion);
    ``runtime`` openvino: through an OpenVINO compiled model at ``precision``."""
    if runtime == "openvino":
        from mimc.runtime.openvino import OpenVinoSession

        sess = OpenVinoSession(path, precision, threads)
    else:
        from mimc.runtime.session import make_session

        sess = make_session(path, emulate_qdq=emulate)
    names = [o.name for o in sess.get_outputs()]
    pixels = images.pixels.numpy()
    pooled = [sess.run(None, {sess.get_inputs()[0].name: pixels[i : i + 1]})[names.index("pooled")][0] for i in range(len(pixels))]
    return np.stack(pooled).astype(np.float64)


def recipe_of(result: dict[str, Any], model: str, data: str, n: int, seed: int, device: str | None = None) -> dict[str, Any] | None:
    """The recipe (mimc.pipeline.recipe format) that rebuilds the best candidate, profiled and evaluated
    (an OpenVINO candidate: its IR, built by a ``build`` stage, is what is profiled and evaluated).

    ``device``: the profile as the user named it (a name or a .yaml path; default the profile's
    name, which only finds built-in profiles). The quantize stage keeps the search's calibration
    count ``n``; the run draws its own images, so its eval stage re-measures the fidelity.
    """
    if not result.get("best_stages"):
        return None
    stages = [dict(s) for s in result["best_stages"]]
    predicted = result["latency"].startswith("predicted")
    profile = {"device": device or result["device"], "predict": predicted}
    if result["best"].get("runtime") == "openvino":
        # measured on OpenVINO: the IR is the deployable, built at its precision; profile and eval run it
        stages.append({"build": {"device": "openvino-cpu", "precision": result["best"]["precision"]}})
        profile = {"device": "openvino-cpu", "predict": False}
    elif predicted and result["best"]["precision"] == "fp16":
        profile["precision"] = "fp16"  # the fp32 graph priced as the fp16 engine TensorRT builds from it
    stages += [{"profile": profile}, {"eval": {}}]
    return {"model": model, "data": data, "n": n, "seed": seed, "stages": stages}


__all__ = ["SearchSpace", "Candidate", "search", "recipe_of", "installed_runtimes", "RUNTIME_PRECISIONS"]
