"""Statistics over calibration batches: the images a stage calibrates on, and the inputs of a block's Linears.

:func:`calibration_pixels` re-cuts the batches a stage is given into a fixed number of images.
:func:`collect_block_stats` runs the encoder's own forward (so any token schedule is respected)
and stops right after one block; :func:`carried_block_stats` runs only that block on inputs
carried forward from the previous one. Both return, per Linear, the sum of squares of every input
feature (Wanda's norm) and optionally the input Gram matrix XᵀX (SparseGPT's Hessian).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from mimc.compression.rsq import token_weights, weighted_moments
from mimc.models.nm_pattern import block_linears


def calibration_pixels(batches: Iterable[torch.Tensor] | None, limit: int, batch_size: int) -> list[torch.Tensor]:
    """At most ``limit`` images from the batches, re-cut into batches of ``batch_size``."""
    if batches is None:
        return []
    taken, count = [], 0
    for batch in batches:
        if count >= limit:
            break
        batch = batch[: limit - count]
        taken.append(batch)
        count += batch.shape[0]
    if not taken:
        return []
    pixels = torch.cat(taken)
    return list(pixels.split(batch_size))


class _StopForward(Exception):
    """Raised by a hook once the block being calibrated has run: later blocks are not needed."""


@dataclass
class LayerStats:
    sq_norm: torch.Tensor  # (in,) sum over tokens of x_j^2
    hessian: torch.Tensor | None  # (in, in) sum over tokens of x x^T
    tokens: int = 0


def _stats_hook(stats: dict[str, LayerStats], name: str, hessian: bool, stop: bool = False, weights: dict | None = None):
    """A forward hook accumulating a Linear's input statistics into ``stats[name]``.

    ``weights``: a holder whose ``"r"`` is the current batch's per-token weights (B, N) (RSQ); None
    accumulates every token with weight 1.
    """

    def hook(_module, inputs, _output):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        s = stats.get(name)
        if s is None:
            s = stats[name] = LayerStats(torch.zeros(x.shape[1]), torch.zeros(x.shape[1], x.shape[1]) if hessian else None)
        if weights is not None:
            sq, hess = weighted_moments(x, weights["r"].reshape(-1), s.hessian is not None)
            s.sq_norm += sq
            if hess is not None:
                s.hessian += hess
        else:
            s.sq_norm += (x * x).sum(dim=0)
            if s.hessian is not None:
                s.hessian += x.T @ x
        s.tokens += x.shape[0]
        if stop:
            raise _StopForward

    return hook


def collect_block_stats(encoder: nn.Module, block_index: int, pixels: list[torch.Tensor], hessian: bool) -> dict[str, LayerStats]:
    """Input statistics of block ``block_index``'s Linears over the calibration batches.

    Runs the encoder's own forward (so any structure it has is respected) and stops it right after
    the block; every hook is removed even when the forward raises.
    """
    prefix = f"blocks.{block_index}."
    linears = [(name, lin) for name, lin in block_linears(encoder) if name.startswith(prefix)]
    stats: dict[str, LayerStats] = {}
    last_name = linears[-1][0]
    handles = [lin.register_forward_hook(_stats_hook(stats, name, hessian, stop=name == last_name)) for name, lin in linears]
    try:
        with torch.no_grad():
            for batch in pixels:
                try:
                    encoder(batch)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    return stats


def carried_block_stats(block: nn.Module, prefix: str, inputs: list[torch.Tensor], shared_bias, hessian: bool,
                        r_min: float | None = None) -> dict[str, LayerStats]:
    """Input statistics of one block's Linears, running only that block on its carried inputs.

    With ``r_min`` every token is weighted by RSQ's attention-received weight for this block.
    """
    stats: dict[str, LayerStats] = {}
    holder = {} if r_min is not None else None
    # The weights read this block's attention, so they are computed before the hooks go on.
    weights = [token_weights(block, x, shared_bias, r_min) for x in inputs] if r_min is not None else None
    handles = [mod.register_forward_hook(_stats_hook(stats, prefix + name, hessian, weights=holder)) for name, mod in block.named_modules()
               if isinstance(mod, nn.Linear)]
    try:
        with torch.no_grad():
            for k, x in enumerate(inputs):
                if holder is not None:
                    holder["r"] = weights[k]
                block(x, shared_bias)
    finally:
        for h in handles:
            h.remove()
    return stats


__all__ = ["LayerStats", "calibration_pixels", "collect_block_stats", "carried_block_stats"]
