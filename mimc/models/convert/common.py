"""Helpers shared by the converters: building an encoder straight from converted weights."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..vit import Encoder, EncoderConfig

_INIT_FUNCTIONS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_",
    "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
)  # fmt: skip


@contextlib.contextmanager
def skip_weight_init() -> Iterator[None]:
    """Make ``torch.nn.init`` a no-op while modules are built whose every weight is loaded next.

    Random init of a ViT-B costs over a second of CPU for numbers that are overwritten at once
    (transformers' ``no_init_weights`` does the same). Only safe with a strict load that follows.
    """
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def encoder_with_weights(cfg: EncoderConfig, state: dict[str, torch.Tensor], copy: bool = True, strict: bool = True):
    """Build an :class:`Encoder` for ``cfg`` and load ``state`` into it.

    ``copy=False`` adopts the given tensors as the parameters (no second copy of the weights);
    use it only when nothing else keeps the tensors, e.g. a checkpoint just read from disk.
    Returns ``(encoder, load_result)``; with ``strict`` a missing or extra key raises.
    """
    with skip_weight_init():
        encoder = Encoder(cfg)
    state = {k: v.float().contiguous() for k, v in state.items()}
    result = encoder.load_state_dict(state, strict=strict, assign=not copy)
    return encoder.eval(), result
