"""The stages of the pipeline, in one registry: name -> options type, level (model or graph), handler.

Model stages (prune, width, tokens, sparsify, distill, smooth, repq) take an Encoder and return a new
one; their options and handlers live in :mod:`mimc.compression` and run through
:func:`mimc.compression.registry.compress`. Graph stages (export, quantize, build, profile, eval) read
and write graphs in the artifact folder (ONNX; build: an OpenVINO IR or a TensorRT engine); their options are defined here (quantize's in
:mod:`mimc.quant.quantize`) and their handlers in :mod:`mimc.pipeline.graph_stages`. A recipe, the
single commands and the search all build their stage lists from these types.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mimc.errors import ConfigError
from mimc.latency.devices import MAX_BATCH, load_profile
from mimc.latency.run import ITERS, WARMUP, check_predict
from mimc.runtime.timing import check_threads
from mimc.options import StageConfig, option
from mimc.quant.config import QuantizeConfig

BUILD_PRECISIONS = ("fp32", "bf16", "fp16", "int8", "int8-bf16", "fp8")


@dataclass(frozen=True)
class ExportConfig(StageConfig):
    """``export``: the fp32 graph ``model.onnx`` (see mimc.deploy.onnx.export_onnx)."""

    name: ClassVar[str] = "export"
    batch: int | str = option(1, doc="an integer (a static batch) or 'dynamic'")
    opset: int = option(17, doc="ONNX opset")
    exporter: str = option("torchscript", doc="torchscript or dynamo")

    def check(self) -> None:
        from mimc.deploy.onnx import check_export_options

        # "2" (a quoted YAML number) becomes 2, so recipe.yaml and the graph agree on the batch
        object.__setattr__(self, "batch", check_export_options(self.batch, self.opset, self.exporter, "fp32"))


@dataclass(frozen=True)
class BuildConfig(StageConfig):
    """``build``: the deployable of the run's last graph (or ``graph``) for ``device``, as ``mimc build``
    makes it: an OpenVINO IR ``model.xml`` + ``model.bin`` (openvino-cpu) or a TensorRT engine
    ``model.plan``, each with its JSON sidecar; later profile / eval stages read it."""

    name: ClassVar[str] = "build"
    device: str = option("openvino-cpu", doc="an openvino-cpu or TensorRT device profile name (h100, ...) or a profile .yaml")
    precision: str | None = option(None, choices=BUILD_PRECISIONS,
                                   doc="null: the graph's own (fp32 for the fp32 graph, int8 for a quantized one)")
    graph: str | None = option(None, doc="an ONNX graph of the artifact, e.g. model.int8.onnx; null: the last one written")

    def check(self) -> None:
        try:
            prof = load_profile(self.device)  # unknown device / bad YAML: one line, before any work
        except ConfigError as exc:
            raise ConfigError(str(exc), option="device") from None
        if prof.backend not in ("openvino-cpu", "tensorrt"):
            raise ConfigError(f"device '{prof.name}' runs the .onnx graph itself on {prof.backend}, there is nothing to build: "
                              "build for openvino-cpu or a TensorRT profile (see `mimc profiles`), or drop the build stage", option="device")
        if self.precision is not None and not prof.supports(self.precision):
            raise ConfigError(f"device '{prof.name}' has no {self.precision} (it has {', '.join(prof.precisions)}): choose one of those",
                              option="precision")
        if self.graph is not None and not self.graph.endswith(".onnx"):
            raise ConfigError(f"graph {self.graph!r} is not an .onnx graph: a build reads model.onnx or a quantized model.<precision>.onnx",
                              option="graph")

    @property
    def output_name(self) -> str:
        """The file it writes into the artifact (its sidecar is ``<name>.json``)."""
        return "model.xml" if load_profile(self.device).backend == "openvino-cpu" else "model.plan"


@dataclass(frozen=True)
class ProfileConfig(StageConfig):
    """``profile``: latency of the run's last graph on ``device`` and, with ``baseline``, of the
    source model's dense fp32 graph with the same settings in the same run (the speed-up)."""

    name: ClassVar[str] = "profile"
    device: str = option("cpu", doc="a device profile name (cpu, h100, ...) or a profile .yaml")
    predict: bool = option(False, doc="roofline prediction instead of a measurement (devices that are absent)")
    graph: str | None = option(None, doc="a graph file of the artifact, e.g. model.int8.onnx; null: the last one written")
    baseline: bool = option(True, doc="also time the source model's dense fp32 graph (the speed-up)")
    batch_sizes: tuple[int, ...] = option((), ge=1, le=MAX_BATCH, doc="empty: the graph's own batch")
    warmup: int = option(WARMUP, ge=0)
    iters: int = option(ITERS, ge=1)
    threads: int | None = option(None, ge=1)
    precision: str | None = option(None, doc="predict: price the graph at this precision; openvino-cpu: compile it at this precision")

    def check(self) -> None:
        prof = load_profile(self.device)  # unknown device / bad YAML: one line, before any work
        check_predict(self.predict, self.warmup, self.iters, self.threads)
        check_threads(self.threads)  # more than the cores here: refused before the stages before it run
        measured_here = not self.predict and prof.backend == "openvino-cpu"
        if self.precision is not None and (not (self.predict or measured_here) or not prof.supports(self.precision)):
            raise ConfigError(f"precision {self.precision!r} needs predict on (or a measured openvino-cpu device) and a device "
                              f"that runs it ({prof.name}: {list(prof.precisions)})", option=("precision", "predict"))


@dataclass(frozen=True)
class EvalConfig(StageConfig):
    """``eval``: fidelity of the run's last graph (or ``graph``) to the source model, and k-NN, through the
    runtime that runs it (an IR on OpenVINO, an engine on TensorRT, an .onnx on ONNX Runtime)."""

    name: ClassVar[str] = "eval"
    graph: str | None = option(None, doc="a graph file of the artifact, e.g. model.int8.onnx or model.xml; null: the last one written")
    n: int | None = option(None, ge=1, doc="images evaluated; null: every image of the recipe's data")
    batch_size: int = option(32, ge=1)
    # the train / val protocol of `mimc eval --val`: the recipe's data is the labelled gallery
    val: str | None = option(None, doc="labelled val images (a folder, .npz, shards, ...): each classified by k-NN against the "
                                       "recipe's data as gallery, fidelity measured on them; null: leave-one-out over data")

    def to_dict(self) -> dict:
        data = super().to_dict()
        if data["val"] is None:  # recipes written before val keep their resolved form
            del data["val"]
        return data


GRAPH_CONFIGS: dict[str, type] = {c.name: c for c in (ExportConfig, QuantizeConfig, BuildConfig, ProfileConfig,
                                                      EvalConfig)}
GRAPH_STAGES = tuple(GRAPH_CONFIGS)


def config_types() -> dict[str, type]:
    """Every stage's options type by its recipe name, model stages and graph stages alike."""
    from mimc.compression.registry import config_types as model_config_types

    return {**model_config_types(), **GRAPH_CONFIGS}


def config_from_dict(name: str, options: dict) -> StageConfig:
    types = config_types()
    if name not in types:
        raise ConfigError(f"unknown stage '{name}': known stages are {sorted(types)}")
    return types[name].from_dict(options)


def is_model_stage(config: StageConfig) -> bool:
    return config.name not in GRAPH_STAGES


__all__ = ["ExportConfig", "BuildConfig", "ProfileConfig", "EvalConfig", "GRAPH_CONFIGS", "GRAPH_STAGES", "config_types",
           "config_from_dict", "is_model_stage"]
