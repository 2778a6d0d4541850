"""What the FLOP counter knows about ONNX: dtype widths, op classes, per-element costs, the cost
records it returns (:class:`TensorUse`, :class:`NodeCost`, :class:`GraphCost`), and ORT's contrib ops:
shape stand-ins for them and the costs of the fused ``QAttention``. The counting rules these tables
encode, and their references, are :mod:`mimc.latency.flops`'s.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from mimc.graph import FLOAT8_TYPES, FLOAT_TYPES

# Element byte widths by ONNX dtype; float8 and int4 exist only in Q/DQ graphs.
DTYPE_BYTES: dict[int, float] = {
    TensorProto.FLOAT: 4, TensorProto.DOUBLE: 8, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2,
    TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.INT16: 2, TensorProto.UINT16: 2,
    TensorProto.INT32: 4, TensorProto.UINT32: 4, TensorProto.INT64: 8, TensorProto.UINT64: 8,
    TensorProto.BOOL: 1, **dict.fromkeys(FLOAT8_TYPES, 1),
    **{getattr(TensorProto, name): 0.5 for name in ("INT4", "UINT4") if hasattr(TensorProto, name)},
}
INT8_TYPES = {TensorProto.INT8, TensorProto.UINT8}

# com.microsoft contrib ops (ORT's CPU int8 kernels) included: onnx cannot infer their shapes, see flops._skeleton.
CONTRIB_MATMULS = {"MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
MATMUL_OPS = {"MatMul", "MatMulInteger", "QLinearMatMul", "Gemm", "FusedMatMul", *CONTRIB_MATMULS}
CONV_OPS = {"Conv", "ConvInteger", "QLinearConv"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
# Ops that only reinterpret a buffer: no data moved, no math.
VIEW_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Size", "Constant", "Dropout"}
ELEMENTWISE_FLOPS: dict[str, float] = {
    **dict.fromkeys(["Add", "Sub", "Mul", "Div", "Max", "Min", "Neg", "Abs", "Relu", "Sqrt", "Reciprocal",
                     "Pow", "Where", "Clip", "LeakyRelu", "Equal", "Less", "Greater", "Not", "And", "Or",
                     "Floor", "Ceil", "Round", "Sign", "Mod"], 1.0),
    **dict.fromkeys(["Exp", "Log", "Erf", "Tanh", "Sigmoid", "Sin", "Cos", "HardSigmoid"], 4.0),
    "Softmax": 5.0,  # max, subtract, exp, sum, divide
    "LogSoftmax": 5.0,
    "LayerNormalization": 8.0,  # mean, centre, square, mean, rsqrt, normalise, scale, shift
    "SimplifiedLayerNormalization": 6.0,
    "Gelu": 8.0, "FastGelu": 8.0, "BiasGelu": 9.0,
    "BatchNormalization": 2.0, "InstanceNormalization": 8.0, "GroupNormalization": 8.0,
    "DynamicQuantizeLinear": 3.0,  # min/max reduction, scale, round
}
REDUCE_OPS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2", "ReduceSumSquare", "ArgMax", "ArgMin"}


def precision_of_dtype(dtype: int) -> str:
    if dtype in FLOAT8_TYPES:
        return "fp8"
    if dtype in INT8_TYPES:
        return "int8"
    return {TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}.get(dtype, "fp32")


@dataclass
class TensorUse:
    """One tensor a node reads or writes: element count, stored dtype, and its role."""

    elems: int
    dtype: int
    role: str  # "weight" | "input" | "output"

    @property
    def bytes(self) -> float:
        return self.elems * DTYPE_BYTES.get(self.dtype, 4)

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_TYPES


@dataclass
class NodeCost:
    name: str
    op_type: str
    kind: str  # "matmul" | "conv" | "elementwise" | "reduce" | "memory" | "view" | "fused"
    macs: float = 0.0
    flops: float = 0.0
    precision: str = "fp32"  # the arithmetic's precision: fp32 | fp16 | bf16 | int8 | fp8
    tensors: list[TensorUse] = field(default_factory=list)
    weight: str | None = None  # initializer name of a MatMul/Gemm/Conv weight (for N:M checks)
    shapes_known: bool = True

    @property
    def weight_bytes(self) -> float:
        return sum(t.bytes for t in self.tensors if t.role == "weight")

    @property
    def bytes(self) -> float:
        return sum(t.bytes for t in self.tensors)


@dataclass
class GraphCost:
    nodes: list[NodeCost]
    batch: int
    precision: str  # the graph's precision (see graph_precision)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict, repr=False)

    @property
    def macs(self) -> float:
        return sum(n.macs for n in self.nodes)

    @property
    def flops(self) -> float:
        return sum(n.flops for n in self.nodes)

    @property
    def unknown(self) -> list[str]:
        return [n.name for n in self.nodes if not n.shapes_known]



# ORT's contrib ops -------------------------------------------------------------------------------
# mimc's CPU int8 graph runs each block's qkv projection and attention as one com.microsoft.QAttention
# node (mimc/quant/ort_fusion.py). One node, two kinds of arithmetic: the qkv GEMM is u8 x s8, the
# attention (q k^T, softmax, @ v) is fp32. It is counted as two entries, ``<name>/qkv`` (int8, with its
# weight) and ``<name>/attention`` (fp32), so a roofline applies each its own peak.
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
    """Two NodeCost entries for one QAttention node (see above)."""
    in_shape = info.get(node.input[0], (TensorProto.UINT8, None))[1]
    w_shape = info.get(node.input[1], (TensorProto.INT8, None))[1]
    heads = next((a.i for a in node.attribute if a.name == "num_heads"), 0)
    qkv = NodeCost(f"{name}/qkv", node.op_type, "matmul", precision="int8")
    attention = NodeCost(f"{name}/attention", node.op_type, "matmul", precision="fp32")
    qkv.tensors = [t for t in (use(x, "input") for x in node.input[:3]) if t is not None]
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


__all__ = [
    "DTYPE_BYTES", "INT8_TYPES", "CONTRIB_MATMULS", "MATMUL_OPS", "CONV_OPS",
    "QDQ_OPS", "VIEW_OPS", "ELEMENTWISE_FLOPS", "REDUCE_OPS", "TensorUse", "NodeCost", "GraphCost",
    "precision_of_dtype", "FUSED_ATTENTION", "skeleton_nodes", "qattention_costs",
]
