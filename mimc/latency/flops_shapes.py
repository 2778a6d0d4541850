"""Loading an ONNX graph and learning every tensor's shape without running it (for the FLOP counter).

References:
    ONNX shape inference with data propagation (github.com/onnx/onnx, docs/ShapeInference.md) and,
    where it leaves shapes open, ONNX Runtime's symbolic shape inference
    (github.com/microsoft/onnxruntime, onnxruntime/python/tools/symbolic_shape_infer.py).

Inference runs on a light skeleton of the graph (weights as typed inputs, contrib ops replaced by
stand-ins onnx understands), so counting a ViT-B graph does not copy its weights.
"""
from __future__ import annotations

import copy
import math

import onnx

from mimc.errors import ConfigError
from mimc.latency.flops_costs import CONTRIB_MATMULS, FUSED_ATTENTION, VIEW_OPS, skeleton_nodes


def tensor_info(model: onnx.ModelProto, batch: int) -> dict[str, tuple[int, list[int] | None]]:
    """Tensor name -> (dtype, concrete shape or None) of ``model`` run at ``batch``."""
    return _infer(_skeleton(model, batch))


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
    return sum(
        1 for n in model.graph.node if n.op_type not in VIEW_OPS and n.output and info.get(n.output[0], (0, None))[1] is None
    )


__all__ = ["tensor_info"]
