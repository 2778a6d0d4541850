"""Where quantization goes in an exported mimc encoder graph, and the rewrites that put it there.

A mimc encoder exports every Linear as ``MatMul(x, W[in, out]) -> Add(bias)``; the two attention
products are MatMuls of two activations. Everything else (LayerNorm, Softmax, GELU, residual
Adds, pooling; the patch-embedding Conv except for the openvino target) stays float: quantizing
LayerNorm/Softmax/residual Adds dropped ViT-B's feature cosine to 0.947, W8A8 on the four block
linears keeps it at 0.999.

Two rewrites, laid out per target in mimc/quant/quantize.py (with why and what they were measured
against): :func:`rewrite_qdq`, standard ONNX QuantizeLinear/DequantizeLinear pairs (tensorrt, fp8,
openvino; activations symmetric, as TensorRT int8 has no zero point), and :func:`rewrite_cpu`,
``com.microsoft.MatMulIntegerToFloat`` fed by static u8 QuantizeLinear (cpu).

The graph-level outlier folding (SmoothQuant / RepQ) is mimc/quant/fold_graph.py, on the sites found here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import helper, numpy_helper

from mimc.graph import read_tensor

FP8_MAX = 448.0  # largest finite FLOAT8E4M3FN value


def opset(model) -> int:
    """The graph's default-domain (ai.onnx) opset."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def transpose_perm(node) -> list[int] | None:
    """A Transpose's ``perm`` (None: reverse the axes)."""
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


@dataclass
class LinearSite:
    matmul: object  # onnx.NodeProto
    act: str  # the activation input
    index: "GraphIndex" = field(repr=False)
    shape: tuple[int, int]  # of the weight (in, out)
    bias: np.ndarray | None  # (out,), from a following Add with a constant
    bias_add: object | None
    output: str  # output of the Add when there is one, else of the MatMul

    @property
    def weight(self) -> np.ndarray:
        """(in, out) float32, read from the graph (or the external data beside it) on each access, so
        the weights of a big encoder are never all in memory at once."""
        return self.index.constant(self.matmul.input[1]).astype(np.float32, copy=False)


@dataclass
class GraphIndex:
    """Initializers, producers and consumers of a graph; constants resolved through Identity/Transpose.

    ``base_dir``: the folder external-data tensors are read from (a graph past 2 GiB keeps its
    weights there); they are read only when a value is asked for, never to answer "is it constant".
    """

    model: object
    inits: dict = field(default_factory=dict)
    producer: dict = field(default_factory=dict)
    consumers: dict = field(default_factory=dict)
    base_dir: str = ""

    @classmethod
    def build(cls, model, base_dir=None) -> "GraphIndex":
        idx = cls(model, base_dir=str(base_dir or ""))
        idx.inits = {i.name: i for i in model.graph.initializer}
        for n in model.graph.node:
            for o in n.output:
                idx.producer[o] = n
            for i in n.input:
                idx.consumers.setdefault(i, []).append(n)
        return idx

    def _source(self, name: str):
        """(the TensorProto behind ``name``, the Transpose perms met on the way, outermost first), or None."""
        perms = []
        while name not in self.inits:
            node = self.producer.get(name)
            if node is None or node.op_type not in ("Constant", "Identity", "Transpose"):
                return None
            if node.op_type == "Constant":
                ok = node.attribute and node.attribute[0].name == "value"
                return (node.attribute[0].t, perms) if ok else None
            if node.op_type == "Transpose":
                perms.append(transpose_perm(node))
            name = node.input[0]
        return self.inits[name], perms

    def constant(self, name: str) -> np.ndarray | None:
        found = self._source(name)
        if found is None:
            return None
        value = read_tensor(found[0], self.base_dir or None)
        for perm in reversed(found[1]):
            value = np.transpose(value, perm)
        return value

    def constant_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape :meth:`constant` would return (None where it returns None), without reading data."""
        found = self._source(name)
        if found is None:
            return None
        shape = tuple(found[0].dims)
        for perm in reversed(found[1]):
            shape = tuple(shape[p] for p in perm) if perm else shape[::-1]
        return shape

    def is_constant(self, name: str) -> bool:
        return self.constant_shape(name) is not None


def linear_sites(idx: GraphIndex) -> list[LinearSite]:
    """Every MatMul of an activation by a constant 2-D weight (with the bias Add after it, if any).
    Weights are read when a site's ``weight`` is asked for, not here."""
    sites = []
    for n in idx.model.graph.node:
        if n.op_type != "MatMul":
            continue
        w = idx.constant_shape(n.input[1])
        if w is None or len(w) != 2 or idx.is_constant(n.input[0]):
            continue
        bias = add = None
        users = idx.consumers.get(n.output[0], [])
        if len(users) == 1 and users[0].op_type == "Add":
            other = [i for i in users[0].input if i != n.output[0]]
            b = idx.constant(other[0]) if len(other) == 1 else None
            if b is not None and b.shape == (w[1],):
                bias, add = b.astype(np.float32), users[0]
        sites.append(LinearSite(n, n.input[0], idx, (int(w[0]), int(w[1])), bias, add, add.output[0] if add is not None else n.output[0]))
    return sites


