"""Outlier folding on an exported graph: SmoothQuant / RepQ on LayerNormalization -> MatMul pairs.

Exact in float, so an ONNX file alone can be folded before calibration; the math is
:mod:`mimc.compression.smooth`'s, the sites are :mod:`mimc.quant.qdq_graph`'s.
"""
from __future__ import annotations

import numpy as np
import torch
from onnx import helper, numpy_helper

from mimc.errors import BadInputError
from mimc.quant.qdq_graph import GraphIndex, LinearSite, rebuild_nodes


def norm_linear_pairs(idx: GraphIndex, sites: list[LinearSite]) -> list[tuple[object, LinearSite]]:
    """LayerNormalization nodes whose output feeds exactly one block linear (norm1 -> qkv, norm2 -> fc1)."""
    by_act = {s.act: s for s in sites}
    pairs = []
    for n in idx.model.graph.node:
        if n.op_type != "LayerNormalization" or len(n.input) < 3:
            continue
        users = idx.consumers.get(n.output[0], [])
        if len(users) == 1 and n.output[0] in by_act and users[0] is by_act[n.output[0]].matmul:
            pairs.append((n, by_act[n.output[0]]))
    return pairs


def fold_pairs(model, pairs, channel_ranges: dict, smooth_alpha: float | None, repq: bool, symmetric: bool,
               base_dir=None) -> None:
    """Rewrite LayerNorm gamma/beta and the next MatMul's weight/bias in place (exact in float).

    ``channel_ranges[ln_output] = (min_c, max_c)``. Each touched tensor gets a private initializer
    (the exporter shares identical LayerNorm parameters between blocks through Identity nodes).
    ``base_dir``: where the graph's external-data tensors are read from.
    """
    from mimc.compression.smooth import fold_repq, fold_smoothquant

    idx = GraphIndex.build(model, base_dir)
    new_bias_adds = []
    for k, (ln, site) in enumerate(pairs):
        gamma, beta = idx.constant(ln.input[1]), idx.constant(ln.input[2])
        if gamma is None or beta is None:
            raise BadInputError(f"LayerNormalization {ln.name} has non-constant scale/bias: cannot fold outliers into it")
        norm = torch.nn.LayerNorm(gamma.shape[0])
        lin = torch.nn.utils.skip_init(torch.nn.Linear, site.shape[0], site.shape[1], bias=True)  # no draw from the caller's RNG
        with torch.no_grad():
            norm.weight.copy_(torch.from_numpy(gamma.astype(np.float32)))
            norm.bias.copy_(torch.from_numpy(beta.astype(np.float32)))
            lin.weight.copy_(torch.from_numpy(site.weight.T.copy()))
            lin.bias.copy_(torch.from_numpy(site.bias if site.bias is not None else np.zeros(site.shape[1], np.float32)))
        lo, hi = (torch.from_numpy(np.asarray(a, np.float64)) for a in channel_ranges[ln.output[0]])
        if smooth_alpha is not None:
            s = fold_smoothquant(norm, lin, torch.maximum(lo.abs(), hi.abs()), smooth_alpha)
            lo, hi = lo / s, hi / s  # the ranges the RepQ step below sees, after smoothing (s > 0)
        if repq:
            fold_repq(norm, lin, lo, hi, symmetric)
        names = [f"mimc_fold_{k}_{part}" for part in ("gamma", "beta", "weight", "bias")]
        arrays = [norm.weight, norm.bias, lin.weight.T, lin.bias]
        for name, arr in zip(names, arrays):
            model.graph.initializer.append(numpy_helper.from_array(arr.detach().contiguous().numpy().astype(np.float32), name))
        ln.input[1], ln.input[2] = names[0], names[1]
        site.matmul.input[1] = names[2]
        if site.bias_add is not None:
            pos = [j for j, i in enumerate(site.bias_add.input) if i != site.matmul.output[0]][0]
            site.bias_add.input[pos] = names[3]
        elif repq:
            new_bias_adds.append((site.matmul, names[3]))  # a Linear without bias (qkv_bias=False) gets one
    _insert_bias_adds(model, new_bias_adds)  # also drops what folding left unused


def _insert_bias_adds(model, adds) -> None:
    """MatMul -> Add(bias) for MatMuls that had no bias: the RepQ shift needs somewhere to go."""
    after = {id(m): bias for m, bias in adds}

    def replace(n, emit) -> list:
        if id(n) not in after:
            return [n]
        out = n.output[0]
        n.output[0] = f"{out}_mimc_nobias"
        return [n, helper.make_node("Add", [n.output[0], after[id(n)]], [out], name=f"{n.name}_mimc_bias")]

    rebuild_nodes(model, replace, [])


__all__ = ["norm_linear_pairs", "fold_pairs"]
