"""FLOPs and bytes of ONNX Runtime's fused attention kernel ``com.microsoft.QAttention``; shape stand-ins for ORT contrib ops.

mimc's CPU int8 graph runs each block's qkv projection and attention as one QAttention node
(mimc/quant/ort_fusion.py). One node, two kinds of arithmetic: the qkv GEMM is u8 x s8, the
attention (q k^T, softmax, @ v) is fp32. It is counted as two entries, ``<name>/qkv`` (int8, with
its weight) and ``<name>/attention`` (fp32), so a roofline applies each its own peak.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from mimc.latency.flops_costs import NodeCost, TensorUse

FUSED_ATTENTION = {"QAttention"}


def skeleton_nodes(node: onnx.NodeProto, weight_dims: list[int] | None) -> tuple[list, list]:
    """Shape stand-in onnx can infer for an ORT contrib matmul or QAttention: float(input) @ float(weight)
    (the contrib matmuls' output shape); for QAttention the first third of its last axis (the output is
    (batch, tokens, hidden) for a (in, 3 * hidden) weight)."""
    attention = node.op_type in FUSED_ATTENTION
    if attention and (weight_dims is None or len(weight_dims) != 2):
        return [], []  # unknown weight: the output shape stays unknown and is reported as such
    a, b, full, starts, ends, axes = (f"{node.output[0]}__mimc_shape_{k}" for k in ("a", "b", "full", "s", "e", "x"))
    nodes = [
        onnx.helper.make_node("Cast", [node.input[0]], [a], to=TensorProto.FLOAT),
        onnx.helper.make_node("Cast", [node.input[1]], [b], to=TensorProto.FLOAT),
        onnx.helper.make_node("MatMul", [a, b], [full if attention else node.output[0]]),
    ]
    if not attention:
        return nodes, []
    hidden = int(weight_dims[1]) // 3
    inits = [numpy_helper.from_array(np.array([v], dtype=np.int64), name)
             for v, name in ((0, starts), (hidden, ends), (-1, axes))]
    return [*nodes, onnx.helper.make_node("Slice", [full, starts, ends, axes], [node.output[0]])], inits


def qattention_costs(node: onnx.NodeProto, name: str, info: dict, use) -> list[NodeCost]:
    """Two NodeCost entries for one QAttention node (see the module docstring)."""
    in_dtype, in_shape = info.get(node.input[0], (TensorProto.UINT8, None))
    w_dtype, w_shape = info.get(node.input[1], (TensorProto.INT8, None))
    heads = next((a.i for a in node.attribute if a.name == "num_heads"), 0)
    qkv = NodeCost(f"{name}/qkv", node.op_type, "matmul", precision="int8")
    attention = NodeCost(f"{name}/attention", node.op_type, "matmul", precision="fp32")
    qkv.tensors = [t for t in (use(node.input[0], "input"), use(node.input[1], "input"), use(node.input[2], "input")) if t is not None]
    qkv.weight = node.input[1] if qkv.tensors[1].role == "weight" else None
    if in_shape is None or w_shape is None or len(in_shape) != 3 or len(w_shape) != 2 or heads <= 0:
        qkv.shapes_known = attention.shapes_known = False
        return [qkv, attention]
    batch, tokens, width = in_shape
    hidden = w_shape[1] // 3
    rows = batch * tokens
    qkv.macs = float(rows * width * 3 * hidden)
    qkv.flops = 2.0 * qkv.macs + rows * 3 * hidden  # + bias
    qkv.tensors.append(TensorUse(rows * 3 * hidden, TensorProto.FLOAT, "output"))
    scores = batch * heads * tokens * tokens
    attention.macs = float(2 * scores * (hidden // heads))  # q k^T and probabilities @ v
    attention.flops = 2.0 * attention.macs + 5.0 * scores  # + scale-and-softmax
    attention.tensors = [TensorUse(rows * 3 * hidden, TensorProto.FLOAT, "input"),
                         TensorUse(rows * hidden, TensorProto.FLOAT, "output")]
    return [qkv, attention]


__all__ = ["FUSED_ATTENTION", "skeleton_nodes", "qattention_costs"]
