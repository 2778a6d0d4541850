"""FLOPs and bytes of every node of an ONNX graph, from the graph alone (no run).

References:
    Williams, Waterman, Patterson, "Roofline: an insightful visual performance model for multicore
    architectures", CACM 2009 (why FLOPs *and* bytes per node). The counting rules follow the usual
    convention of fvcore / ptflops (github.com/facebookresearch/fvcore, github.com/sovrasov/flops-counter.pytorch):
    one MAC per multiply-accumulate of a matrix product or convolution; ViT-B/16 at 224 px is 17.6 GMACs
    (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021; DeiT, Touvron et al. 2021, Table 1).

What is counted:
    * ``macs``: multiply-accumulates of MatMul / Gemm / Conv and their integer forms (MatMulInteger,
      QLinearMatMul, ConvInteger, QLinearConv), attention MatMuls with two dynamic operands included.
      This is the number papers publish.
    * ``flops``: 2 x macs + bias adds + elementwise work at the per-element costs of ``ELEMENTWISE_FLOPS``
      (Softmax 5, LayerNorm 8, GELU 8, transcendental 4, arithmetic 1): an estimate, not an instruction count.
    * bytes: weights read (initializers, at their stored width: an int8 weight behind a DequantizeLinear is
      1 byte) plus activations read and written. View ops (Reshape, Squeeze, ...) move nothing and cost 0.
      Q/DQ pairs are treated as fused into the op they feed, as TensorRT and ORT's QDQ fusion do: the
      consumer reads the quantized width and the Q/DQ nodes cost nothing.

Layout: the op tables, cost records and ORT's contrib ops (fused QAttention) are in
:mod:`~mimc.latency.flops_costs`, shape inference in :mod:`~mimc.latency.flops_shapes`; this module counts.
"""
from __future__ import annotations

import math
from pathlib import Path

import onnx
from onnx import TensorProto

from mimc.latency.flops_costs import (CONV_OPS, ELEMENTWISE_FLOPS, FUSED_ATTENTION, MATMUL_OPS, QDQ_OPS, REDUCE_OPS, VIEW_OPS,
                                      GraphCost, NodeCost, TensorUse, precision_of_dtype, qattention_costs)
from mimc.graph import graph_precision, load_graph
from mimc.latency.flops_shapes import tensor_info


# Counting ------------------------------------------------------------------------------------------
def _numel(shape: list[int] | None) -> int:
    return int(math.prod(shape)) if shape is not None else 0


