"""What the FLOP counter knows about ONNX: dtype widths, op classes, per-element costs, and the
cost records it returns (:class:`TensorUse`, :class:`NodeCost`, :class:`GraphCost`).

References:
    The per-op classes and costs follow the conventions of fvcore and ptflops
    (github.com/facebookresearch/fvcore, github.com/sovrasov/flops-counter.pytorch); the bytes per
    node feed a roofline (Williams, Waterman, Patterson, CACM 2009). See :mod:`mimc.latency.flops`
    for the counting rules these tables encode.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import onnx
from onnx import TensorProto

from mimc.graph import FLOAT8_TYPES, FLOAT_TYPES  # noqa: F401  (re-exported with the other dtype tables)

# Element byte widths by ONNX dtype; float8 and int4 exist only in Q/DQ graphs.
DTYPE_BYTES: dict[int, float] = {
    TensorProto.FLOAT: 4, TensorProto.DOUBLE: 8, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2,
    TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.INT16: 2, TensorProto.UINT16: 2,
    TensorProto.INT32: 4, TensorProto.UINT32: 4, TensorProto.INT64: 8, TensorProto.UINT64: 8,
    TensorProto.BOOL: 1,
}
for _name in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ"):
    if hasattr(TensorProto, _name):
        DTYPE_BYTES[getattr(TensorProto, _name)] = 1
for _name in ("INT4", "UINT4"):
    if hasattr(TensorProto, _name):
        DTYPE_BYTES[getattr(TensorProto, _name)] = 0.5
INT8_TYPES = {TensorProto.INT8, TensorProto.UINT8}

# com.microsoft contrib ops (ORT's CPU int8 kernels) included: onnx cannot infer their shapes, see flops_shapes._skeleton.
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


__all__ = [
    "DTYPE_BYTES", "FLOAT8_TYPES", "INT8_TYPES", "FLOAT_TYPES", "CONTRIB_MATMULS", "MATMUL_OPS", "CONV_OPS",
    "QDQ_OPS", "VIEW_OPS", "ELEMENTWISE_FLOPS", "REDUCE_OPS", "TensorUse", "NodeCost", "GraphCost",
    "precision_of_dtype",
]
