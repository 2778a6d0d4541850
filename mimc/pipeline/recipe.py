"""Recipes: a whole compression run as one YAML file, validated before any work, replayable.

```yaml
model: ref                 # any MODEL argument (ref, an artifact, an HF folder, a hub id, a timm checkpoint)
data: builtin              # images for stages that need them, quantize calibration and eval
n: 256                     # images drawn from data for data-driven model stages
seed: 0
output: out/ref-recipe     # the artifact directory (the CLI's -o overrides it)
stages:
  - prune: {ratio: 0.5}                   # model stages, in order: prune, width, tokens, sparsify, distill, smooth, repq
  - tokens: {method: drop, keep: 0.5}
  - export: {batch: 1}                    # then graph stages: export, quantize, profile, eval
  - quantize: {method: percentile}
  - profile: {device: cpu}
  - eval: {}
```

A ``build`` stage (after export / quantize) makes the deployable ``mimc build`` makes (README "Recipes");
profile and eval after it measure that deployable.

Every stage's options are a frozen dataclass: the model stages' are the registry's
(mimc.compression.registry), the graph stages' are in mimc.pipeline.stages. ``mimc run`` writes the resolved
recipe (every option spelled out) into the artifact as ``recipe.yaml``, so the run can be replayed
exactly; :func:`recipe_from_artifact` rebuilds a recipe from any artifact's ``mimc.json`` (stages and
exported graphs), including ones written stage by stage with the single commands.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mimc.artifact import MANIFEST_NAME, is_artifact, read_manifest
from mimc.data.shards import is_shard_spec
from mimc.errors import BadInputError, ConfigError, DataError, clip
from mimc.latency.devices import load_profile
from mimc.options import StageConfig, plain
from mimc.pipeline.stages import GRAPH_STAGES, BuildConfig, ExportConfig, EvalConfig, ProfileConfig, config_from_dict
from mimc.yamlfile import read_yaml

RECIPE_NAME = "recipe.yaml"
RUN_REPORT_NAME = "run.json"


TOP_LEVEL_KEYS = ("model", "data", "n", "seed", "output")  # a recipe's keys beside "stages"


def stage_key(index: int, name: str, option: str | None = None) -> str:
    """Where a stage (0-based ``index``) or one of its options sits in a recipe: ``stages[2].prune.ratio``."""
    return f"stages[{index}].{name}" + (f".{option}" if option else "")


@dataclass(frozen=True)
class Step:
    config: StageConfig

    @property
    def name(self) -> str:
        """The stage's name, the recipe key (``prune``, ``export``, ...)."""
        return self.config.name

    @property
    def is_model_stage(self) -> bool:
        return self.name not in GRAPH_STAGES


@dataclass
class Recipe:
    model: str
    steps: list[Step]
    data: str | None = None
    n: int = 256
    seed: int = 0
    output: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)  # how to read data (``data: {path: ..., workers: 4}``)
    note: str | None = None  # what a recipe rebuilt from mimc.json cannot promise (not part of the YAML)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe: every option of every stage written out (what ``recipe.yaml`` holds)."""
        out: dict[str, Any] = {"model": self.model}
        if self.data is not None:
            out["data"] = {"path": self.data, **self.data_options} if self.data_options else self.data
        out.update({"n": self.n, "seed": self.seed})
        if self.output is not None:
            out["output"] = self.output
        out["stages"] = [{s.name: s.config.to_dict()} for s in self.steps]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @property
    def needs_data(self) -> bool:
        return any(s.config.needs_data for s in self.steps)  # a data-driven model stage, or quantize


