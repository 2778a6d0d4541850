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
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from ..errors import BadInputError, ConfigError
from .flops_fused import FUSED_ATTENTION, qattention_costs, skeleton_nodes

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
FLOAT8_TYPES = {getattr(TensorProto, n) for n in ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ") if hasattr(TensorProto, n)}
INT8_TYPES = {TensorProto.INT8, TensorProto.UINT8}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}

# com.microsoft contrib ops (ORT's CPU int8 kernels) included: onnx cannot infer their shapes, see _skeleton.
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
    def activation_bytes(self) -> float:
        return sum(t.bytes for t in self.tensors if t.role != "weight")

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.activation_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op_type": self.op_type, "kind": self.kind, "precision": self.precision,
                "macs": self.macs, "flops": self.flops, "weight_bytes": self.weight_bytes,
                "activation_bytes": self.activation_bytes, "shapes_known": self.shapes_known}


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
    def bytes(self) -> float:
        return sum(n.bytes for n in self.nodes)

    @property
    def weight_bytes(self) -> float:
        return sum(n.weight_bytes for n in self.nodes)

    @property
    def unknown(self) -> list[str]:
        return [n.name for n in self.nodes if not n.shapes_known]

    def by_op(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for n in self.nodes:
            row = out.setdefault(n.op_type, {"count": 0, "macs": 0.0, "flops": 0.0, "bytes": 0.0})
            row["count"] += 1
            row["macs"] += n.macs
            row["flops"] += n.flops
            row["bytes"] += n.bytes
        return out

    def summary(self) -> dict[str, Any]:
        return {"batch": self.batch, "precision": self.precision, "gmacs": self.macs / 1e9, "gflops": self.flops / 1e9,
                "weight_mb": self.weight_bytes / 1e6, "total_mb": self.bytes / 1e6, "nodes": len(self.nodes),
                "nodes_with_unknown_shapes": self.unknown}


# Loading and shapes --------------------------------------------------------------------------------
def load_graph(model: str | Path | onnx.ModelProto) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise BadInputError(f"ONNX file {path} does not exist: export one with `mimc export`")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and friends; all mean the same to a user
        raise BadInputError(f"{path} is not a readable ONNX model ({type(exc).__name__}): export it again with `mimc export`") from exc


def _skeleton(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A light copy for shape inference: big initializers become typed graph inputs (copying hundreds of
    MB of weights only to read their dims is slow), and the first symbolic input dim becomes ``batch``."""
    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    graph = onnx.GraphProto()
    graph.name = model.graph.name
    init_dims = {i.name: list(i.dims) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in FUSED_ATTENTION:
            stand_in, stand_in_inits = skeleton_nodes(node, init_dims.get(node.input[1]))
            graph.node.extend(stand_in)
            graph.initializer.extend(stand_in_inits)
        elif node.op_type in CONTRIB_MATMULS:
            # Shape stand-in onnx understands: cast both operands to float and MatMul them (same output shape).
            a, b = (f"{node.output[0]}__mimc_shape_{i}" for i in "ab")
            graph.node.extend([
                onnx.helper.make_node("Cast", [node.input[0]], [a], to=TensorProto.FLOAT),
                onnx.helper.make_node("Cast", [node.input[1]], [b], to=TensorProto.FLOAT),
                onnx.helper.make_node("MatMul", [a, b], [node.output[0]]),
            ])
        else:
            graph.node.append(node)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    init_names = set()
    for init in model.graph.initializer:
        init_names.add(init.name)
        if math.prod(init.dims) <= 64:  # small ones may be shapes that shape inference folds
            graph.initializer.append(init)
        else:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        inp = copy.deepcopy(inp)
        dims = inp.type.tensor_type.shape.dim if inp.type.HasField("tensor_type") else []
        for axis, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                if axis == 0 and d.dim_value != batch:
                    raise ConfigError(
                        f"input '{inp.name}' has a static batch of {d.dim_value}, not {batch}: export with a dynamic batch axis or use batch {d.dim_value}"
                    )
                continue
            d.Clear()
            d.dim_value = batch if axis == 0 else 1
        graph.input.append(inp)
    out = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    out.functions.extend(model.functions)
    return out


def _infer(model: onnx.ModelProto) -> dict[str, tuple[int, list[int] | None]]:
    """Tensor name -> (dtype, concrete shape or None) after ONNX shape inference with data propagation."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # a custom op can stop onnx's inference; ORT's symbolic inference may still work
        inferred = model
    info = _collect(inferred)
    missing = _missing(inferred, info)
    if missing:
        try:  # ORT's symbolic inference folds Shape->Gather->Concat->Expand chains onnx leaves open
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            symbolic = _in_temp_dir(lambda: SymbolicShapeInference.infer_shapes(model, auto_merge=True))
            sym_info = _collect(symbolic)
            if _missing(symbolic, sym_info) < missing:
                info = {**info, **{k: v for k, v in sym_info.items() if v[1] is not None}}
        except Exception:  # not installed, or it gave up: keep onnx's answer
            pass
    return info


def _in_temp_dir(fn):
    """Run ``fn`` from a scratch directory: ORT's symbolic inference drops sym_shape_infer_temp.onnx
    into the working directory when it gives up, and mimc must not litter the user's folder."""
    import os
    import tempfile

    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="mimc-shapes-") as tmp:
        os.chdir(tmp)
        try:
            return fn()
        finally:
            os.chdir(cwd)


def _collect(model: onnx.ModelProto) -> dict[str, tuple[int, list[int] | None]]:
    info: dict[str, tuple[int, list[int] | None]] = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            continue
        shape: list[int] | None = []
        if not tt.HasField("shape"):
            shape = None
        else:
            for d in tt.shape.dim:
                if d.HasField("dim_value") and d.dim_value >= 0:
                    shape.append(int(d.dim_value))
                else:
                    shape = None
                    break
        info[vi.name] = (tt.elem_type, shape)
    for init in model.graph.initializer:
        info[init.name] = (init.data_type, list(init.dims))
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    info[node.output[0]] = (a.t.data_type, list(a.t.dims))
    return info


def _missing(model: onnx.ModelProto, info: dict) -> int:
    return sum(
        1 for n in model.graph.node if n.op_type not in VIEW_OPS and n.output and info.get(n.output[0], (0, None))[1] is None
    )


# Counting ------------------------------------------------------------------------------------------
def _numel(shape: list[int] | None) -> int:
    return int(math.prod(shape)) if shape is not None else 0


def precision_of_dtype(dtype: int) -> str:
    if dtype in FLOAT8_TYPES:
        return "fp8"
    if dtype in INT8_TYPES:
        return "int8"
    return {TensorProto.FLOAT16: "fp16", TensorProto.BFLOAT16: "bf16"}.get(dtype, "fp32")


def count_graph(model: str | Path | onnx.ModelProto, batch: int = 1) -> GraphCost:
    """Per-node MACs, FLOPs and bytes of ``model`` run at ``batch`` (see the module docstring)."""
    model = load_graph(model)
    info = _infer(_skeleton(model, batch))
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
        dtype, shape = info.get(src if src else name, (TensorProto.FLOAT, None))
        if src is None:
            dtype = info.get(name, (dtype, None))[0]
        if role != "output" and ((src or name) in weights or (src and _is_weight_chain(src, producer, weights))):
            role = "weight"
        return TensorUse(_numel(shape), dtype, role) if shape is not None else TensorUse(0, dtype, role)

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
            nodes.extend(qattention_costs(node, name, info, use, NodeCost, TensorUse, _numel))
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
    if op in CONV_OPS:
        k = _numel(b_shape[1:])  # (C_in / groups) x kernel volume per output element
        cost.macs = float(out_elems * k)
        bias_index = {"Conv": 2, "QLinearConv": 8}.get(op)  # ConvInteger has no bias input
        bias = bias_index is not None and len(node.input) > bias_index and bool(node.input[bias_index])
    elif op == "Gemm":
        trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
        k = a_shape[0] if trans_a else a_shape[-1]
        cost.macs = float(out_elems * k)
        bias = len(node.input) > 2 and node.input[2]
    else:
        k = a_shape[-1]
        cost.macs = float(out_elems * k)
        bias = False
    cost.flops = 2.0 * cost.macs + (out_elems if bias else 0)


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
