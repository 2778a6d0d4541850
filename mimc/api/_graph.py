"""The graph verbs: export, quantize, build, profile.

``export`` and ``quantize`` run the pipeline's graph stages: into the MODEL's own artifact when it
is one (files added atomically and recorded in its ``mimc.json``), else into a new artifact that
holds the weights and the graphs together.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from mimc.api._model import _default_output, _load
from mimc.api.reports import DictReport, GraphReport
from mimc.atomic import check_new_files, check_not_input, check_writable, write_json
from mimc.errors import BadInputError, ConfigError, DataError
from mimc.latency.run import ITERS, WARMUP
from mimc.train.dist import check_one_process

ONNX_NAME = "model.onnx"


class ProfileReport(DictReport):
    """Latency per batch size, labelled measured or predicted (see :func:`mimc.latency.run.profile`)."""


class BuildReport(DictReport):
    """A TensorRT engine or OpenVINO IR and its sidecar (versions, precision, sparsity picked)."""


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _new_artifact(folder: Path, overwrite: bool, hint: str) -> None:
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise BadInputError(f"output {folder} already exists and is not empty: choose another output{hint}")


def _made_from(folder: Path, graph: str) -> list[str]:
    """The files of an artifact made from ``graph``, directly or through another (quantized graphs,
    engines, IRs), by the ``source`` its mimc.json records for each."""
    from mimc.artifact import read_manifest

    files, found = read_manifest(folder).files, [graph]
    for name in found:
        for other, entry in files.items():
            source = entry.get("source")
            if (source.get("file") if isinstance(source, dict) else source) == name and other not in found:
                found.append(other)
    return found[1:]


def _stale(graph: Path, overwrite: bool, verb: str, elsewhere: str) -> list[str]:
    """The files of ``graph``'s artifact made from it, which replacing it would leave out of date:
    refused unless ``overwrite`` (the caller then removes them)."""
    from mimc.artifact import is_artifact

    stale = _made_from(graph.parent, graph.name) if is_artifact(graph.parent) and graph.is_file() else []
    if stale and not overwrite:
        raise BadInputError(f"{graph} has graphs made from it ({', '.join(stale)}), which a new {verb} would leave "
                            f"out of date: {elsewhere} (output), or pass overwrite to replace it and remove them",
                            option=("output", "overwrite"))
    return stale


def _drop_files(folder: Path, names: list[str]) -> None:
    """Remove ``names`` from the artifact's mimc.json (first: a kill in between leaves files it no
    longer lists, never entries without files), then the files with their weights and sidecars."""
    from mimc.artifact import update_manifest

    if not names:
        return
    entries = update_manifest(folder, lambda manifest: [manifest.files.pop(name) for name in names])
    for entry in entries:
        for key in ("file", "external_data", "sidecar"):
            if entry.get(key):
                (folder / entry[key]).unlink(missing_ok=True)


def export(model: Any = "ref", output=None, *, batch: Any = 1, opset: int = 17, exporter: str = "torchscript",
           validate: bool = True, force: bool = False, seed: int = 0, overwrite: bool = False) -> GraphReport:
    """``model.onnx`` (inputs pixel_values; outputs last_hidden_state, pooled), validated on ONNX Runtime.

    MODEL: any MODEL argument (into its own artifact when it is one) or an Encoder in memory (a new
    artifact, default ``./model-mimc``; the Encoder itself is left as it was). Into an artifact that
    already has a ``model.onnx`` with graphs made from it (``model.int8.onnx``, engines, IRs), the
    export is refused unless ``overwrite``, which replaces it and removes those."""
    from mimc.artifact import is_artifact
    from mimc.models.resolve import describe_source
    from mimc.pipeline.executor import Job, execute, extend
    from mimc.pipeline.stages import ExportConfig

    check_one_process("mimc export")
    config = ExportConfig(batch=batch, opset=opset, exporter=exporter)  # exit 2 before any loading
    in_memory = not isinstance(model, (str, os.PathLike))  # an Encoder
    if not in_memory:
        model = str(model)
    kind = "encoder" if in_memory else describe_source(model)  # nonexistent path / not a model -> exit 2
    in_place = kind == "artifact" and (output is None or _same_dir(Path(output), Path(model)))
    out_dir = Path(model) if in_place else (Path(output) if output is not None else _default_output(model, "mimc"))
    if not in_place:
        check_not_input(out_dir, (model,))
        into = f" (to export into that artifact, run `mimc export {out_dir}`)" if is_artifact(out_dir) else ""
        _new_artifact(out_dir, overwrite, f" or overwrite it{into}")
    stale = _stale(out_dir / ONNX_NAME, overwrite, "export", "export into a new folder") if in_place else []
    check_writable(out_dir / ONNX_NAME)  # an artifact on a read-only mount: refused before the export, not after
    encoder = _unshared(_load(model)) if in_memory else _load(model)
    runtime = dict(validate=validate, force=force, seed=seed)
    if in_place:
        result = extend(out_dir, encoder, [config], export_options=runtime)
        _drop_files(out_dir, stale)
    else:
        encoder.manifest.files = {}  # graphs and engines listed by the source artifact do not come along
        result = execute(Job(source=encoder, stages=[config], export_options=runtime), out_dir, overwrite=overwrite)
    return GraphReport(out_dir / ONNX_NAME, out_dir, result.stages[-1].entry["report"])


def _unshared(encoder):
    """The caller's Encoder with a manifest of its own (same weights): writing an artifact records
    its hash and files in the manifest, which must not reach the caller's object."""
    import copy
    from dataclasses import replace

    from mimc.artifact import Manifest

    own = copy.copy(encoder)
    manifest = getattr(encoder, "manifest", None)
    own.manifest = replace(manifest) if manifest is not None else Manifest(encoder=encoder.config.to_dict())
    return own