def parse_recipe(data: Any, where: str = "recipe", data_fix: str = "add 'data: DIR'") -> Recipe:
    """A mapping (parsed YAML) -> :class:`Recipe`; every stage's options are validated here.
    ``data_fix``: how the refusal of stages that need images without ``data`` says to give them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping with 'model' and 'stages', got {type(data).__name__}")
    known = {*TOP_LEVEL_KEYS, "stages"}
    unknown = sorted(set(data) - known, key=str)  # a YAML key may be a number
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}: valid keys are {sorted(known)}")
    model = data.get("model")
    model = os.fspath(model) if isinstance(model, os.PathLike) else model  # a Path from Python
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{where}: 'model' must name a model (e.g. model: ref)")
    n, seed = plain(data.get("n", 256)), plain(data.get("seed", 0))
    for key, value in (("n", n), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "n" else 0):
            raise ConfigError(f"{where}: '{key}' must be a {'positive' if key == 'n' else 'non-negative'} integer, got {clip(value)}")
    spec, data_options = _parse_data(data.get("data"), where)
    if data.get("output") is not None and not isinstance(data["output"], str):
        raise ConfigError(f"{where}: 'output' must be a string, got {clip(data['output'])}")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{where}: 'stages' must be a non-empty list, e.g. stages: [{{prune: {{ratio: 0.5}}}}, export]")
    steps = [_parse_step(item, i, where) for i, item in enumerate(stages)]
    _check_order(steps, where)
    _check_graph_names(steps, where)
    recipe = Recipe(model=model, steps=steps, data=spec, n=n, seed=seed, output=data.get("output"), data_options=data_options)
    if recipe.needs_data and recipe.data is None:
        needing = [s.name for s in steps if s.config.needs_data]
        raise ConfigError(f"{where}: stage(s) {needing} need images: {data_fix} (a folder, .npz/.npy or builtin)")
    return recipe


DATA_OPTIONS = {"workers": int, "skip_corrupt": bool, "image_column": str, "label_column": str}


def _parse_data(value: Any, where: str) -> tuple[str | None, dict[str, Any]]:
    """``data: SPEC`` or ``data: {path: SPEC, workers: 4, skip_corrupt: true, image_column: img, label_column: y}``."""
    if value is None or isinstance(value, str):
        return value, {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: 'data' must be a string or a mapping with 'path', got {clip(value)}")
    unknown = sorted(set(value) - {"path", *DATA_OPTIONS}, key=str)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} in 'data': valid keys are {sorted({'path', *DATA_OPTIONS})}")
    if not isinstance(value.get("path"), str) or not value["path"]:
        raise ConfigError(f"{where}: 'data.path' must name the images (a folder, .npy/.npz, shards or builtin), got {clip(value.get('path'))}")
    options = {k: v for k, v in value.items() if k != "path"}
    for key, kind in DATA_OPTIONS.items():
        if key in options and (not isinstance(options[key], kind) or (kind is int and (isinstance(options[key], bool) or options[key] < 0))):
            raise ConfigError(f"{where}: 'data.{key}' must be {'a non-negative integer' if kind is int else 'a ' + kind.__name__}, "
                              f"got {clip(options[key])}")
    return value["path"], options


def _parse_step(item: Any, index: int, where: str) -> Step:
    if isinstance(item, str):
        name, options = item, {}
    elif isinstance(item, dict) and len(item) == 1:
        name, options = next(iter(item.items()))
        options = {} if options is None else options
    else:
        raise ConfigError(f"{where}: stages[{index}] must be a name or a one-key mapping like {{prune: {{ratio: 0.5}}}}, got {clip(item)}")
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: {stage_key(index, name)} must be a mapping of options, got {clip(options)}")
    try:
        config = config_from_dict(name, options)
    except (TypeError, ConfigError) as exc:  # TypeError: a wrong type the dataclass could not even take
        # the library names options (`ratio`); a recipe names their keys (`stages[0].prune.ratio`)
        if getattr(exc, "options", None):
            raise ConfigError(f"{where}: {exc.phrased({o: stage_key(index, name, o) for o in exc.options})}") from None
        raise ConfigError(f"{where}: {stage_key(index, name)}: {exc}") from None
    return Step(config)


def _check_graph_names(steps: list[Step], where: str) -> None:
    """``graph:`` of build / profile / eval must name a graph an earlier stage of the recipe writes, and
    each graph must suit the runtime that reads it (a quantized graph's target, a built deployable's device)."""
    written: list[str] = []
    batch: int | str = 1  # quantize without export exports a batch-1 graph itself
    last, target = None, {}  # the graph a profile / eval without 'graph' reads; quantized graph -> its target
    precision = {"model.onnx": "fp32"}  # graph -> its precision
    for i, step in enumerate(steps):
        name = getattr(step.config, "graph", None) or last  # the graph a build / profile / eval reads
        if step.name in ("build", "profile", "eval") and step.config.graph is not None and step.config.graph not in written:
            hint = f"choose one of {written}" if written else "add an export (or quantize) stage before it"
            raise ConfigError(f"{where}: {stage_key(i, step.name)} reads graph '{step.config.graph}', which no earlier stage writes: {hint}")
        if step.name == "profile" and name is None:
            raise ConfigError(f"{where}: {stage_key(i, 'profile')} measures a graph and no earlier stage writes one: "
                              "add an 'export' (or 'quantize') stage before it")
        if step.name == "export":
            written.append("model.onnx")
            batch = step.config.batch
            last = "model.onnx"
        elif step.name == "quantize":
            last = f"model.{step.config.precision}.onnx"
            written += [last] + ([] if "model.onnx" in written else ["model.onnx"])
            target[last] = step.config.resolved_target
            precision[last] = step.config.precision
            if target[last] == "cpu" and not step.config.fuse_attention:
                target[last] = "cpu-unfused"  # plain Q/DQ + MatMulIntegerToFloat: OpenVINO reads it too
        elif step.name == "build":
            last = _check_build(step, i, name, target, precision, where)
            written.append(last)
        if step.name == "profile" and not step.config.predict:
            # a TensorRT Q/DQ graph on ONNX Runtime CPU times fp32 emulation of the int8 math (slower
            # than fp32), and TensorRT cannot parse the CPU graph's com.microsoft kernels
            backend = load_profile(step.config.device).backend
            if target.get(name) == "openvino-ir" and backend != "openvino-cpu":
                raise ConfigError(f"{where}: {stage_key(i, 'profile')} would time {name}, an OpenVINO IR, on {step.config.device}: "
                                  "profile device: openvino-cpu (or give graph: the .onnx it was built from)")
            if target.get(name) == "tensorrt-engine" and backend in ("onnxruntime-cpu", "openvino-cpu"):
                raise ConfigError(f"{where}: {stage_key(i, 'profile')} would time {name}, a TensorRT engine, on {step.config.device}: "
                                  "profile the TensorRT device it was built for (or give graph: the .onnx it was built from)")
            if target.get(name) == "tensorrt" and backend == "onnxruntime-cpu":
                raise ConfigError(f"{where}: {stage_key(i, 'profile')} would time {name}, a TensorRT Q/DQ graph, on ONNX Runtime CPU: "
                                  "quantize with target: cpu, or profile a GPU device with predict: true")
            if target.get(name) in ("cpu-unfused", "openvino") and backend not in ("onnxruntime-cpu", "openvino-cpu"):
                raise ConfigError(f"{where}: {stage_key(i, 'profile')} would run {name}, a CPU graph, on {step.config.device}: "
                                  "quantize with target: tensorrt, or profile device: cpu or openvino-cpu")
            if target.get(name) == "cpu" and backend != "onnxruntime-cpu":
                raise ConfigError(f"{where}: {stage_key(i, 'profile')} would run {name}, an ONNX Runtime CPU graph, on {step.config.device}: "
                                  "quantize with target: tensorrt, or profile device: cpu (openvino-cpu reads it with fuse_attention: false)")
        if step.name == "profile" and step.config.predict and target.get(name) in ("openvino-ir", "tensorrt-engine"):
            raise ConfigError(f"{where}: {stage_key(i, 'profile', 'predict')} prices an ONNX graph by roofline, not the built "
                              f"{name}: give graph: the .onnx it was built from, or predict: false")
        # a static graph runs one batch size only: found here, not after the model stages ran
        if step.name == "profile" and batch != "dynamic" and set(step.config.batch_sizes) - {batch}:
            raise ConfigError(f"{where}: {stage_key(i, 'profile')} times batch sizes {list(step.config.batch_sizes)} of a graph exported with "
                              f"batch {batch}: give the export stage batch: dynamic, or profile batch_sizes: [{batch}]")


def _check_build(step: Step, i: int, graph: str | None, target: dict[str, str], precision: dict[str, str], where: str) -> str:
    """A build reads an ONNX graph its device's runtime can read, at a precision that graph has; returns
    the file it writes (and records its kind and precision in ``target`` / ``precision``)."""
    key = stage_key(i, "build")
    if graph is None:
        raise ConfigError(f"{where}: {key} builds the last graph, and no earlier stage writes one: add an export (or quantize) stage before it")
    if not graph.endswith(".onnx"):
        raise ConfigError(f"{where}: {key} would build {graph}, which is built already: a run builds one deployable")
    config, prof = step.config, load_profile(step.config.device)
    kind, source = target.get(graph), precision.get(graph, "fp32")
    if prof.backend == "openvino-cpu":
        if kind == "cpu":
            raise ConfigError(f"{where}: {key} would build {graph}, an ONNX Runtime CPU graph (QAttention kernels), for OpenVINO: "
                              "give the quantize stage target: openvino (or fuse_attention: false: plain Q/DQ, which OpenVINO reads)")
        if source not in ("fp32", "int8"):
            raise ConfigError(f"{where}: {key} would build {graph}, a {source} graph, for OpenVINO CPU, which runs fp32, bf16 and "
                              "int8: quantize with precision int8")
        built = config.precision or ("int8" if source == "int8" else "fp32")
        if built.startswith("int8") and source != "int8":
            raise ConfigError(f"{where}: {stage_key(i, 'build', 'precision')} {built} needs a quantized graph (OpenVINO runs int8 from "
                              f"Q/DQ nodes) but {graph} is fp32: add a quantize stage before the build, or build fp32")
        if source == "int8" and not built.startswith("int8"):
            raise ConfigError(f"{where}: {stage_key(i, 'build', 'precision')} {built} of {graph}, an int8 graph, would still run its "
                              "Q/DQ layers in int8: build int8 (or int8-bf16 for bf16 float layers), or build model.onnx")
    else:
        if kind in ("cpu", "cpu-unfused", "openvino"):
            raise ConfigError(f"{where}: {key} would build {graph}, a CPU graph, for {step.config.device}: "
                              "quantize with target: tensorrt, or build for openvino-cpu")
        built = config.precision or source
    out = config.output_name
    target[out], precision[out] = ("openvino-ir" if prof.backend == "openvino-cpu" else "tensorrt-engine"), built
    return out


def _check_order(steps: list[Step], where: str) -> None:
    first_graph = next((i for i, s in enumerate(steps) if not s.is_model_stage), None)
    if first_graph is not None:
        late = [s.name for s in steps[first_graph:] if s.is_model_stage]
        if late:
            raise ConfigError(f"{where}: model stage(s) {late} come after graph stage '{steps[first_graph].name}': "
                              "put prune/width/tokens/sparsify/distill before export/quantize/build/profile/eval")
    names = [s.name for s in steps]
    if names[0] == "distill":  # a recipe's distill learns from the recipe's model: here that is the student itself
        raise ConfigError(f"{where}: {stage_key(0, 'distill')} would distill the recipe's model from itself (its teacher), "
                          "which recovers nothing: put the stages that compress it (prune, width, ...) before distill")
    for name in ("export", "quantize"):
        if names.count(name) > 1:
            raise ConfigError(f"{where}: stage '{name}' appears {names.count(name)} times: a run writes one {name}ed graph")
    if "export" in names and "quantize" in names and names.index("quantize") < names.index("export"):
        raise ConfigError(f"{where}: quantize comes before export: export first (quantize reads model.onnx)")
    if names.count("build") > 1:
        raise ConfigError(f"{where}: stage 'build' appears {names.count('build')} times: a run builds one deployable")
    late = [n for n in names[names.index("build") + 1:] if n in ("export", "quantize")] if "build" in names else []
    if late:
        raise ConfigError(f"{where}: {late[0]} comes after build: put build after export and quantize (it builds the graph they write)")


def load_recipe(path: str | Path, data: str | None = None) -> Recipe:
    """A recipe YAML file, or an artifact directory (replayed from its recipe.yaml / mimc.json);
    ``data`` replaces the recipe's images."""
    path = Path(path)
    check_data(data)
    if path.name == MANIFEST_NAME and is_artifact(path.parent):  # ART/mimc.json: the artifact it describes
        path = path.parent
    if path.is_dir():
        recipe = recipe_from_artifact(path, data)
    elif not path.is_file():
        raise BadInputError(f"recipe {path} does not exist: pass a recipe .yaml or an artifact directory to replay")
    else:
        recipe = parse_recipe(_with_data(read_yaml(path), data), where=str(path))
    recipe.source_path = path  # the file or artifact it came from: an output must never replace it
    return recipe