def attention_sites(idx: GraphIndex) -> list:
    """The two attention products: q @ k^T (its output reaches a Softmax through elementwise ops,
    e.g. the relative-position bias Add) and attn @ v (its first input is a Softmax output).

    Other MatMuls of two activations (token merging's assignment matrices) stay float.
    """

    def reaches_softmax(name: str, hops: int = 4) -> bool:
        for user in idx.consumers.get(name, []):
            if user.op_type == "Softmax" or (hops and user.op_type in ("Add", "Mul", "Div", "Sub") and reaches_softmax(user.output[0], hops - 1)):
                return True
        return False

    sites = []
    for n in idx.model.graph.node:
        if n.op_type != "MatMul" or idx.is_constant(n.input[0]) or idx.is_constant(n.input[1]):
            continue
        src = idx.producer.get(n.input[0])
        if reaches_softmax(n.output[0]) or (src is not None and src.op_type == "Softmax"):
            sites.append(n)
    return sites


def conv_sites(idx: GraphIndex) -> list:
    """Convolutions of an activation by a constant weight (the patch embedding)."""
    return [n for n in idx.model.graph.node if n.op_type == "Conv" and len(n.input) > 1 and not idx.is_constant(n.input[0])
            and idx.is_constant(n.input[1])]


# Rewrites -----------------------------------------------------------------------------------------
def per_channel_weight(w: np.ndarray, precision: str, seven_bit: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel quantization of W (in, out): (quantized values, scales (out,)).

    ``seven_bit``: int8 values in [-63, 63] (the overflow fix: see :func:`rewrite_qdq`)."""
    amax = np.abs(w).max(axis=0).astype(np.float64)
    qmax = FP8_MAX if precision == "fp8" else (63.0 if seven_bit else 127.0)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    ratio = w / scale[None, :]
    if precision == "fp8":
        import ml_dtypes

        return np.clip(ratio, -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn), scale
    return np.clip(np.round(ratio), -127, 127).astype(np.int8), scale


def activation_qparams(lo: float, hi: float, kind: str) -> tuple[np.float32, object]:
    """(scale, zero point) for one activation tensor; kind: int8 (symmetric), fp8, u8 (asymmetric)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if kind == "u8":
        scale = (hi - lo) / 255.0 if hi > lo else 1.0
        return np.float32(scale), np.uint8(np.clip(round(-lo / scale), 0, 255))
    amax = max(abs(lo), abs(hi))
    if kind == "fp8":
        import ml_dtypes

        return np.float32(amax / FP8_MAX if amax > 0 else 1.0), np.array(0, dtype=ml_dtypes.float8_e4m3fn)
    return np.float32(amax / 127.0 if amax > 0 else 1.0), np.int8(0)


def _quantize_activation(t: str, lo_hi: tuple[float, float], kind: str, inits: list, emit) -> tuple[str, str, str]:
    """A QuantizeLinear of activation ``t`` (scale and zero point added to ``inits``): (output, scale, zero point)."""
    scale, zp = activation_qparams(*lo_hi, kind)
    q, s, z = f"{t}_mimc_q", f"{t}_mimc_scale", f"{t}_mimc_zp"
    inits.extend([numpy_helper.from_array(np.asarray(scale), s), numpy_helper.from_array(np.asarray(zp), z)])
    emit(helper.make_node("QuantizeLinear", [t, s, z], [q], name=f"{t}_mimc_Q"))
    return q, s, z


def rebuild_nodes(model, replace, inits: list) -> None:
    """Rebuild the node list in order: ``replace(node, emit)`` returns the nodes standing for ``node``
    (none drops it); nodes passed to ``emit`` (Q/DQ of activations and weights) go just before them."""
    nodes: list = []
    for n in model.graph.node:
        nodes.extend(replace(n, nodes.append))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)
    prune_unused(model)


