"""Run a :class:`mimc.pipeline.recipe.Recipe`: model stages in memory, then graph stages in one artifact.

Everything is checked before the first stage runs (options, stage order, output folder, model,
images), the artifact is built in a temporary folder that becomes the output only when every stage
succeeded, and the output holds the weights, ``mimc.json`` (every stage's record), the graphs, the
resolved ``recipe.yaml`` (replay it with ``mimc run OUT/recipe.yaml`` or ``mimc run OUT``) and
``run.json``: per stage its options, seconds and what it measured (fidelity for every stage that
changes the model; latency against the dense source for ``profile``).
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from mimc.artifact import atomic_dir, check_output, save_artifact
from mimc.errors import BadInputError, ConfigError
from mimc.pipeline.recipe import RECIPE_NAME, RUN_REPORT_NAME, ExportOptions, Recipe, Step


def default_output(recipe: Recipe) -> Path:
    from mimc.models.resolve import model_slug  # the shared default-name rule

    return Path(recipe.output) if recipe.output else Path(f"{model_slug(recipe.model)}-recipe")


def _check_graph_needs(recipe: Recipe) -> None:
    kinds = [s.kind for s in recipe.steps]
    for step in recipe.steps:
        if step.kind == "profile" and step.config.graph is None and not ({"export", "quantize"} & set(kinds)):
            raise ConfigError("recipe: 'profile' measures a graph: add an 'export' (or 'quantize') stage before it")


def _check_not_source(recipe: Recipe, out: Path) -> None:
    """Overwriting the recipe's own model would leave a recipe.yaml whose model is the result itself:
    its replay would compress the output again instead of rebuilding it."""
    model = Path(recipe.model).expanduser()  # as models.resolve reads it; 'ref' is never a path
    if recipe.model != "ref" and model.exists() and out.exists() and (model.resolve() == out.resolve() or out.resolve() in model.resolve().parents):
        raise BadInputError(f"output {out} is the recipe's model {recipe.model}: write to another -o "
                            "(replacing the source would leave a recipe that cannot rebuild the result)")


def _check_masking(recipe: Recipe, source) -> None:
    """Learning stages that mask input patches need every token and absolute positions; a tokens
    stage before them (or a BEiT-style source) rules that out. Found here, not after the stages ran."""
    from mimc.train.engine import supports_masking

    can_mask = supports_masking(source)
    for i, step in enumerate(recipe.steps, 1):
        if step.kind == "tokens":
            can_mask = False
        ratio = getattr(step.config, "mask_ratio", 0.0) if step.kind == "distill" else \
            (step.config.learned.mask_ratio if step.kind == "sparsify" and step.config.method == "learned" else 0.0)
        if ratio and not can_mask:
            why = "a tokens stage comes before it" if supports_masking(source) else "the model has a relative position bias or a token schedule"
            option = "mask_ratio: 0" if step.kind == "distill" else "learned: {mask_ratio: 0}"
            raise ConfigError(f"recipe: stage {i} ({step.kind}) masks {ratio:.0%} of the patches, which needs every token "
                              f"and absolute positions, but {why}: set {option} in its options")


def run_recipe(recipe: Recipe, output: str | Path | None = None, overwrite: bool = False, force: bool = False,
               on_stage: Callable[[int, Step], None] | None = None) -> dict[str, Any]:
    """Run every stage; returns the run report (also written to ``OUT/run.json``)."""
    from mimc.compression.registry import compress
    from mimc.models.resolve import load_model
    from mimc.train import run_options

    out = Path(output) if output is not None else default_output(recipe)
    check_output(out, overwrite)
    _check_graph_needs(recipe)
    _check_not_source(recipe, out)
    start = time.perf_counter()
    source = load_model(recipe.model)
    _check_masking(recipe, source)
    images = _images(recipe, source.config) if recipe.needs_data else None
    report: dict[str, Any] = {"recipe": recipe.to_dict(), "output": str(out), "stages": []}
    if recipe.note:
        report["note"] = recipe.note
    encoder = source
    for i, step in enumerate(recipe.steps, 1):
        if not step.is_model_stage:
            break
        if on_stage is not None:
            on_stage(i, step)
        batches = list(images.batches(64)) if step.config.needs_data else None
        # distill's teacher is the recipe's source model (the dense encoder the run started from)
        with run_options(teacher=source):
            encoder, record = compress(encoder, step.config, batches)
        report["stages"].append({"stage": step.kind, "options": step.config.to_dict(), "seconds": record.seconds,
                                 "metrics": record.metrics})
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_artifact(encoder, tmp, overwrite=True)
        last_graph: Path | None = None
        export_options = None
        for i, step in enumerate(recipe.steps, 1):
            if step.is_model_stage:
                continue
            if on_stage is not None:
                on_stage(i, step)
            t = time.perf_counter()
            if step.kind == "export":
                entry, last_graph = _export(encoder, tmp, step.config), tmp / "model.onnx"
                export_options = step.config
            elif step.kind == "quantize":
                entry = _quantize(tmp, step.config, recipe, force)
                last_graph = tmp / entry["file"]
            elif step.kind == "profile":
                entry = _profile(tmp, _graph(tmp, step.config.graph, last_graph), step.config, source, export_options)
            else:
                entry = _eval(tmp, _graph(tmp, step.config.graph, last_graph), step.config, encoder, source, recipe)
            report["stages"].append({"stage": step.kind, "options": step.config.to_dict(),
                                     "seconds": round(time.perf_counter() - t, 3), **entry})
        report["seconds"] = round(time.perf_counter() - start, 3)
        _write_yaml(tmp / RECIPE_NAME, {k: v for k, v in recipe.to_dict().items() if k != "output"})
        (tmp / RUN_REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def _images(recipe: Recipe, cfg):
    from mimc.quant.quantize_flow import check_model_inputs_file
    from mimc.data import load_images

    check_model_inputs_file(recipe.data, cfg)  # wrong size / channels: one line, before any work
    return load_images(recipe.data, cfg, n=recipe.n, seed=recipe.seed)


def _graph(tmp: Path, name: str | None, last: Path | None) -> Path | None:
    if name is None:
        return last
    path = tmp / name
    if not path.is_file():
        raise BadInputError(f"graph '{name}' was not written by an earlier stage of this recipe: "
                            f"choose one of {sorted(p.name for p in tmp.glob('*.onnx'))}")
    return path


def _export(encoder, tmp: Path, options) -> dict[str, Any]:
    from mimc.deploy.onnx import export_onnx

    rep = export_onnx(encoder, tmp / "model.onnx", batch=options.batch, opset=options.opset, exporter=options.exporter)
    return {"file": "model.onnx", "validation": rep.get("validation")}


def _quantize(tmp: Path, config, recipe: Recipe, force: bool) -> dict[str, Any]:
    from mimc.quant.quantize_flow import quantize_model

    rep = quantize_model(str(tmp), config, recipe.data, seed=recipe.seed, force=force)
    return {"file": rep["file"], "validation": rep["validation"], "fused_attention_blocks": rep.get("fused_attention_blocks", 0),
            "calibration_sha256": rep["calibration_sha256"]}


def _profile(tmp: Path, graph: Path, options, source, export_options) -> dict[str, Any]:
    """The graph and, with ``baseline``, the dense source exported the same way, profiled alike."""
    from mimc.deploy.onnx import export_onnx
    from mimc.latency.run import profile

    kwargs = dict(device=options.device, predict=options.predict, batch_sizes=list(options.batch_sizes) or None,
                  warmup=options.warmup, iters=options.iters, threads=options.threads, precision=options.precision)
    entry: dict[str, Any] = {"file": graph.name, "result": profile(graph, **kwargs)}
    if options.baseline:
        with tempfile.TemporaryDirectory(prefix=".mimc-baseline.") as base_dir:
            base = Path(base_dir) / "dense.onnx"
            # the export stage's batch, opset and exporter: a dynamo / opset-18 graph is not timed
            # against a torchscript / opset-17 one (quantize without export exports the defaults)
            same = export_options if export_options is not None else ExportOptions()
            export_onnx(source, base, batch=same.batch, opset=same.opset, exporter=same.exporter, validate=False)
            entry["baseline"] = profile(base, **kwargs)
            if entry["result"].get("label") == "measured" and entry["result"].get("backend") == "onnxruntime-cpu":
                # The two reports above come from separate worker runs, one after the other; the ratio
                # is taken from both graphs timed together in alternating rounds instead.
                from mimc.runtime.ort import time_interleaved

                dense_ms, graph_ms = time_interleaved([base, graph], iters=options.iters, threads=options.threads)
                entry["interleaved_ms"] = {"dense": dense_ms, "graph": graph_ms}
                entry["speedup_vs_dense"] = round(dense_ms / graph_ms, 3)
            else:  # predicted, or measured on a GPU: the two reports' own latencies
                entry["speedup_vs_dense"] = _speedup(entry["baseline"], entry["result"])
    return entry


def _latency(report: dict[str, Any]) -> float | None:
    results = report.get("results") or []
    first = results[0] if results else {}
    for key in ("p50_ms", "latency_ms"):  # measured, predicted
        if isinstance(first.get(key), (int, float)):
            return float(first[key])
    return None


def _speedup(baseline: dict[str, Any], result: dict[str, Any]) -> float | None:
    a, b = _latency(baseline), _latency(result)
    return round(a / b, 3) if a and b else None


def _eval(tmp: Path, graph: Path | None, options, encoder, source, recipe: Recipe) -> dict[str, Any]:
    from mimc.evaluate import evaluate, load_for_eval

    model = load_for_eval(str(graph)) if graph is not None else encoder
    rep = evaluate(model, source, data=recipe.data or "builtin", n=options.n, seed=recipe.seed, batch_size=options.batch_size)
    return {"file": graph.name if graph is not None else "model.safetensors", **rep}


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=None))


__all__ = ["run_recipe", "default_output"]