def count_graph(model: str | Path | onnx.ModelProto, batch: int = 1) -> GraphCost:
    """Per-node MACs, FLOPs and bytes of ``model`` run at ``batch`` (see the module docstring)."""
    model = load_graph(model)
    info = tensor_info(model, batch)
    graph = model.graph
    for init in graph.initializer:  # dtypes and dims straight from the weights
        info[init.name] = (init.data_type, list(init.dims))
    initializers = {i.name: i for i in graph.initializer}
    weights = set(initializers) | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    producer = {o: n for n in graph.node for o in n.output}

    def dq_source(name: str) -> str | None:
        """The quantized tensor behind ``name`` when ``name`` is a DequantizeLinear output."""
        node = producer.get(name)
        return node.input[0] if node is not None and node.op_type == "DequantizeLinear" else None

    def use(name: str, role: str) -> TensorUse | None:
        if not name:
            return None
        src = dq_source(name) if role != "output" else None
        # A DQ output is read at the quantized width (the DQ is fused into its consumer).
        dtype, shape = info.get(src or name, (TensorProto.FLOAT, None))
        if role != "output" and ((src or name) in weights or (src and _is_weight_chain(src, producer, weights))):
            role = "weight"
        return TensorUse(_numel(shape), dtype, role)

    nodes: list[NodeCost] = []
    for i, node in enumerate(graph.node):
        name = node.name or f"{node.op_type}_{i}"
        op = node.op_type
        out_dtype, out_shape = info.get(node.output[0], (TensorProto.FLOAT, None)) if node.output else (TensorProto.FLOAT, [])
        if op in VIEW_OPS:
            nodes.append(NodeCost(name, op, "view"))
            continue
        if op in QDQ_OPS:
            nodes.append(NodeCost(name, op, "fused"))
            continue
        if op in FUSED_ATTENTION:  # qkv GEMM (int8) + attention (fp32) in one kernel: two entries
            nodes.extend(qattention_costs(node, name, info, use))
            continue
        cost = NodeCost(name, op, "memory")
        # Keep one entry per input position (empty optional inputs as zero) so operand indices line up.
        cost.tensors = [use(x, "input") or TensorUse(0, TensorProto.FLOAT, "input") for x in node.input]
        cost.tensors += [t for t in (use(y, "output") for y in node.output) if t is not None]
        cost.shapes_known = out_shape is not None
        out_elems = _numel(out_shape)
        if op in MATMUL_OPS or op in CONV_OPS:
            _count_dense(cost, node, info, out_shape, dq_source)
        elif op in ELEMENTWISE_FLOPS:
            cost.kind = "elementwise"
            cost.flops = ELEMENTWISE_FLOPS[op] * out_elems
            cost.precision = precision_of_dtype(out_dtype)
        elif op in REDUCE_OPS:
            cost.kind = "reduce"
            cost.flops = float(_numel(info.get(node.input[0], (0, None))[1]))
            cost.precision = precision_of_dtype(out_dtype)
        else:
            cost.precision = precision_of_dtype(out_dtype)
        nodes.append(cost)
    return GraphCost(nodes, batch, graph_precision(model), initializers)


def _is_weight_chain(name: str, producer: dict, weights: set[str]) -> bool:
    """A quantized tensor made from weights only (e.g. QuantizeLinear of an fp32 initializer)."""
    node = producer.get(name)
    return node is not None and node.op_type == "QuantizeLinear" and node.input[0] in weights


def _count_dense(cost: NodeCost, node: onnx.NodeProto, info: dict, out_shape: list[int] | None, dq_source) -> None:
    op = node.op_type
    a_idx, b_idx = {"QLinearMatMul": (0, 3), "QLinearConv": (0, 3)}.get(op, (0, 1))
    a_name, b_name = node.input[a_idx], node.input[b_idx]
    a_src, b_src = dq_source(a_name), dq_source(b_name)
    a_dtype, a_shape = info.get(a_src or a_name, (TensorProto.FLOAT, None))
    b_dtype, b_shape = info.get(b_src or b_name, (TensorProto.FLOAT, None))
    cost.kind = "conv" if op in CONV_OPS else "matmul"
    # Precision of the arithmetic: the lowest-precision operand (int8 x int8 = int8, fp8 Q/DQ = fp8).
    precisions = {precision_of_dtype(a_dtype), precision_of_dtype(b_dtype)}
    cost.precision = next((p for p in ("fp8", "int8", "fp16", "bf16") if p in precisions), "fp32")
    if len(cost.tensors) > b_idx and cost.tensors[b_idx].role == "weight":
        cost.weight = b_src or b_name
    if out_shape is None or a_shape is None or b_shape is None:
        cost.shapes_known = False
        return
    out_elems = _numel(out_shape)
    k, bias = a_shape[-1], False
    if op in CONV_OPS:
        k = _numel(b_shape[1:])  # (C_in / groups) x kernel volume per output element
        bias_index = {"Conv": 2, "QLinearConv": 8}.get(op)  # ConvInteger has no bias input
        bias = bias_index is not None and len(node.input) > bias_index and bool(node.input[bias_index])
    elif op == "Gemm":
        if next((a.i for a in node.attribute if a.name == "transA"), 0):
            k = a_shape[0]
        bias = len(node.input) > 2 and node.input[2]
    cost.macs = float(out_elems * k)
    cost.flops = 2.0 * cost.macs + (out_elems if bias else 0)


__all__ = ["count_graph"]