def rewrite_qdq(model, sites: list[LinearSite], attn_nodes: list, ranges: dict, precision: str, convs: list = (),
                unsigned: bool = False, index: GraphIndex | None = None, overflow_fix: str = "none") -> None:
    """Insert shared Q/DQ on activations and DQ on per-channel weights (TensorRT / FP8 / OpenVINO layout).

    ``unsigned``: an activation whose calibrated range is non-negative (softmax probabilities) is
    quantized as u8 with zero point 0 instead of symmetric s8, which would spend half its levels on
    values that never occur (OpenVINO's low-precision transformations take u8 or s8 activations;
    TensorRT has no u8). ``convs``: Conv nodes (``index`` reads their weights) quantized alike,
    weights per output channel.

    ``overflow_fix`` (first_layer: the convs; all: every weight; none): weights in 7 bits. A CPU
    without VNNI multiplies u8 x s8 with ``vpmaddubsw``, which sums each pair of products into a
    saturating int16: 2 x 255 x 127 overflows it, 2 x 255 x 63 does not. OpenVINO runs s8
    activations shifted to u8 there, so a full-range activation saturates (measured on the tiny
    outlier encoder through OpenVINO on an AVX2 CPU: pooled cosine 0.9932 with 8-bit weights,
    0.99994 with 7-bit ones; ONNX Runtime's kernels do not saturate). NNCF's ``OverflowFix`` is
    the same remedy.
    """
    kind = "fp8" if precision == "fp8" else "int8"
    plan, attn, conv = {id(s.matmul): s for s in sites}, {id(n) for n in attn_nodes}, {id(n) for n in convs}
    dq_of: dict[str, str] = {}
    inits: list = []

    def activation(t: str, emit) -> str:
        if t not in dq_of:
            u8 = unsigned and kind == "int8" and ranges[t][0] >= 0
            q, s, z = _quantize_activation(t, ranges[t], "u8" if u8 else kind, inits, emit)
            emit(helper.make_node("DequantizeLinear", [q, s, z], [f"{t}_mimc_dq"], name=f"{t}_mimc_DQ"))
            dq_of[t] = f"{t}_mimc_dq"
        return dq_of[t]

    def weight(n, q, scale, axis: int, emit) -> str:
        base = f"{n.name or n.output[0]}_mimc_w"
        inits.extend([numpy_helper.from_array(q, base), numpy_helper.from_array(scale, base + "_scale"),
                      numpy_helper.from_array(np.zeros(scale.shape, dtype=q.dtype), base + "_zp")])
        emit(helper.make_node("DequantizeLinear", [base, base + "_scale", base + "_zp"], [base + "_dq"],
                              name=base + "_DQ", axis=axis))
        return base + "_dq"

    def replace(n, emit) -> list:
        if id(n) in plan:
            site = plan[id(n)]
            q, scale = per_channel_weight(site.weight, precision, seven_bit=overflow_fix == "all")
            n.input[1] = weight(n, q, scale, 1, emit)  # the weight's DQ before the activation's Q/DQ
            n.input[0] = activation(site.act, emit)
        elif id(n) in attn:
            n.input[0], n.input[1] = activation(n.input[0], emit), activation(n.input[1], emit)
        elif id(n) in conv:
            w = index.constant(n.input[1]).astype(np.float32)
            q, scale = per_channel_weight(w.reshape(w.shape[0], -1).T, precision,  # (in*kh*kw, out): per out channel
                                          seven_bit=overflow_fix in ("first_layer", "all"))
            n.input[1] = weight(n, q.T.reshape(w.shape), scale, 0, emit)
            n.input[0] = activation(n.input[0], emit)
        return [n]

    rebuild_nodes(model, replace, inits)


