"""Export a canonical encoder to ONNX and validate it on ONNX Runtime before it is kept.

One input ``pixel_values`` ((B, C, H, W), or (B, T, C, H, W) for video) and two outputs,
``last_hidden_state`` (B, N, D) and ``pooled`` (B, D). Batch is static by default (what TensorRT
and ORT optimise best), dynamic on request. The graph is written to a temporary file, checked
(onnx.checker, no training-only ops), run on ONNX Runtime CPU against torch on deterministic
inputs, and only then renamed into place; a graph beyond its precision's gate raises
:class:`~mimc.errors.ValidationError` and leaves nothing, unless ``force``.

Exporter choice (measured on this machine, torch 2.13, tiny encoders: plain, relative position
bias per block and shared + layer scale, video Conv3d, and the token stage's ToMe merge, attention
top-k and patch dropping, image and video; static and dynamic batch): both exporters handle every
shape and match torch within 3.1e-6. TorchScript (``dynamo=False``) is the default because it
(1) honours opset 17 exactly, while dynamo emits opset 18 at least, which older TensorRT/ORT builds
on deployment targets may lack; (2) exports tiny models 3-7x faster (0.2-5 s vs 2-35 s on a
loaded 2-core machine; the test suite and recipes export often) - on ViT-B/16 the two are alike
(benchmarks/bench_export_vitb.py: 54 vs 59 s export+validation under heavy load, same ORT latency,
both within 5e-6 of torch); (3) prints nothing on stdout (dynamo logs its progress there, which
would corrupt ``--json``). Its one cost is a few Shape/Expand nodes for the cls-token broadcast that
ORT and TensorRT fold at load. TorchScript export is deprecated in torch 2.13, so
``exporter="dynamo"`` is kept working and tested.

Graphs past 2 GiB (ViT-H/14 fp32 is 2.5 GB): nothing here ever serialises or sizes a whole graph;
how the exporters' weight files become one ``<name>.data`` (:func:`mimc.graph.files.save_graph`)
and validation reads them is README "Big encoders on one machine" (``benchmarks/bench_big_encoders.py``).

References:
- ONNX operator set 17 (LayerNormalization as one node): https://onnx.ai/onnx/operators/
- torch.onnx exporters: https://pytorch.org/docs/stable/onnx.html (pytorch/pytorch, torch/onnx)
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from mimc.artifact import is_artifact, mimc_version, now_iso, read_manifest, sha256_file, update_manifest
from mimc.atomic import claim_output, sweep_stale_temps, writing
from mimc.errors import BadInputError, ConfigError, ValidationError
from mimc.deploy.validate import check_gate, gate_for, verdict
from mimc.graph import check_graph, load_graph, save_graph
from mimc.metrics import compare_outputs
from mimc.options import MAX_BATCH  # a static batch, and the top of dynamo's dynamic batch axis
from mimc.runtime.session import onnxruntime, run_onnx

INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("last_hidden_state", "pooled")
EXPORTERS = ("torchscript", "dynamo")
MIN_OPSET = 17
TORCHSCRIPT_MAX_OPSET = 20  # torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET in torch 2.13
DYNAMO_MIN_OPSET = 18
# Ops that only make sense while training (or make inference random); none may reach a deployable.
TRAINING_ONLY_OPS = frozenset(
    {"Dropout", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial",
     "Gradient", "Momentum", "Adagrad", "Adam"}
)


class _ExportWrapper(nn.Module):
    """Returns the two deployable outputs as a tuple (exporters name outputs by position)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(pixel_values)
        return out.last_hidden_state, out.pooled


def _pre_export_checks(encoder) -> None:
    """Structural checks on the encoder before anything is exported; raise a MimcError to refuse.

    Other stages add their invariants here (one call each), e.g. the N:M checker of the sparsify
    stage when ``encoder.config.nm_pattern`` is set.
    """
    config = getattr(encoder, "config", None)
    if not isinstance(encoder, nn.Module) or config is None or not hasattr(config, "input_shape"):
        raise BadInputError(f"cannot export a {type(encoder).__name__}: pass a mimc Encoder (mimc.load(MODEL))")
    for name, p in encoder.named_parameters():
        if not torch.isfinite(p).all():
            raise BadInputError(f"parameter {name} holds NaN or Inf: the model is broken; re-create it from its source")
    from mimc.models.nm_pattern import check_nm

    check_nm(encoder)


