"""The whole-pipeline verbs: run (a recipe into one artifact) and search (the fastest faithful recipe)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from mimc.api._model import _default_output, _load, _name
from mimc.api.reports import DictReport
from mimc.artifact import recorded_path
from mimc.atomic import atomic_dir, check_not_input, check_output
from mimc.errors import ConfigError
from mimc.train.dist import check_one_process


class RunReport(DictReport):
    """A recipe run: per stage its options, seconds and what it measured (also ``OUT/run.json``)."""


class SearchReport(DictReport):
    """Every candidate with its latency and fidelity, the Pareto front and the best one."""


def run(recipe, output=None, *, data: str | None = None, overwrite: bool = False, force: bool = False,
        on_stage: Callable | None = None, dry_run: bool = False) -> RunReport:
    """Run a recipe (a YAML path, an artifact folder to replay, a mapping, or a Recipe) into one artifact;
    ``data`` replaces its images. ``dry_run``: refuse what the run would refuse (output, model, images),
    run nothing and return the resolved recipe."""
    from mimc.artifact import is_artifact
    from mimc.pipeline.recipe_run import check_recipe_run, default_output, run_recipe

    source = recipe if isinstance(recipe, (str, os.PathLike)) else None
    recipe = _as_recipe(recipe, data)
    check_not_input(output if output is not None else default_output(recipe),
                    (recipe.model, recipe.data, source, getattr(recipe, "source_path", None)))
    if force and "quantize" not in {s.name for s in recipe.steps}:  # else it would do nothing, silently
        raise ConfigError("force keeps a quantized graph that misses its fidelity gate and the recipe has no quantize stage: "
                          "drop force", option="force")
    if dry_run:
        return RunReport(check_recipe_run(recipe, output, overwrite)[0].to_dict())
    report = run_recipe(recipe, output, overwrite=overwrite, force=force, on_stage=on_stage)
    replayed = getattr(recipe, "source_path", None)
    if replayed is not None and is_artifact(replayed):
        report["replay"] = _compare(Path(replayed), Path(report["output"]))
    return RunReport(report)


def _compare(old: Path, new: Path) -> dict[str, Any]:
    """Whether a replay reproduced the artifact it replayed: its weights and every graph both list (with
    the file of its weights: an IR's .bin, a graph's external data)."""
    from mimc.artifact import read_manifest

    before, after = read_manifest(old), read_manifest(new)
    hashes = [("model.safetensors", before.weights_sha256, after.weights_sha256)]
    files = lambda entry: (entry.get("sha256"), entry.get("external_data_sha256"))  # noqa: E731
    hashes += [(name, files(entry), files(after.files[name])) for name, entry in before.files.items() if name in after.files]
    return {"of": str(old), "identical": [n for n, a, b in hashes if a == b], "differ": [n for n, a, b in hashes if a != b]}


def recipe(source, data: str | None = None):
    """A validated :class:`~mimc.pipeline.recipe.Recipe` from a YAML path, an artifact folder (its
    recipe.yaml, else one assembled from mimc.json) or a mapping; ``data`` replaces its images."""
    return _as_recipe(source, data)


def _as_recipe(source, data: str | None):
    from dataclasses import replace

    from mimc.pipeline.recipe import Recipe, check_data, load_recipe, parse_recipe

    if isinstance(source, (Recipe, dict)):
        check_data(data)  # (load_recipe checks it for a path)
    if isinstance(source, Recipe):
        return replace(source, data=data) if data else source
    if isinstance(source, dict):
        return parse_recipe({**source, **({"data": data} if data else {})})
    if isinstance(source, (str, os.PathLike)):
        return load_recipe(source, data=data)
    raise ConfigError(f"a recipe is a YAML path, an artifact folder, a mapping or a Recipe, got {type(source).__name__}",
                      option="recipe")


def search(model="ref", device: str = "cpu", *, min_cosine: float = 0.98, budget_ms: float | None = None,
           data: str = "builtin", n: int = 64, n_eval: int = 64, space=None, iters: int = 20, seed: int = 0,
           output=None, overwrite: bool = False, on_candidate: Callable | None = None) -> SearchReport:
    """Build and measure every candidate of ``space`` (:class:`~mimc.pipeline.search_space.SearchSpace` or a mapping of its options);
    write ``search.json`` and the best candidate's ``recipe.yaml`` into ``output``. An Encoder in
    memory is named ``model`` (default output ``./model-search``; its recipe's model is to be filled in)."""
    import numpy as np
    import yaml

    from mimc.data import as_source, spec_of
    from mimc.latency.devices import load_profile
    from mimc.pipeline.recipe import DATA_OPTIONS
    from mimc.pipeline.search import recipe_of
    from mimc.pipeline.search import search as _search
    from mimc.pipeline.search_space import SearchSpace

    check_one_process("mimc search")
    for name, value in (("n", n), ("n_eval", n_eval), ("iters", iters)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}", option=name)
    space = SearchSpace.from_dict(space) if isinstance(space, dict) else space if space is not None else SearchSpace()
    if not isinstance(space, SearchSpace):
        raise ConfigError(f"space must be a SearchSpace or a mapping of its options, got {type(space).__name__}", option="space")
    load_profile(device)
    name = _name(model)
    out = Path(output) if output is not None else _default_output(model, "search")
    check_output(out, overwrite, inputs=(model, spec_of(data), device))
    encoder = _load(model)
    source = as_source(data, seed)
    images = source.draw(encoder.config, n + n_eval)
    data = spec_of(data)
    if len(images) <= n:
        raise ConfigError(f"{data} has {len(images)} images, fewer than n={n} plus held-out ones: lower n", option="n")
    calib, held = images.subset(np.arange(n)), images.subset(np.arange(n, len(images)))
    result = _search(encoder, device, held, calib, space, min_cosine=min_cosine, budget_ms=budget_ms, iters=iters,
                     on_candidate=on_candidate)
    # a local model, data or profile .yaml is named by its absolute path: the recipe may run from another folder
    spec = str(Path(device).resolve()) if Path(device).suffix in (".yaml", ".yml") and Path(device).is_file() else device
    reading = {k: v for k in DATA_OPTIONS if (v := getattr(source, k)) is not None and v is not False}  # workers 0 kept
    recipe = recipe_of(result, recorded_path(_name(model, None)) or name,
                       {"path": recorded_path(data), **reading} if reading else recorded_path(data), n, seed, device=spec)
    result = {"model": name, "data": data, **result, "output": str(out)}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "search.json").write_text(json.dumps({k: v for k, v in result.items() if k != "output"}, indent=2) + "\n")
        if recipe is not None:
            (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None))
    return SearchReport(result)


def profiles(device: str | None = None) -> list[Any]:
    """The device profiles mimc knows (shipped), or the one named (a name or a .yaml path)."""
    from mimc.latency.devices import available_profiles, load_profile

    check_one_process("mimc profiles")
    return [load_profile(device)] if device else [load_profile(n) for n in available_profiles()]


__all__ = ["run", "recipe", "search", "profiles", "RunReport", "SearchReport"]
