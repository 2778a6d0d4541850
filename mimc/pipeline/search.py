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
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mimc.errors import ConfigError
from mimc.metrics import FidelityMeter
from mimc.options import plain
from mimc.pipeline.search_space import (ITERS, QUANTIZED, RUNTIME_PRECISIONS, Candidate, SearchSpace, candidate_pairs,
                                        installed_runtimes)


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
    pairs, skipped = candidate_pairs(space, prof, predict)
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


def recipe_of(result: dict[str, Any], model: str, data: str | dict[str, Any], n: int, seed: int, device: str | None = None) -> dict[str, Any] | None:
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