def _refuse_in_memory(model, verb: str, then: str) -> None:
    if not isinstance(model, (str, os.PathLike)):
        raise BadInputError(f"{verb} reads its model from a path, not a {type(model).__name__} in memory: "
                            f"write it first with mimc.export(encoder, DIR), {then}")


def quantize(model: str, calib=None, output=None, *, precision: str = "int8", device: str = "cpu", config=None,
             seed: int = 0, force: bool = False, overwrite: bool = False, **options) -> GraphReport:
    """A calibrated int8/fp8 Q/DQ graph gated on held-out images: ``config`` (a
    :class:`~mimc.quant.quantize.QuantizeConfig`) or its options, the graph layout picked by ``device``.

    MODEL: an fp32 mimc ``.onnx`` (written beside it), an artifact (into it; exported first when it has
    no ``model.onnx``), or any other model (a new artifact ``./<model>-mimc`` with both graphs). A graph
    of an artifact that has graphs made from it (an IR, an engine) is replaced only with ``overwrite``,
    which removes them."""
    from mimc.artifact import is_artifact
    from mimc.data import as_source, spec_of
    from mimc.graph import encoder_config_of_graph
    from mimc.models.io import ArtifactShape
    from mimc.pipeline.executor import Job, execute, extend
    from mimc.pipeline.graph_stages import EVAL_IMAGES, quantize_split, split_images, target_for_device
    from mimc.pipeline.stages import ExportConfig
    from mimc.quant.config import QuantizeConfig

    check_one_process("mimc quantize")
    _refuse_in_memory(model, "quantize", "then quantize DIR")
    if config is None:
        config = QuantizeConfig.from_dict({"precision": precision, "target": target_for_device(device, precision), **options})
    elif not isinstance(config, QuantizeConfig):
        raise ConfigError(f"config must be a QuantizeConfig, got {type(config).__name__}: give one, or its options themselves", option="config")
    else:  # the config decides every option: one given beside it would be ignored
        beside = [k for k, v in (("precision", precision != "int8"), ("device", device != "cpu")) if v] + sorted(options)
        if beside:
            raise ConfigError(f"config holds every quantize option and {', '.join(beside)} beside it would be ignored: "
                              "give config or the options", option=("config", *beside))
    if calib is None:
        raise DataError("quantization needs calibration images: give calib (a folder, .npz/.npy or 'builtin')", option="calib")
    images = as_source(calib, seed)
    suffix = f".{config.precision}.onnx"
    name = f"model{suffix}"
    path = Path(model)
    out = Path(output) if output is not None else None
    if out is not None and out.suffix != ".onnx":
        raise BadInputError(f"output {out} must end in .onnx: choose a path like model.int8.onnx")
    encoder = None
    if path.suffix != ".onnx":
        # An artifact that has its fp32 graph is quantized from that graph alone: its weights (2.5 GB
        # for a ViT-H/14) are not loaded.
        encoder = ArtifactShape(path) if is_artifact(path) and (path / ONNX_NAME).is_file() else _load(model)
    if path.suffix != ".onnx" and (out is None or is_artifact(path) and _same_dir(out, path / name)):
        # Into the MODEL's artifact, else (like `mimc export`) a new one holding the weights,
        # model.onnx and the quantized graph.
        folder = path if is_artifact(path) else _default_output(model, "mimc")
        if folder is not path:
            _new_artifact(folder, False, f", or run `mimc quantize {folder}`")
        images.draw(encoder.config, config.n + EVAL_IMAGES)  # bad images: refused before an export is written
        if folder is path:
            check_writable(path / name)
            stale = _stale(path / name, overwrite, "quantize", "write the graph to another file")
            result = extend(path, encoder, [config], images=images, force=force, seed=seed)
            _drop_files(path, stale)
        else:
            result = execute(Job(source=encoder, stages=[ExportConfig(), config], images=images, seed=seed, force=force), folder)
        return GraphReport(folder / name, folder, result.stages[-1].entry["report"])
    # One graph file where asked, from an fp32 graph: the given one, the artifact's, or one exported to a temp folder.
    with tempfile.TemporaryDirectory(prefix=".mimc-quantize.") as tmp:
        if path.suffix == ".onnx":
            if not path.is_file():
                raise BadInputError(f"ONNX file {path} does not exist: export one with `mimc export MODEL`")
            graph, cfg = path, encoder_config_of_graph(path)
            out = out or path.with_name(f"{path.name[: -len('.onnx')]}{suffix}")
        else:
            graph = path / ONNX_NAME if isinstance(encoder, ArtifactShape) else Path(tmp) / ONNX_NAME
            cfg = encoder.config
        if is_artifact(out.parent) and not _same_dir(out.parent, path.parent if path.suffix == ".onnx" else path):
            # its mimc.json would list this graph of another model as its own
            raise BadInputError(f"output {out} is inside the artifact {out.parent}, which {model} does not come from: write the graph "
                                f"outside it, or quantize {out.parent} itself", option="output")
        _check_folder(out, (path, spec_of(calib)))
        if not is_artifact(out.parent):  # an artifact's graph is its own to replace (unless made from: _stale); any other file is the user's
            check_new_files([out], overwrite)
        stale = _stale(out, overwrite, "quantize", "write the graph to another file")
        drawn = images.draw(cfg, config.n + EVAL_IMAGES)
        if not graph.is_file():
            from mimc.deploy.onnx import export_onnx

            export_onnx(encoder, graph)
        report = quantize_split(graph, out, *split_images(drawn, config.n, seed), config, force, spec_of(calib), seed=seed)
        _drop_files(out.parent, stale)
    return GraphReport(out, out.parent if is_artifact(out.parent) else None, report)