def check_export_options(batch: Any, opset: int, exporter: str, precision: str) -> int | str:
    """Validate export options (the CLI calls this before loading anything); returns the batch."""
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter '{exporter}': choose one of {', '.join(EXPORTERS)}", option="exporter")
    if isinstance(batch, str) and batch != "dynamic":
        if not batch.isdigit():
            raise ConfigError(f"batch '{batch}' is neither a positive integer nor 'dynamic': give e.g. batch 1 or batch dynamic", option="batch")
        batch = int(batch)
    if not isinstance(batch, str) and (isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH):
        raise ConfigError(f"batch must be a positive integer up to {MAX_BATCH} or 'dynamic', got {batch!r}: give e.g. batch 1", option="batch")
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ConfigError(f"opset {opset} is too old: mimc exports opset >= {MIN_OPSET} (LayerNormalization as one node)", option="opset")
    if exporter == "torchscript" and opset > TORCHSCRIPT_MAX_OPSET:
        raise ConfigError(f"torchscript export writes opsets {MIN_OPSET}-{TORCHSCRIPT_MAX_OPSET}: lower opset or use exporter dynamo", option=("opset", "exporter"))
    gate_for(precision)  # unknown precision -> ConfigError
    return batch


def _check_destination(path: Path, encoder) -> bool:
    """Validate the output path; returns whether it lies in an artifact directory (manifest to update)."""
    if path.suffix != ".onnx":
        raise BadInputError(f"output {path} must end in .onnx: choose a path like model.onnx")
    if not path.parent.is_dir():
        raise BadInputError(f"output folder {path.parent} does not exist: create it or choose another output path")
    if path.is_dir():
        raise BadInputError(f"output {path} is a directory: give a file path ending in .onnx")
    if not is_artifact(path.parent):
        return False
    dir_sha = read_manifest(path.parent).weights_sha256
    own = getattr(encoder, "manifest", None)
    if dir_sha is not None and getattr(own, "weights_sha256", None) != dir_sha:
        # Its mimc.json would describe a graph made from other weights: a lie in the lineage.
        raise BadInputError(
            f"{path.parent} is an artifact of different weights than this encoder: save the encoder first "
            "(mimc.save) and export into that directory, or export to a path outside the artifact"
        )
    return True


def _torch_export(wrapper: nn.Module, example: torch.Tensor, out: Path, dynamic: bool, opset: int, exporter: str) -> None:
    common = dict(input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES), opset_version=opset)
    # Both exporters warn on every call (deprecation, tracer notes) and dynamo prints progress to
    # stdout; route all of it away from stdout so `--json` stays machine-readable.
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = {n: {0: "batch"} for n in (INPUT_NAME, *OUTPUT_NAMES)} if dynamic else None
            torch.onnx.export(wrapper, (example,), str(out), dynamo=False, dynamic_axes=axes,
                              do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL, **common)
        else:
            # dynamo implements opset >= 18 only; asking for 17 makes it attempt a down-conversion
            # that fails for Reduce ops and logs a traceback. Export at 18; the report says so.
            common["opset_version"] = max(opset, DYNAMO_MIN_OPSET)
            shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},) if dynamic else None
            logger = logging.getLogger("torch.onnx")
            level = logger.level
            logger.setLevel(logging.ERROR)  # "torchvision is not installed" notes on every export
            try:
                program = torch.onnx.export(wrapper, (example,), dynamo=True, dynamic_shapes=shapes, verbose=False,
                                            optimize=True, **common)
            finally:
                logger.setLevel(level)
            # Weights beside the graph always: a graph past 2 GiB cannot be one file, and
            # _finish_graph re-decides for the final graph from the summed initializer bytes.
            program.save(str(out), external_data=True)
            del program


def check_deployable(model) -> None:
    """Refuse a graph holding training-only or random ops (an onnx.ModelProto)."""
    bad = sorted({n.op_type for n in model.graph.node if n.op_type in TRAINING_ONLY_OPS})
    bad += [f"{n.op_type}(training_mode=1)" for n in model.graph.node
            if any(a.name == "training_mode" and a.i == 1 for a in n.attribute)]
    if bad:
        raise ValidationError(
            f"exported graph contains training-only ops {bad}: put the model in eval mode (encoder.eval()) and export again"
        )


