"""Run a :class:`mimc.pipeline.recipe.Recipe` through the executor into one artifact.

Everything is checked before the first stage runs (options, stage order, output folder, model,
images); the artifact holds the weights, ``mimc.json`` (every stage's record), the graphs, the
resolved ``recipe.yaml`` (replay it with ``mimc run OUT/recipe.yaml`` or ``mimc run OUT``) and
``run.json``: per stage its options, seconds and what it measured.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from mimc.artifact import recorded_path
from mimc.atomic import check_output
from mimc.data import ImageSource
from mimc.errors import BadInputError, ConfigError, MimcError
from mimc.latency.devices import load_profile
from mimc.models.resolve import load_model, model_slug
from mimc.train.dist import check_one_process

from mimc.pipeline.recipe import TOP_LEVEL_KEYS, Recipe, Step, stage_key


def default_output(recipe: Recipe) -> Path:
    """The recipe's ``output``, else ``./<model>-recipe`` (model_slug: the default-name rule every command shares)."""
    return Path(recipe.output) if recipe.output else Path(f"{model_slug(recipe.model)}-recipe")


def _check_runtimes(recipe: Recipe) -> None:
    """What a build (and a measured OpenVINO profile) needs on this machine, found before any stage runs:
    OpenVINO installed and, for bf16, a CPU that runs it; TensorRT installed for an engine. The errors
    are the runtimes' own, naming the recipe key."""
    for i, step in enumerate(recipe.steps):
        if step.name not in ("build", "profile") or getattr(step.config, "predict", False):
            continue
        backend = load_profile(step.config.device).backend
        try:
            if backend == "openvino-cpu":
                from mimc.runtime.openvino import check_precision, openvino

                openvino()
                if step.config.precision is not None:
                    check_precision(step.config.precision)
            elif step.name == "build" and backend == "tensorrt":
                from mimc.runtime.trt import import_tensorrt

                import_tensorrt()
        except MimcError as exc:
            raise _in_recipe(exc, i, step.name) from None


def _in_recipe(exc: MimcError, i: int | None, name: str | None = None) -> MimcError:
    """``exc`` of stage ``i`` with the options it names written as their recipe keys (``stages[1].width.macs``;
    the recipe's own keys, such as data, as they are; ``i`` None: reading its images, ``data.workers``):
    no option name is left for the CLI to word as a flag."""
    names = {o: o if o in TOP_LEVEL_KEYS else stage_key(i, name, o) if i is not None else f"data.{o}" for o in exc.options}
    return type(exc)(f"recipe: {exc.phrased(names)}" if names or i is None else f"recipe: {stage_key(i, name)}: {exc}")


def _check_not_source(recipe: Recipe, out: Path) -> None:
    """Overwriting the recipe's own model would leave a recipe.yaml whose model is the result itself:
    its replay would compress the output again instead of rebuilding it."""
    model = Path(recipe.model).expanduser()  # as models.resolve reads it; 'ref' is never a path
    if recipe.model != "ref" and model.exists() and out.exists() and (model.resolve() == out.resolve() or out.resolve() in model.resolve().parents):
        raise BadInputError(f"output {out} is the recipe's model {recipe.model}: write to another output "
                            "(replacing the source would leave a recipe that cannot rebuild the result)")


def _check_masking(recipe: Recipe, source) -> None:
    """Learning stages that mask input patches need every token and absolute positions; a tokens
    stage before them (or a BEiT-style source) rules that out. Found here, not after the stages ran."""
    from mimc.train.engine import supports_masking

    can_mask = supports_masking(source)
    for i, step in enumerate(recipe.steps, 1):
        if step.name == "tokens":
            can_mask = False
        ratio = getattr(step.config, "mask_ratio", 0.0) if step.name == "distill" else \
            (step.config.learned.mask_ratio if step.name == "sparsify" and step.config.method == "learned" else 0.0)
        if ratio and not can_mask:
            why = "a tokens stage comes before it" if supports_masking(source) else "the model has a relative position bias or a token schedule"
            option = "mask_ratio: 0" if step.name == "distill" else "learned: {mask_ratio: 0}"
            raise ConfigError(f"recipe: {stage_key(i - 1, step.name)} masks {ratio:.0%} of the patches, which needs every token "
                              f"and absolute positions, but {why}: set {option} in its options")