def _check_folder(out: Path, inputs=()) -> None:
    if not out.parent.is_dir():
        raise BadInputError(f"output folder {out.parent} does not exist: create it or choose another output path")
    check_not_input(out, inputs, inside=False)  # a graph file may be added to an artifact, never replace an input
    check_writable(out)


def profile(model, device: str = "cpu", *, batch_sizes=None, warmup: int = WARMUP, iters: int = ITERS, threads=None,
            predict: bool = False, output=None, on_batch=None, on_message=None, precision=None) -> ProfileReport:
    """Latency p50/p90/p99, throughput and peak memory per batch size (measured), or a roofline
    lower bound (predicted) for a device that is not here. ``output``: also write the JSON report.
    ``precision``: the float precision an openvino-cpu device runs (fp32/bf16), or with ``predict``
    the precision the roofline prices."""
    from mimc.artifact import is_artifact, recorded_files
    from mimc.latency.run import check_model_path, parse_batch_sizes
    from mimc.latency.run import profile as run_profile

    check_one_process("mimc profile")
    _refuse_in_memory(model, "profile", "then profile DIR/model.onnx")
    if isinstance(batch_sizes, str):
        batch_sizes = parse_batch_sizes(batch_sizes)  # "1,8"
    model = Path(model)
    check_model_path(model)
    if output is not None:
        output = Path(output)
        if output.is_dir():
            raise BadInputError(f"output {output} is a directory: give a file path like report.json")
        device_file = Path(device) if Path(device).suffix in (".yaml", ".yml") else None
        _check_folder(output, [*_read_by(model), device_file])  # the report must not replace the graph it measures, nor what it reads
        if is_artifact(output.parent) and output.name in recorded_files(output.parent):  # nor any artifact's own file
            raise BadInputError(f"output {output} is a file of the artifact {output.parent}: write the report to a new file, "
                                f"like {output.parent / 'profile.json'}", option="output")
    report = run_profile(model, device=device, predict=predict, batch_sizes=batch_sizes, warmup=warmup, iters=iters,
                         threads=threads, on_batch=on_batch, on_message=on_message, precision=precision)
    if output is not None:
        write_json(output, report)
    return ProfileReport(report)