def _finish_graph(tmp: Path, final_name: str, encoder, batch: int | str, precision: str, exporter: str) -> dict[str, Any]:
    """Stamp mimc metadata, enforce the deployable-graph rules, save (external data when huge).

    The exporter's graph is read without the weights it may have put beside it (TorchScript writes
    a model past 2 GiB as one file per tensor, dynamo as one .data file); ``save_graph`` streams
    them into the final graph's own ``.data`` file, or inlines them when the graph is small.
    """
    model = load_graph(tmp, external_data=False)  # weights stay in the exporter's files, read when written out
    check_deployable(model)
    manifest = getattr(encoder, "manifest", None)
    onnx.helper.set_model_props(model, {
        "mimc_version": mimc_version(),
        "mimc_encoder_config": json.dumps(encoder.config.to_dict(), sort_keys=True),
        "mimc_source": json.dumps(getattr(manifest, "source", {}) or {}, sort_keys=True),
        "mimc_precision": precision,
        "mimc_batch": str(batch),
        "mimc_exporter": f"torch {torch.__version__} {exporter}",
    })
    model.producer_name, model.producer_version = "mimc", mimc_version()
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.input, *model.graph.output]}
    final = tmp.parent.parent / "final" / final_name
    final.parent.mkdir()
    data = save_graph(model, final, base_dir=tmp.parent)  # external data from the summed initializer bytes
    del model
    shutil.rmtree(tmp.parent)  # the exporter's own files: not kept on disk next to their copy
    check_graph(final)  # the structure, without reading the weights (works past 2 GiB too)
    return {"opset": opset, "external_data": data, "file": final, "shapes": shapes}


def export_onnx(encoder, path: str | os.PathLike, batch: int | str = 1, opset: int = 17, exporter: str = "torchscript",
                validate: bool = True, force: bool = False, precision: str = "fp32", seed: int = 0) -> dict[str, Any]:
    """Export ``encoder`` to ``path`` (``.onnx``), validated on ONNX Runtime CPU; returns the report.

    ``batch``: an int (static) or ``"dynamic"``. ``precision`` picks the fidelity gate (see
    :data:`mimc.deploy.validate.GATES`); the graph's dtype follows the encoder's. When ``path`` lies
    in an artifact directory its ``mimc.json`` gets the report under ``files[<name>]``.
    """
    from mimc.data import deterministic_inputs

    batch = check_export_options(batch, opset, exporter, precision)
    if force and not validate:
        raise ConfigError("force keeps a graph that fails the fidelity gate, which only runs with validate: drop force", option=("force", "validate"))
    path = Path(path)
    in_artifact = _check_destination(path, encoder)
    _pre_export_checks(encoder)
    dynamic = batch == "dynamic"
    cfg = encoder.config
    # Validate at batch 2 when dynamic so a batch axis baked in as 1 cannot pass unnoticed.
    inputs = deterministic_inputs(cfg, batch=2 if dynamic else batch, seed=seed)
    was_training = encoder.training
    encoder.eval()  # restored below: the caller's module is not changed
    sweep_stale_temps(path.parent, path.name)  # a killed export's temp folder (its pid is gone)
    try:
        # claimed: of two exports into one artifact, one is refused (both recorded, then each moved its own graph in)
        with writing(path), claim_output(path), tempfile.TemporaryDirectory(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent) as tmp_dir:
            tmp = Path(tmp_dir) / "raw" / path.name
            tmp.parent.mkdir()
            start = time.perf_counter()
            _torch_export(_ExportWrapper(encoder), inputs, tmp, dynamic, opset, exporter)
            graph = _finish_graph(tmp, path.name, encoder, batch, precision, exporter)
            export_seconds = time.perf_counter() - start
            validation = None
            if validate:
                validation = _validate(encoder, graph["file"], inputs, precision, force, seed)
            report = _report(encoder, path, graph, batch, opset, exporter, precision, validation, export_seconds)
            # Record first, then move the graph into place: a process killed in between leaves a
            # mimc.json naming a graph that is not there yet (the next export writes it), never a
            # graph that its artifact does not describe.
            previous = _recorded_data(path) if in_artifact else None
            if in_artifact:
                _record_in_manifest(path, report)
            if graph["external_data"]:
                os.chmod(graph["file"].parent / graph["external_data"], 0o644)  # readable like the graph
                os.replace(graph["file"].parent / graph["external_data"], path.parent / graph["external_data"])
            os.replace(graph["file"], path)
            if previous and previous != graph["external_data"]:
                # the artifact's earlier graph kept its weights beside it; the new one does not read them
                (path.parent / previous).unlink(missing_ok=True)
    finally:
        encoder.train(was_training)
    return report


