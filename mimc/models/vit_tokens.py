"""Token reduction inside the canonical encoder's forward pass (mixins of ``Block`` and ``Encoder``).

Where each method acts, as in its paper (references in :mod:`mimc.models.token_ops`): ToMe merges
between attention and MLP, with proportional attention; EViT keeps the top-k patch tokens by the
attention they receive and fuses the rest; MAE's encoder sees only the kept patches, dropped after
the position embedding.

The config's ``token_schedule`` is resolved once into a :class:`~mimc.models.token_ops.TokenPlan`
and set as static per-block attributes and constant index buffers, never popped from a list inside
``forward``: every token count is a Python int, so export and compile see fixed shapes. The tensor
work itself is in :mod:`mimc.models.token_ops`; this module is the glue that knows the encoder's
layout. Kept apart from :mod:`mimc.models.vit` so that file stays the plain encoder.
"""
from __future__ import annotations

import torch

from mimc.models import token_ops
from mimc.models.position import RelativePositionBias


class BlockTokenReduction:
    """Mixin of ``Block``: its static token reduction between attention and MLP, set by the encoder
    from the token plan (these defaults reduce nothing)."""

    merge_r = 0  # ToMe: tokens merged here
    keep_k = 0  # top-k: patch tokens kept here
    fuse = False
    score = "mean"
    prop_attn = False
    prefix = 0  # cls tokens, never reduced

    def forward_tokens(self, x: torch.Tensor, bias: torch.Tensor | None, sizes: torch.Tensor | None):
        """Forward with this block's token reduction; ``sizes`` (B, N, 1) counts the patches each token
        stands for (None: all ones). Returns ``(x, sizes)``."""
        if self.prop_attn and sizes is not None:
            log_sizes = sizes.log()[:, None, None, :, 0]  # proportional attention: bigger tokens draw more
            bias = log_sizes if bias is None else bias + log_sizes
        if self.merge_r == 0 and self.keep_k == 0:
            return self.forward(x, bias), sizes
        out, keys, attn = self.attn(self.norm1(x), bias, return_keys=self.merge_r > 0, return_attn=self.keep_k > 0)
        x = x + self.ls1(out)
        if sizes is None:
            sizes = torch.ones_like(x[..., :1])
        if self.merge_r > 0:
            x, sizes = token_ops.tome_merge(x, sizes, keys, self.merge_r, self.prefix)
        else:
            scores = token_ops.attention_received(attn, self.prefix, self.score)
            x, sizes = token_ops.topk_select(x, sizes, scores, self.keep_k, self.prefix, self.fuse)
        return x + self.ls2(self.mlp(self.norm2(x))), sizes


class EncoderTokenReduction:
    """Mixin of ``Encoder``: the token plan and the patch drop before the first block."""

    def _apply_token_plan(self, plan: token_ops.TokenPlan) -> None:
        """Turn the token schedule into static per-block attributes and constant index buffers."""
        self.token_plan = plan
        for block, r, k in zip(self.blocks, plan.merge_r, plan.keep_k):  # both empty without a schedule
            block.merge_r, block.keep_k, block.prefix = r, k, self.config.num_prefix_tokens
            block.fuse, block.score, block.prop_attn = plan.fuse, plan.score, plan.prop_attn
        # Non-persistent: the state_dict keys stay those of the dense encoder.
        index = torch.tensor(plan.drop_index, dtype=torch.long) if plan.drop_index is not None else None
        self.register_buffer("drop_index", index, persistent=False)
        if index is not None and self.config.rel_pos_bias != "none":
            # A fixed pattern keeps fixed positions, so the bias is the full bias sliced to them.
            prefix = self.config.num_prefix_tokens
            kept = torch.cat([torch.arange(prefix), index + prefix])
            for module in self.modules():
                if isinstance(module, RelativePositionBias):
                    module.index = module.index[kept][:, kept]

    def drop_patches(self, x: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """MAE-native patch dropping after the position embedding (identity without a drop schedule)."""
        prefix = self.config.num_prefix_tokens
        if self.drop_index is not None:
            return torch.cat([x[:, :prefix], x[:, prefix:].index_select(1, self.drop_index)], dim=1)
        if self.token_plan.drop_keep:
            saliency = token_ops.patch_variance(pixel_values, self.config.patch_size, self.config.tubelet_size)
            return token_ops.gather_tokens(x, saliency.topk(self.token_plan.drop_keep, dim=-1).indices, prefix)
        return x


__all__ = ["BlockTokenReduction", "EncoderTokenReduction"]
