"""ONNX Runtime CPU fusion for the quantized graph: one ``com.microsoft.QAttention`` per block.

After :func:`mimc.quant.qdq_graph.rewrite_cpu` a block's attention is the int8 qkv
``MatMulIntegerToFloat`` followed by twelve float nodes (Reshape, Transpose, three Gathers, the
scale Mul, Transpose of k, q @ k^T, Softmax, @ v, Transpose, Reshape). ORT runs each of them as
its own kernel with its own thread-pool hand-off; ``QAttention`` does the same math in one kernel:
the u8 x s8 qkv GEMM (per-column weight scales, bias fused) and a float attention per head.

On ViT-B/16 it makes mimc int8 ~5 % faster (README, the int8 table: 63.0 / 64.5 ms against 66.7 / 66.7
unfused); outputs are bit-identical to the unfused graph (tests/quant/test_ort_fusion.py checks 1e-4).

Why written here rather than with onnxruntime.transformers' optimizer: its attention fusion
matches the graphs of particular exporters (HF BERT/ViT); on mimc's export it fuses residual Add +
LayerNorm and GELU but no attention (checked with ORT 1.32, model_type "vit"), and it knows nothing of the
MatMulIntegerToFloat nodes the CPU rewrite emits. The pass below matches mimc's own export
exactly and leaves every block it does not recognise untouched, saying why.

Only the plain softmax(q k^T * scale) v core fuses: a relative-position bias or mask added to the
logits (BEiT, data2vec-vision), attention probabilities or keys read by token pruning / merging,
or int8 attention matmuls (``--attention``) keep the unfused nodes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import helper, numpy_helper

from mimc.quant.qdq_graph import GraphIndex, opset, rebuild_nodes, transpose_perm


@dataclass
class _Core:
    qkv: object  # the MatMulIntegerToFloat of the qkv projection
    nodes: list  # the float nodes QAttention replaces
    output: str  # the tensor the proj linear reads
    num_heads: int
    scale: float


def _only_user(idx: GraphIndex, name: str, op_type: str, outputs: set):
    users = idx.consumers.get(name, [])
    if len(users) != 1 or users[0].op_type != op_type or name in outputs:
        return None
    return users[0]


def _shape_dims(idx: GraphIndex, name: str) -> list[int | None] | None:
    """A Reshape's target shape: constant, or a Concat of one-element pieces (dynamic batch exports
    compute batch and tokens with Shape -> Gather -> Unsqueeze); unknown entries are None."""
    value = idx.constant(name)
    if value is not None:
        return [int(v) for v in value] if value.ndim == 1 else None
    node = idx.producer.get(name)
    if node is None or node.op_type != "Concat":
        return None
    dims: list[int | None] = []
    for piece in node.input:
        part = idx.constant(piece)
        if part is not None:
            if part.size != 1:
                return None
            dims.append(int(part.reshape(())))
        elif (src := idx.producer.get(piece)) is not None and src.op_type == "Unsqueeze":
            dims.append(None)
        else:
            return None
    return dims


def _gather_index(idx: GraphIndex, node) -> int | None:
    if node.op_type != "Gather" or next((a.i for a in node.attribute if a.name == "axis"), 0) != 0:
        return None
    value = idx.constant(node.input[1])
    return int(value) if value is not None and value.ndim == 0 else None


def _match(idx: GraphIndex, qkv, outputs: set) -> _Core | str:
    """The float attention core after one qkv MatMulIntegerToFloat, or why it does not fuse."""
    reshape = _only_user(idx, qkv.output[0], "Reshape", outputs)
    if reshape is None:
        return "qkv output is not read by a single Reshape"
    shape = _shape_dims(idx, reshape.input[1])
    if shape is None or len(shape) != 5 or shape[2] != 3 or shape[3] is None or shape[4] is None:
        return "qkv Reshape is not (batch, tokens, 3, heads, head_dim) with constant heads and head_dim"
    heads, head_dim = shape[3], shape[4]
    weight = idx.constant_shape(qkv.input[1])
    if weight is None or len(weight) != 2 or heads <= 0 or head_dim <= 0 or weight[1] != 3 * heads * head_dim:
        return "qkv weight does not match the heads x head_dim split"
    split = _only_user(idx, reshape.output[0], "Transpose", outputs)
    if split is None or transpose_perm(split) != [2, 0, 3, 1, 4]:
        return "qkv is not permuted to (3, batch, heads, tokens, head_dim)"
    gathers = idx.consumers.get(split.output[0], [])
    by_index = {_gather_index(idx, g): g for g in gathers}
    if len(gathers) != 3 or set(by_index) != {0, 1, 2}:
        return "q, k, v are not three Gathers of the qkv tensor"
    q, k, v = by_index[0], by_index[1], by_index[2]
    mul = _only_user(idx, q.output[0], "Mul", outputs)
    scale = None if mul is None else idx.constant(next(i for i in mul.input if i != q.output[0]))
    if scale is None or scale.size != 1:
        return "q is not scaled by a constant scalar"
    k_t = _only_user(idx, k.output[0], "Transpose", outputs)
    if k_t is None or transpose_perm(k_t) != [0, 1, 3, 2]:
        return "k is read by something other than its transpose (token pruning or merging reads the keys)"
    logits = _only_user(idx, mul.output[0], "MatMul", outputs)
    if logits is None or list(logits.input) != [mul.output[0], k_t.output[0]] or idx.consumers.get(k_t.output[0]) != [logits]:
        return "q k^T is not a plain MatMul"
    softmax = _only_user(idx, logits.output[0], "Softmax", outputs)
    if softmax is None:
        return "the attention logits get a bias or mask before the softmax (relative position bias)"
    default_axis = -1 if opset(idx.model) >= 13 else 1
    if next((a.i for a in softmax.attribute if a.name == "axis"), default_axis) not in (-1, 3):
        return "softmax is not over the keys"
    context = _only_user(idx, softmax.output[0], "MatMul", outputs)
    if context is None or list(context.input) != [softmax.output[0], v.output[0]] or idx.consumers.get(v.output[0]) != [context]:
        return "the attention probabilities are read by something besides @ v (token pruning reads them)"
    merge = _only_user(idx, context.output[0], "Transpose", outputs)
    if merge is None or transpose_perm(merge) != [0, 2, 1, 3]:
        return "the context is not transposed back to (batch, tokens, heads, head_dim)"
    out = _only_user(idx, merge.output[0], "Reshape", outputs)
    out_shape = None if out is None else _shape_dims(idx, out.input[1])
    if out_shape is None or len(out_shape) != 3 or out_shape[2] not in (heads * head_dim, -1):
        return "the context is not reshaped to (batch, tokens, heads * head_dim)"
    nodes = [reshape, split, q, k, v, mul, k_t, logits, softmax, context, merge, out]
    return _Core(qkv, nodes, out.output[0], heads, float(scale.reshape(())))


def fuse_attention_cpu(model, base_dir=None) -> dict:
    """Replace each recognised block's qkv MatMulIntegerToFloat + float attention core by QAttention.

    Returns ``{"fused_attention_blocks": n, "unfused_attention": {reason: count}}``. The graph's
    math is unchanged (QAttention runs the same u8 x s8 GEMM and a float softmax attention).
    """
    idx = GraphIndex.build(model, base_dir)  # base_dir: where tensors kept in external data are read from
    outputs = {o.name for o in model.graph.output}
    cores, reasons = [], {}
    for node in model.graph.node:
        if node.op_type != "MatMulIntegerToFloat" or node.domain != "com.microsoft":
            continue
        users = idx.consumers.get(node.output[0], [])
        if not idx.is_constant(node.input[1]) or not users or users[0].op_type != "Reshape":
            continue  # proj / fc1 / fc2, or an attention matmul quantized with --attention
        core = _match(idx, node, outputs)
        if isinstance(core, str):
            reasons[core] = reasons.get(core, 0) + 1
        else:
            cores.append(core)
    replace, drop, inits = {}, set(), []
    for core in cores:
        a, w, a_scale, w_scale, a_zp, _, bias = (list(core.qkv.input) + [""] * 7)[:7]
        if not bias:  # QAttention needs a bias input: a Linear without one gets zeros
            bias = f"{core.qkv.name}_zero_bias"
            inits.append(numpy_helper.from_array(np.zeros(idx.constant_shape(w)[1], np.float32), bias))
        attrs = {"num_heads": core.num_heads}
        head_dim = idx.constant_shape(w)[1] // (3 * core.num_heads)
        if abs(core.scale - head_dim**-0.5) > 1e-7 * head_dim**-0.5:
            attrs["scale"] = core.scale
        replace[id(core.qkv)] = helper.make_node(
            "QAttention", [a, w, bias, a_scale, w_scale, "", a_zp], [core.output],
            name=f"{core.qkv.name}_qattention", domain="com.microsoft", **attrs)
        drop |= {id(n) for n in core.nodes}
    if replace:
        # Pruning afterwards: with the Reshapes gone, their shape arithmetic (dynamic batch) goes too.
        rebuild_nodes(model, lambda n, emit: [] if id(n) in drop else [replace.get(id(n), n)], inits)
    return {"fused_attention_blocks": len(cores), "unfused_attention": reasons}


__all__ = ["fuse_attention_cpu"]
