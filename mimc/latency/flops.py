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

Shapes: ONNX shape inference with data propagation (github.com/onnx/onnx, docs/ShapeInference.md) and,
where it leaves shapes open, ONNX Runtime's symbolic shape inference (github.com/microsoft/onnxruntime,
onnxruntime/python/tools/symbolic_shape_infer.py), run on a light skeleton of the graph (weights as
typed inputs, contrib ops replaced by stand-ins onnx understands), so counting a ViT-B graph does not
copy its weights.

Layout: the op tables, cost records and ORT's contrib ops (fused QAttention) are in
:mod:`~mimc.latency.flops_costs`; this module infers shapes and counts.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import onnx
from onnx import TensorProto

from mimc.errors import ConfigError
from mimc.latency.flops_costs import (CONTRIB_MATMULS, CONV_OPS, ELEMENTWISE_FLOPS, FUSED_ATTENTION, MATMUL_OPS,
                                      QDQ_OPS, REDUCE_OPS, VIEW_OPS, GraphCost, NodeCost, TensorUse, precision_of_dtype,
                                      qattention_costs, skeleton_nodes)
from mimc.graph import graph_precision, load_graph


# Shapes --------------------------------------------------------------------------------------------
def _skeleton(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A light copy for shape inference: big initializers become typed graph inputs (copying hundreds of
    MB of weights only to read their dims is slow), and the first symbolic input dim becomes ``batch``."""
    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    graph = onnx.GraphProto()
    graph.name = model.graph.name
    init_dims = {i.name: list(i.dims) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in FUSED_ATTENTION or node.op_type in CONTRIB_MATMULS:
            stand_in, stand_in_inits = skeleton_nodes(node, init_dims.get(node.input[1]))
            graph.node.extend(stand_in)
            graph.initializer.extend(stand_in_inits)
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
                    raise ConfigError(f"input '{inp.name}' has a static batch of {d.dim_value}, not {batch}: "
                                      f"export with a dynamic batch axis or use batch_sizes {d.dim_value}", option="batch_sizes")
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
            symbolic = _symbolic(model)
            sym_info = _collect(symbolic)
            if _missing(symbolic, sym_info) < missing:
                info = {**info, **{k: v for k, v in sym_info.items() if v[1] is not None}}
        except Exception:  # not installed, or it gave up: keep onnx's answer
            pass
    return info


def _symbolic(model: onnx.ModelProto) -> onnx.ModelProto:
    """ORT's ``SymbolicShapeInference.infer_shapes(model, auto_merge=True)`` less its last step: when it
    gives up, that saves sym_shape_infer_temp.onnx into the working directory, which mimc neither
    litters nor changes (a chdir is the whole process's: another thread's relative paths would move)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inference = SymbolicShapeInference(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess_output_rank, verbose
    inference._preprocess(model)
    complete = False
    while inference.run_:
        complete = inference._infer_impl()
    if not complete:
        raise RuntimeError("incomplete symbolic shape inference")
    inference._update_output_from_vi()
    return inference.out_mp_


def _collect(model: onnx.ModelProto) -> dict[str, tuple[int, list[int] | None]]:
    info: dict[str, tuple[int, list[int] | None]] = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        if not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        dims = tt.shape.dim if tt.HasField("shape") else None
        known = dims is not None and all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims)
        info[vi.name] = (tt.elem_type, [int(d.dim_value) for d in dims] if known else None)
    for init in model.graph.initializer:
        info[init.name] = (init.data_type, list(init.dims))
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    info[node.output[0]] = (a.t.data_type, list(a.t.dims))
    return info


def _missing(model: onnx.ModelProto, info: dict) -> int:
    return sum(1 for n in model.graph.node
               if n.op_type not in VIEW_OPS and n.output and info.get(n.output[0], (0, None))[1] is None)


# Counting ------------------------------------------------------------------------------------------
def _numel(shape: list[int] | None) -> int:
    return int(math.prod(shape)) if shape is not None else 0


def count_graph(model: str | Path | onnx.ModelProto, batch: int = 1) -> GraphCost:
    """Per-node MACs, FLOPs and bytes of ``model`` run at ``batch`` (see the module docstring)."""
    model = load_graph(model)
    info = _infer(_skeleton(model, batch))  # tensor name -> (dtype, concrete shape or None) at ``batch``
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
    b_idx = 3 if op in ("QLinearMatMul", "QLinearConv") else 1  # QLinear ops: (a, a_scale, a_zero_point, b, ...)
    a_name, b_name = node.input[0], node.input[b_idx]
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