def _read_by(model: Path) -> list[Path]:
    """The files profiling ``model`` reads: itself, its artifact's mimc.json, an IR's .bin, a graph's external data;
    and an IR's or engine's sidecar (which names the graph it was built from)."""
    from mimc.artifact import MANIFEST_NAME
    from mimc.graph import external_file, load_graph, uses_external

    files = [model, model.parent / MANIFEST_NAME, model.with_suffix(".bin") if model.suffix == ".xml" else None,
             Path(f"{model}.json") if model.suffix != ".onnx" else None]
    if model.suffix == ".onnx":
        files += [external_file(t, model.parent) for t in load_graph(model, external_data=False).graph.initializer
                  if uses_external(t)]
    return files


def build(model, device: str, *, precision=None, batch_range=None, workspace_gb: float | None = None, timing_cache=None,
          sparse=None, output=None, on_message=None, overwrite: bool = False) -> BuildReport:
    """A TensorRT engine (strongly typed: the precision comes from the graph) plus its JSON sidecar, or
    for an openvino-cpu device an OpenVINO IR (.xml + .bin) and its sidecar;
    every check that needs no GPU runs first, so bad input is refused here as on the target.
    ``on_message`` gets TensorRT's error lines as they are logged."""
    from mimc.artifact import is_artifact
    from mimc.deploy.build import build as build_deployable
    from mimc.latency.devices import load_profile
    from mimc.pipeline.graph_stages import record_build
    from mimc.pipeline.stages import BuildConfig

    check_one_process("mimc build")
    built = build_deployable(model, load_profile(device), precision=precision, batch_range=batch_range,
                             workspace_gb=workspace_gb, timing_cache=timing_cache, sparse=sparse, output=output,
                             on_message=on_message, overwrite=overwrite)
    out, graph, side = Path(built.get("ir") or built["engine"]), Path(model), built["sidecar"]
    if is_artifact(graph.parent) and _same_dir(out.parent, graph.parent):
        # listed like a recipe's build: a new export sees what was made from its graph, an altered IR is refused
        record_build(out, graph, BuildConfig(device=device, precision=side["precision"], graph=graph.name), side,
                     side["build_seconds"])
    return BuildReport(built)


__all__ = ["export", "quantize", "profile", "build", "ProfileReport", "BuildReport"]
