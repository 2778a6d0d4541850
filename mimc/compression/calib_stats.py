"""Statistics over calibration batches: the images a stage calibrates on, and the inputs of a block's
Linears (per Linear, the sum of squares of every input feature, Wanda's norm, and optionally the input
Gram matrix XᵀX, SparseGPT's Hessian)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from mimc.compression.rsq import token_weights, weighted_moments
from mimc.models.nm_pattern import block_linears


def calibration_pixels(batches: Iterable[torch.Tensor] | None, limit: int,
                       batch_size: int | None = None) -> list[torch.Tensor]:
    """At most ``limit`` images from the batches, re-cut into batches of ``batch_size`` (None: as given)."""
    taken, count = [], 0
    for batch in batches or ():
        if count >= limit:
            break
        taken.append(batch[: limit - count])
        count += taken[-1].shape[0]
    if batch_size is None or not taken:
        return taken
    return list(torch.cat(taken).split(batch_size))


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
        else:
            sq, hess = (x * x).sum(dim=0), (x.T @ x if s.hessian is not None else None)
        s.sq_norm += sq
        if hess is not None:
            s.hessian += hess
        s.tokens += x.shape[0]
        if stop:
            raise _StopForward

    return hook


def collect_block_stats(encoder: nn.Module, block_index: int, pixels: list[torch.Tensor], hessian: bool) -> dict[str, LayerStats]:
    """Input statistics of block ``block_index``'s Linears over the calibration batches (the encoder's
    own forward, so any token schedule is respected, stopped right after the block)."""
    prefix = f"blocks.{block_index}."
    linears = [(name, lin) for name, lin in block_linears(encoder) if name.startswith(prefix)]
    stats: dict[str, LayerStats] = {}
    last_name = linears[-1][0]
    with contextlib.ExitStack() as hooks, torch.no_grad():
        for name, lin in linears:
            hooks.enter_context(lin.register_forward_hook(_stats_hook(stats, name, hessian, stop=name == last_name)))
        for batch in pixels:
            with contextlib.suppress(_StopForward):
                encoder(batch)
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
    with contextlib.ExitStack() as hooks, torch.no_grad():
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Linear):
                hook = _stats_hook(stats, prefix + name, hessian, weights=holder)
                hooks.enter_context(mod.register_forward_hook(hook))
        for k, x in enumerate(inputs):
            if holder is not None:
                holder["r"] = weights[k]
            block(x, shared_bias)
    return stats


__all__ = ["LayerStats", "calibration_pixels", "collect_block_stats", "carried_block_stats"]
