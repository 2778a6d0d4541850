"""The N:M sparsity pattern an encoder records (``EncoderConfig.nm_pattern``) and its one checker.

Every Linear inside the blocks (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) keeps at most N
non-zeros in every group of M consecutive input weights of each output row: the layout sparse
tensor cores read (2:4 on Ampere and later). It sits beside the encoder it describes so that the
stage that writes the pattern (:mod:`mimc.compression.nm`) and export, which refuses a model that
breaks it, both read it from below.

Reference: Mishra et al., "Accelerating Sparse Deep Neural Networks" (2:4 sparse tensor cores), 2021.
"""
from __future__ import annotations

from torch import nn

from mimc.errors import ConfigError, ValidationError


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4); N must be at least 1 and smaller than M."""
    try:
        n_str, m_str = str(pattern).split(":")
        n, m = int(n_str), int(m_str)
    except ValueError:
        raise ConfigError(f"pattern '{pattern}' is not of the form N:M: give e.g. pattern 2:4", option="pattern") from None
    if n < 1 or m < 2:
        raise ConfigError(f"pattern '{pattern}' needs N >= 1 and M >= 2: give e.g. pattern 2:4", option="pattern")
    if n >= m:
        raise ConfigError(f"pattern '{pattern}' keeps N={n} of M={m}, which prunes nothing: N must be smaller than M (e.g. 2:4)", option="pattern")
    return n, m


def block_linears(encoder: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Linear inside the blocks, named as in the state dict (``blocks.0.attn.qkv``)."""
    return [(name, mod) for name, mod in encoder.named_modules() if name.startswith("blocks.") and isinstance(mod, nn.Linear)]


def validate_pattern(encoder: nn.Module, n: int, m: int) -> None:
    """Refuse a pattern that some block Linear cannot hold, before any work is done."""
    linears = block_linears(encoder)
    if not linears:
        raise ConfigError("the model has no transformer blocks to sparsify: N:M needs at least one block")
    for name, lin in linears:
        if lin.in_features % m:
            raise ConfigError(f"M={m} does not divide in_features={lin.in_features} of {name}: choose an M that divides every layer's input width (e.g. 2:4)")


def check_nm(encoder: nn.Module, pattern: str | None = None) -> None:
    """Raise unless every block Linear has <= N non-zeros in every group of M consecutive inputs.

    ``pattern`` defaults to ``encoder.config.nm_pattern``; with neither there is nothing to check.
    """
    pattern = pattern if pattern is not None else getattr(getattr(encoder, "config", None), "nm_pattern", None)
    if pattern is None:
        return
    n, m = parse_pattern(pattern)
    validate_pattern(encoder, n, m)
    for name, lin in block_linears(encoder):
        w = lin.weight.detach()
        counts = (w.reshape(w.shape[0], -1, m) != 0).sum(dim=-1)
        bad = int((counts > n).sum())
        if bad:
            raise ValidationError(
                f"{name} breaks the {pattern} pattern in {bad} of {counts.numel()} groups: re-run `mimc sparsify` on the dense model"
            )


__all__ = ["parse_pattern", "block_linears", "validate_pattern", "check_nm"]