def check_data(data: str | None) -> None:
    """Images given to replace a recipe's must exist, even when no stage reads them: an option that
    names nothing must not pass silently."""
    if data is not None and data != "builtin" and not is_shard_spec(data) and not Path(data).exists():
        raise DataError(f"data path {data} does not exist: pass an image folder, a .npy/.npz file or 'builtin'", option="data")


def _with_data(parsed: Any, data: str | None) -> Any:
    """The recipe with its images replaced (a ``data:`` mapping keeps its reading options)."""
    if data is None or not isinstance(parsed, dict):
        return parsed
    old = parsed.get("data")
    return {**parsed, "data": {**old, "path": data} if isinstance(old, dict) else data}


def recipe_from_artifact(path: str | Path, data: str | None = None) -> Recipe:
    """The recipe that rebuilds an artifact: its recipe.yaml when ``mimc run`` wrote it, else one
    assembled from mimc.json (the source model, every recorded stage, the exported graphs)."""
    path = Path(path)
    if (path / RECIPE_NAME).is_file():
        return parse_recipe(_with_data(read_yaml(path / RECIPE_NAME), data), where=str(path / RECIPE_NAME))
    if not is_artifact(path):
        raise BadInputError(f"{path} is not a mimc artifact (no mimc.json): pass a recipe .yaml or an artifact directory")
    manifest = read_manifest(path)
    model = manifest.source.get("id")
    if not model:
        raise BadInputError(f"{path}/mimc.json does not name its source model: write a recipe with 'model:' by hand")
    stages: list[Any] = [{s.name: s.config} for s in manifest.stages]
    recorded, seed, picked = None, {}, None
    export = manifest.files.get("model.onnx")
    if export is not None:
        stages.append({"export": {"batch": export.get("batch", 1), "opset": export.get("opset_requested", export.get("opset", 17)),
                                  "exporter": export.get("exporter", "torchscript")}})
    # a recipe holds one quantize stage: the graph under the name the replay writes, else the first by name
    for name, entry in sorted(manifest.files.items(), key=lambda f: (f[0] != f"model.{f[1].get('config', {}).get('precision')}.onnx", f[0])):
        if entry.get("stage", {}).get("name") == "quantize":
            stages.append({"quantize": entry["config"]})
            recorded = entry.get("calibration_source")
            seed = {"seed": entry["calibration_seed"]} if "calibration_seed" in entry else {}
            picked = name
            break
    data = data if data is not None else recorded  # model stages do not record their images: mimc run --data
    recipe = parse_recipe({"model": model, "stages": stages, **seed, **({"data": data} if data else {})}, where=f"{path}/mimc.json",
                          data_fix="mimc.json does not record them, give them to the replay: mimc run --data DIR")
    notes = []
    learned = [s.name for s in recipe.steps if s.is_model_stage and s.config.needs_data]
    if learned:
        # mimc.json keeps each stage's options but not which images it drew (count, seed, order)
        notes.append(f"{path}/mimc.json does not record the images stage(s) {learned} drew: the replay draws n={recipe.n} "
                     f"from {recipe.data} (seed {recipe.seed}), so its weights can differ from {path}'s")
    teachers = sorted({str(s.metrics.get("teacher")) for s in manifest.stages
                       if s.name == "distill" and s.metrics.get("teacher") not in (None, model)})
    if teachers:  # `mimc distill --teacher OTHER`; a recipe's distill learns from its own model
        notes.append(f"distill learned from {teachers}, the replay distills from {model}")
    made = [f"model.{s.config.precision}.onnx" if s.name == "quantize" else "model.onnx" for s in recipe.steps if s.name in ("export", "quantize")]
    left = sorted(set(manifest.files) - set(made) - {picked})
    if left or picked not in made + [None]:  # the other quantized graphs, the IRs and engines (no build stage)
        notes.append(f"the replay makes {made}{f' (the last as {picked} was made)' if picked not in made + [None] else ''}, not {left}")
    recipe.note = "; ".join(notes) or None
    return recipe


__all__ = ["Recipe", "Step", "check_data", "ExportConfig", "BuildConfig", "ProfileConfig", "EvalConfig", "parse_recipe", "load_recipe", "stage_key",
           "recipe_from_artifact", "RECIPE_NAME", "RUN_REPORT_NAME", "GRAPH_STAGES"]