def _recorded_data(path: Path) -> str | None:
    """The external data file the artifact's mimc.json records for the graph at ``path`` (if any)."""
    entry = read_manifest(path.parent).files.get(path.name) or {}
    name = entry.get("external_data")
    return name if isinstance(name, str) and name == f"{path.name}.data" else None


def _validate(encoder, graph_file: Path, inputs: torch.Tensor, precision: str, force: bool, seed: int) -> dict[str, Any]:
    start = time.perf_counter()
    with torch.no_grad():
        out = encoder(inputs)
    reference = {"last_hidden_state": out.last_hidden_state, "pooled": out.pooled}
    del out
    gc.collect()  # the exporter's and the proto's memory is gone before ONNX Runtime loads the weights
    candidate = run_onnx(graph_file, inputs)  # from the path: ONNX Runtime reads external data beside it
    fidelity = compare_outputs(reference, candidate)
    failures = check_gate(fidelity, precision, what="exported graph (against the torch model)", force=force)
    return {
        **verdict(fidelity, precision, failures),
        "output_shapes": {k: list(v.shape) for k, v in candidate.items()},
        "inputs": f"mimc.data.deterministic_inputs(batch={inputs.shape[0]}, seed={seed})",
        "provider": "CPUExecutionProvider",
        "onnxruntime_version": onnxruntime().__version__,
        "seconds": round(time.perf_counter() - start, 3),
    }


def _report(encoder, path: Path, graph: dict, batch, opset: int, exporter: str, precision: str, validation,
            seconds: float) -> dict[str, Any]:
    # From the graph itself (token reduction changes the token count); where the exporter left an
    # axis symbolic, the shape ORT actually produced during validation fills it in.
    shapes = dict(graph["shapes"])
    seen = (validation or {}).get("output_shapes", {})
    for name, shape in seen.items():
        declared = shapes.get(name) or [None] * len(shape)
        shapes[name] = [d if isinstance(d, int) or i == 0 else shape[i] for i, d in enumerate(declared)]
    return {
        "kind": "onnx",
        "path": str(path),
        "file": path.name,
        "sha256": sha256_file(graph["file"]),
        "bytes": graph["file"].stat().st_size,
        "external_data": graph["external_data"],  # weights file beside the graph when over 2 GiB
        "external_data_bytes": (graph["file"].parent / graph["external_data"]).stat().st_size if graph["external_data"] else 0,
        # verified like the graph: a swapped or altered .data file is refused (mimc.artifact.verify_graph)
        "external_data_sha256": sha256_file(graph["file"].parent / graph["external_data"]) if graph["external_data"] else None,
        "opset": graph["opset"],  # what the graph declares (dynamo writes >= 18 even when 17 was asked)
        "opset_requested": opset,
        "exporter": exporter,
        "torch_version": torch.__version__,
        "batch": batch,
        "precision": precision,
        "inputs": {INPUT_NAME: shapes[INPUT_NAME]},
        "outputs": {name: shapes[name] for name in OUTPUT_NAMES},
        "validation": validation,
        "export_seconds": round(seconds, 3),
        "mimc_version": mimc_version(),
        "created": now_iso(),
    }


def _record_in_manifest(path: Path, report: dict[str, Any]) -> None:
    """Add the report under ``files[<name>]`` of the artifact's mimc.json (atomic rewrite)."""
    entry = {k: v for k, v in report.items() if k != "path"}  # relative to the artifact: it may move
    update_manifest(path.parent, lambda manifest: manifest.files.update({path.name: entry}))


__all__ = ["export_onnx", "check_deployable", "check_export_options", "INPUT_NAME", "OUTPUT_NAMES", "EXPORTERS", "TRAINING_ONLY_OPS"]