def rewrite_cpu(model, sites: list[LinearSite], attn_nodes: list, ranges: dict) -> None:
    """MatMulIntegerToFloat with static u8 activations, s8 per-channel weights and the bias fused."""
    plan, attn = {id(s.matmul): s for s in sites}, {id(n) for n in attn_nodes}
    fused_adds = {id(s.bias_add) for s in sites if s.bias_add is not None}
    q_of: dict[str, tuple[str, str, str]] = {}
    inits: list = []

    def activation(t: str, emit) -> tuple[str, str, str]:
        if t not in q_of:
            q_of[t] = _quantize_activation(t, ranges[t], "u8", inits, emit)
        return q_of[t]

    def replace(n, emit) -> list:
        if id(n) in fused_adds:
            return []  # its output is produced by the MatMulIntegerToFloat that absorbed it
        if id(n) in plan:
            site = plan[id(n)]
            q, scale = per_channel_weight(site.weight, "int8")
            base = f"{n.name or n.output[0]}_mimc_w"
            inits.extend([numpy_helper.from_array(q, base), numpy_helper.from_array(scale, base + "_scale")])
            a, a_s, a_z = activation(site.act, emit)
            inputs = [a, base, a_s, base + "_scale", a_z, ""]
            if site.bias is not None:
                inits.append(numpy_helper.from_array(site.bias, base + "_bias"))
                inputs.append(base + "_bias")
            return [helper.make_node("MatMulIntegerToFloat", inputs, [site.output], name=base + "_int8", domain="com.microsoft")]
        if id(n) in attn:
            (a, a_s, a_z), (b, b_s, b_z) = activation(n.input[0], emit), activation(n.input[1], emit)
            return [helper.make_node("MatMulIntegerToFloat", [a, b, a_s, b_s, a_z, b_z], list(n.output),
                                     name=f"{n.name or n.output[0]}_int8", domain="com.microsoft")]
        return [n]

    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    rebuild_nodes(model, replace, inits)


# Side-effect-free ops whose only job is a value or a shape: dead once nothing reads their outputs.
PURE_OPS = frozenset({"Identity", "Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast"})


def prune_unused(model) -> None:
    """Drop initializers and pure value/shape nodes (PURE_OPS) nothing reads any more."""
    g = model.graph
    while True:
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        keep = [n for n in g.node if n.op_type not in PURE_OPS or any(o in used for o in n.output)]
        if len(keep) == len(g.node):
            break
        del g.node[:]
        g.node.extend(keep)
    keep_inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    keep_inputs = [i for i in g.input if i.name in used or i.name not in {t.name for t in keep_inits}]
    del g.input[:]
    g.input.extend(keep_inputs)


__all__ = ["opset", "transpose_perm", "LinearSite", "GraphIndex", "linear_sites", "attention_sites", "conv_sites",
           "rewrite_qdq", "rewrite_cpu", "per_channel_weight", "activation_qparams", "prune_unused", "rebuild_nodes"]
