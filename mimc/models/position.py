"""BEiT's relative position bias: a learned table indexed by pairwise patch offsets.

Its own module so both the encoder (:mod:`mimc.models.vit`) and the token-reduction glue
(:mod:`mimc.models.vit_tokens`, which slices the index to the kept patches) import it from below.

Reference: Bao et al., "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022 —
github.com/microsoft/unilm (``RelativePositionBias``).
"""
from __future__ import annotations

import torch
from torch import nn


def relative_position_index(grid_hw: tuple[int, int], cls_token: bool) -> torch.Tensor:
    """BEiT's index into the bias table: pairwise (dy, dx) offsets plus three cls entries."""
    h, w = grid_hw
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel[:, :, 0] += h - 1
    rel[:, :, 1] += w - 1
    rel[:, :, 0] *= 2 * w - 1
    patch_index = rel.sum(-1)
    if not cls_token:
        return patch_index
    n_rel = (2 * h - 1) * (2 * w - 1)
    n = h * w + 1
    index = torch.zeros(n, n, dtype=torch.long)
    index[1:, 1:] = patch_index
    index[0, :] = n_rel  # cls -> token
    index[:, 0] = n_rel + 1  # token -> cls
    index[0, 0] = n_rel + 2  # cls -> cls
    return index


class RelativePositionBias(nn.Module):
    """Learned bias table (BEiT), expanded to (heads, N, N) on the fly with a constant index."""

    def __init__(self, cfg, num_heads: int):
        """``cfg`` an :class:`~mimc.models.vit.EncoderConfig` (its grid and cls token)."""
        super().__init__()
        _, h, w = cfg.grid
        n_entries = (2 * h - 1) * (2 * w - 1) + (3 if cfg.cls_token else 0)
        self.table = nn.Parameter(torch.zeros(n_entries, num_heads))
        self.register_buffer("index", relative_position_index((h, w), cfg.cls_token), persistent=False)

    def forward(self) -> torch.Tensor:
        n = self.index.shape[0]
        return self.table[self.index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)


__all__ = ["RelativePositionBias", "relative_position_index"]
