"""What a graph says: the encoder mimc stamped into it, its inputs, its precision and N:M pattern.

A graph written by ``mimc export`` carries its EncoderConfig as JSON in the ``mimc_encoder_config``
metadata prop (and ``mimc_version``); an artifact directory's ``mimc.json`` beside the graph says the
same for graphs whose metadata was lost.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from mimc.artifact import MANIFEST_NAME, is_artifact, read_manifest
from mimc.errors import BadInputError, DataError
from mimc.graph.files import load_graph

ENCODER_CONFIG_KEY = "mimc_encoder_config"
VERSION_KEY = "mimc_version"
FLOAT8_TYPES = {getattr(TensorProto, n) for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ") if hasattr(TensorProto, n)}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
# ONNX element types -> ORT's type strings (what a session reports), for input specs.
ONNX_ELEM = {1: "tensor(float)", 10: "tensor(float16)", 11: "tensor(double)", 7: "tensor(int64)",
             6: "tensor(int32)", 2: "tensor(uint8)", 3: "tensor(int8)", 9: "tensor(bool)"}


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
    config = encoder_config_dict(load_graph(path, external_data=False))
    if config is None:
        raise BadInputError(f"{path} is not a mimc graph (no mimc metadata, no mimc.json beside it): export it with `mimc export MODEL`")
    return EncoderConfig.from_dict(config)


def token_reduced(model: onnx.ModelProto) -> bool:
    """The graph was exported with a token schedule (its token outputs depend on merge decisions)."""
    return (encoder_config_dict(model) or {}).get("token_schedule") is not None


def read_nm_pattern(onnx_path: str | Path, model: onnx.ModelProto | None = None) -> str | None:
    """The N:M pattern mimc recorded for this graph: the encoder config stamped into the graph's
    metadata by ``mimc export``, else the artifact's mimc.json beside the graph."""
    config = encoder_config_dict(model) if model is not None else None
    if config is None:  # (an artifact's manifest read as every reader does: checked, its hash too)
        folder = Path(onnx_path).parent
        config = read_manifest(folder).encoder if is_artifact(folder) else {}
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
    model = load_graph(model, external_data=False)  # dtypes only: a >2 GiB weights file stays on disk
    graph = model.graph
    dtypes = {i.name: i.data_type for i in graph.initializer}
    quant: set[str] = set()
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            out_type = next((a.i for a in node.attribute if a.name == "output_dtype"), 0)
            types = {out_type, *(dtypes.get(name) for name in (node.input[0], *node.input[2:3]))}  # x, zero point
            quant.add("fp8" if types & FLOAT8_TYPES else "int8")
        elif node.op_type in ("MatMulInteger", "QLinearMatMul", "ConvInteger", "QLinearConv", "DynamicQuantizeLinear"):
            quant.add("int8")
    if quant:
        return "fp8" if "fp8" in quant else "int8"
    floats = {i.data_type for i in graph.initializer} | {vi.type.tensor_type.elem_type for vi in graph.input}
    return "fp16" if TensorProto.FLOAT16 in floats else "bf16" if TensorProto.BFLOAT16 in floats else "fp32"


__all__ = ["metadata", "is_mimc_graph", "encoder_config_dict", "encoder_config_of_graph", "token_reduced", "read_nm_pattern",
           "graph_inputs", "input_dims", "single_input", "graph_precision", "ENCODER_CONFIG_KEY", "VERSION_KEY",
           "FLOAT8_TYPES", "FLOAT_TYPES"]