def _check_tokens(recipe: Recipe, source) -> None:
    """A model that reduces tokens (the source, or after a tokens stage) takes no prune and no other tokens
    stage: found here, not by the stage once the stages before it ran."""
    reduced = bool(source.config.token_schedule)
    for i, step in enumerate(recipe.steps):
        if reduced and step.name in ("prune", "tokens"):
            raise ConfigError(f"recipe: {stage_key(i, step.name)}: the model reduces tokens already (the recipe's model or a tokens "
                              "stage before it): put prune before the tokens stage, and reduce tokens once")
        reduced = reduced or step.name == "tokens"


def _check_val(recipe: Recipe, source) -> None:
    """An eval stage's ``val`` images are opened (one decoded) before any stage runs."""
    for i, step in enumerate(recipe.steps):
        if step.name == "eval" and step.config.val is not None:
            try:
                ImageSource(step.config.val, recipe.seed).draw(source.config, 1)
            except MimcError as exc:
                raise ConfigError(f"recipe: {stage_key(i, 'eval', 'val')}: {exc}") from None


def _absolute(config):
    """A stage's options with the local files they name (eval's val, a device profile .yaml) as absolute paths."""
    device = getattr(config, "device", None)
    paths = {"val": recorded_path(getattr(config, "val", None)),
             "device": recorded_path(device) if str(device).endswith((".yaml", ".yml")) else device}
    changed = {k: v for k, v in paths.items() if hasattr(config, k) and v != getattr(config, k)}
    return replace(config, **changed) if changed else config


def check_recipe_run(recipe: Recipe, output: str | Path | None = None, overwrite: bool = False):
    """Everything a run checks before its first stage (a dry run stops here): the recipe with local
    paths made absolute, the output folder, the source model and the images."""
    check_one_process("mimc run", "recipe: a recipe")  # else every rank runs every stage into one folder
    out = Path(output) if output is not None else default_output(recipe)
    # a model / data (and a stage's val or profile .yaml) that names a local path is written absolute into recipe.yaml: the replay may run from another folder
    recipe = replace(recipe, model=recorded_path(recipe.model), data=recorded_path(recipe.data),
                     steps=[Step(_absolute(s.config)) for s in recipe.steps])
    check_output(out, overwrite)
    _check_runtimes(recipe)
    _check_not_source(recipe, out)
    source = load_model(recipe.model)
    _check_masking(recipe, source)
    _check_tokens(recipe, source)
    try:
        images = ImageSource(recipe.data, recipe.seed, **recipe.data_options) if recipe.data is not None else None
        if recipe.needs_data:
            images.draw(source.config, recipe.n)  # unreadable or mis-shaped images: one line, before any work
    except MimcError as exc:
        raise _in_recipe(exc, None) from None
    _check_val(recipe, source)
    return recipe, out, source, images


def run_recipe(recipe: Recipe, output: str | Path | None = None, overwrite: bool = False, force: bool = False,
               on_stage: Callable[[int, Step], None] | None = None) -> dict[str, Any]:
    """Run every stage; returns the run report (also written to ``OUT/run.json``)."""
    from mimc.pipeline.executor import Job, execute

    recipe, out, source, images = check_recipe_run(recipe, output, overwrite)
    job = Job(source=source, stages=[s.config for s in recipe.steps], images=images, n=recipe.n, seed=recipe.seed,
              force=force)
    running = [0]  # the 1-based stage under way

    def started(i: int, config) -> None:
        running[0] = i
        if on_stage is not None:
            on_stage(i, recipe.steps[i - 1])

    try:
        result = execute(job, out, overwrite=overwrite, recipe=recipe, on_stage=started)
    except MimcError as exc:
        if not running[0]:
            raise
        raise _in_recipe(exc, running[0] - 1, recipe.steps[running[0] - 1].name) from None
    return result.report


__all__ = ["run_recipe", "check_recipe_run", "default_output"]
