"""ONNX graph utilities: load a graph, read what mimc stamped into it, its inputs, precision and N:M pattern.

A graph written by ``mimc export`` carries its EncoderConfig as JSON in the ``mimc_encoder_config``
metadata prop (and ``mimc_version``); an artifact directory's ``mimc.json`` beside the graph says the
same for graphs whose metadata was lost. Everything here reads graphs; nothing runs them (that is
:mod:`mimc.runtime`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from mimc.artifact import MANIFEST_NAME, is_artifact, read_manifest
from mimc.errors import BadInputError, DataError

ENCODER_CONFIG_KEY = "mimc_encoder_config"
VERSION_KEY = "mimc_version"
FLOAT8_TYPES = {getattr(TensorProto, n) for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ") if hasattr(TensorProto, n)}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
# ONNX element types -> ORT's type strings (what a session reports), for input specs.
ONNX_ELEM = {1: "tensor(float)", 10: "tensor(float16)", 11: "tensor(double)", 7: "tensor(int64)",
             6: "tensor(int32)", 2: "tensor(uint8)", 3: "tensor(int8)", 9: "tensor(bool)"}


def load_graph(model: str | Path | onnx.ModelProto, external_data: bool = True) -> onnx.ModelProto:
    """A ModelProto from a path (a loaded one passes through); a one-line BadInputError otherwise.

    ``external_data=False`` reads only the graph, not a >2 GiB weights file beside it (metadata, inputs).
    """
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise BadInputError(f"ONNX file {path} does not exist: export one with `mimc export MODEL`")
    try:
        return onnx.load(str(path), load_external_data=external_data)
    except Exception as exc:  # onnx raises DecodeError/ValueError/OSError for a non-ONNX file; all mean the same
        raise BadInputError(f"{path} is not a readable ONNX model ({type(exc).__name__}): export it again with `mimc export MODEL`") from exc


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def is_mimc_graph(path: str | Path, model: onnx.ModelProto) -> bool:
    """Written by mimc: mimc metadata in the graph, or an artifact's mimc.json beside it."""
    return VERSION_KEY in metadata(model) or (Path(path).parent / MANIFEST_NAME).is_file()


def encoder_config_dict(model: onnx.ModelProto) -> dict[str, Any] | None:
    """The EncoderConfig (as a dict) stamped into the graph's metadata; None when absent or unreadable."""
    raw = metadata(model).get(ENCODER_CONFIG_KEY)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def encoder_config_of_graph(path: str | Path):
    """The EncoderConfig a mimc graph was exported from: its artifact's mimc.json, else its metadata."""
    from mimc.models.vit import EncoderConfig

    path = Path(path)
    if is_artifact(path.parent):
        return EncoderConfig.from_dict(read_manifest(path.parent).encoder)
    model = load_graph(path, external_data=False)
    meta = metadata(model)
    if ENCODER_CONFIG_KEY not in meta:
        raise BadInputError(f"{path} is not a mimc graph (no mimc metadata, no mimc.json beside it): export it with `mimc export MODEL`")
    return EncoderConfig.from_dict(json.loads(meta[ENCODER_CONFIG_KEY]))


def token_reduced(model: onnx.ModelProto) -> bool:
    """The graph was exported with a token schedule (its token outputs depend on merge decisions)."""
    return (encoder_config_dict(model) or {}).get("token_schedule") is not None


def read_nm_pattern(onnx_path: str | Path, model: onnx.ModelProto | None = None) -> str | None:
    """The N:M pattern mimc recorded for this graph: the encoder config stamped into the graph's
    metadata by ``mimc export``, else the artifact's mimc.json beside the graph."""
    config = encoder_config_dict(model) if model is not None else None
    if config is None:
        try:
            config = json.loads((Path(onnx_path).parent / MANIFEST_NAME).read_text()).get("encoder") or {}
        except (OSError, json.JSONDecodeError):
            return None
    return config.get("nm_pattern")


# Inputs -------------------------------------------------------------------------------------------
def graph_inputs(model: onnx.ModelProto, path: str | Path | None = None) -> list[dict[str, Any]]:
    """Name, dtype (ORT's type string) and dims (None for a symbolic axis) of every real graph input."""
    initializers = {i.name for i in model.graph.initializer}
    out = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]
        out.append({"name": value.name, "dtype": ONNX_ELEM.get(t.elem_type, f"elem_type {t.elem_type}"), "shape": dims})
    if not out:
        raise BadInputError(f"{path or 'the graph'} has no inputs to feed: pass a graph with an input such as pixel_values")
    return out


def input_dims(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Graph input name -> dims (None where symbolic), initializers excluded."""
    return {i["name"]: i["shape"] for i in graph_inputs(model)}


def single_input(model: onnx.ModelProto) -> tuple[str, int | None, tuple[int, ...]]:
    """(name, static batch or None, per-sample shape) of an encoder graph's only input."""
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise DataError(f"the graph has {len(inputs)} inputs: mimc quantizes encoders with one input (pixel_values)")
    dims = inputs[0]["shape"]
    return inputs[0]["name"], (dims[0] if dims else None), tuple(d or 0 for d in dims[1:])


# Precision ----------------------------------------------------------------------------------------
def graph_precision(model: str | Path | onnx.ModelProto) -> str:
    """The precision a graph carries: fp8 / int8 when it has Q/DQ (or integer matmuls), fp16 / bf16
    when its matmuls take half-precision tensors, else fp32. TensorRT 11 builds exactly this."""
    model = load_graph(model)
    graph = model.graph
    dtypes = {i.name: i.data_type for i in graph.initializer}
    quant: set[str] = set()
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
            out_type = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
            zp_type = dtypes.get(zp) if zp else None
            if zp_type in FLOAT8_TYPES or out_type in FLOAT8_TYPES or dtypes.get(node.input[0]) in FLOAT8_TYPES:
                quant.add("fp8")
            else:
                quant.add("int8")
        elif node.op_type in ("MatMulInteger", "QLinearMatMul", "ConvInteger", "QLinearConv", "DynamicQuantizeLinear"):
            quant.add("int8")
    if "fp8" in quant:
        return "fp8"
    if "int8" in quant:
        return "int8"
    floats = {i.data_type for i in graph.initializer if i.data_type in FLOAT_TYPES}
    floats |= {vi.type.tensor_type.elem_type for vi in graph.input}
    if TensorProto.FLOAT16 in floats:
        return "fp16"
    if TensorProto.BFLOAT16 in floats:
        return "bf16"
    return "fp32"


__all__ = [
    "load_graph", "metadata", "is_mimc_graph", "encoder_config_dict", "encoder_config_of_graph", "token_reduced",
    "read_nm_pattern", "graph_inputs", "input_dims", "single_input", "graph_precision",
    "ENCODER_CONFIG_KEY", "VERSION_KEY", "FLOAT8_TYPES", "FLOAT_TYPES",
]
