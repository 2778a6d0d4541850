"""Block pruning: score every transformer block, delete the k most redundant ones.

As in Gardener (the scores and their references: :mod:`mimc.compression.block_scores`), blocks are
scored once and the k lowest are removed in one shot (no re-scoring); a removed block becomes the
identity, i.e. the residual stream passes straight through, which is the same as deleting the block.

The pruned encoder is a plain shallower ViT: ``config.depth`` shrinks, ``block_ids`` keeps the
original index of every surviving block, per-block lists (MLP widths, head counts) are sliced and
a per-block relative position bias leaves with its block. It exports like any other encoder.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from mimc.errors import ConfigError
from mimc.models.vit import Encoder
from mimc.compression.block_scores import CRITERIA, ENTROPY_DTYPES, data_free_scores, removal_order, sensitivity_scores
from mimc.compression.registry import StageConfig, clone_encoder, register, shrink_metrics
from mimc.options import option


@dataclasses.dataclass(frozen=True)
class BlockPruningConfig(StageConfig):
    """Remove blocks: give exactly one of ``ratio`` (fraction removed), ``keep`` (blocks kept) or
    ``blocks`` (0-based positions to remove; the criterion's scores are still recorded)."""

    name: ClassVar[str] = "prune"

    ratio: float | None = option(None, gt=0, lt=1, doc="fraction of the blocks removed")
    keep: int | None = option(None, ge=1, doc="how many blocks remain")
    blocks: tuple[int, ...] | None = option(None, ge=0, min_items=1, doc="0-based positions removed")
    criterion: str = option("entropy", choices=CRITERIA)
    seed: int = option(0, ge=0, le=(1 << 32) - 1, doc="seed of everything random in the stage")
    hist_bins: int = option(65536, ge=2, le=1 << 24, doc="histogram bins of entropy_hist")
    # value precision the entropy criterion counts in (fp32 is degenerate)
    dtype: str = option("fp16", choices=ENTROPY_DTYPES)

    def check(self) -> None:
        given = [n for n in ("ratio", "keep", "blocks") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ConfigError(f"block pruning takes exactly one of ratio, keep or blocks, got {given or 'none'}: give one, "
                              "e.g. ratio 0.5", option=("ratio", "keep", "blocks"))
        for name, owner in (("hist_bins", "entropy_hist"), ("dtype", "entropy")):  # else silently unused
            if getattr(self, name) != BlockPruningConfig.__dataclass_fields__[name].default and self.criterion != owner:
                raise ConfigError(f"{name} only applies to criterion {owner}: drop it", option=(name, "criterion"))
        if self.blocks is not None:
            if len(set(self.blocks)) != len(self.blocks):
                raise ConfigError(f"blocks lists an index twice ({list(self.blocks)}): give each block once", option="blocks")
            object.__setattr__(self, "blocks", tuple(sorted(self.blocks)))

    @property
    def needs_data(self) -> bool:
        return self.criterion == "sensitivity"

    def num_removed(self, depth: int, ids: list[int] | None = None) -> int:
        """How many blocks this config removes from an encoder of ``depth`` blocks (validated); ``ids``:
        the source's block ids of a pruned encoder, which its tables show and ``blocks`` does not use."""
        if self.blocks is not None:
            bad = [b for b in self.blocks if b >= depth]
            if bad:
                pruned = f" (its tables show the source's ids {ids})" if ids is not None and ids != list(range(depth)) else ""
                raise ConfigError(f"blocks {bad} do not exist in a model of depth {depth}: give positions 0..{depth - 1}{pruned}", option="blocks")
            k = len(self.blocks)
        elif self.keep is not None:
            if self.keep > depth:
                raise ConfigError(f"keep={self.keep} is more than the model's depth {depth}: give keep between 1 and {depth - 1}", option="keep")
            k = depth - self.keep
            if k == 0:
                raise ConfigError(f"keep={self.keep} equals the model's depth, so nothing would be removed: give keep below {depth}", option="keep")
        else:
            k = int(round(float(self.ratio) * depth))
            if k == 0:
                raise ConfigError(f"ratio {self.ratio} of {depth} blocks rounds to 0 blocks removed: give ratio >= {0.5 / depth:.3g}", option="ratio")
            if k >= depth:
                raise ConfigError(f"ratio {self.ratio} of {depth} blocks would remove every block: give ratio <= {(depth - 0.5) / depth:.3g}", option="ratio")
        if k >= depth:
            raise ConfigError(f"removing {k} of {depth} blocks leaves none: keep at least one block")
        return k


def remove_blocks(encoder: Encoder, positions: Iterable[int]) -> Encoder:
    """A new encoder without the blocks at ``positions``; ``encoder`` is not modified.

    Only the kept blocks are copied (the removed ones never are), which keeps ViT-B fast.
    """
    cfg = encoder.config
    drop = set(positions)
    keep = [i for i in range(cfg.depth) if i not in drop]
    if cfg.token_schedule is not None:
        # Token schedules are indexed by block; re-indexing them is the tokens stage's business.
        raise ConfigError("this model already has a token-reduction schedule: prune blocks before reducing tokens")
    full_blocks = encoder.blocks
    encoder.blocks = nn.ModuleList(full_blocks[i] for i in keep)  # swapped back below
    try:
        new = clone_encoder(encoder)
    finally:
        encoder.blocks = full_blocks
    ids = cfg.kept_block_ids()
    new.config = cfg.replace(
        depth=len(keep),
        block_ids=[ids[i] for i in keep],
        source_depth=cfg.source_depth if cfg.source_depth is not None else cfg.depth,
        block_mlp_dims=[cfg.block_mlp_dims[i] for i in keep] if cfg.block_mlp_dims is not None else None,
        block_heads=[cfg.block_heads[i] for i in keep] if cfg.block_heads is not None else None,
    )
    return new.eval()


def score_blocks(encoder: Encoder, config: BlockPruningConfig, batches: list[torch.Tensor] | None) -> tuple[list[float], list[str]]:
    if config.criterion == "sensitivity":
        return sensitivity_scores(encoder, batches or []), []
    scores, warnings = data_free_scores(encoder.blocks, [config.criterion], config.dtype, config.hist_bins, config.seed)
    return scores[config.criterion], warnings


@register(BlockPruningConfig)
def prune_blocks(encoder: Encoder, config: BlockPruningConfig, calibration_batches=None) -> tuple[Encoder, dict[str, Any]]:
    cfg = encoder.config
    k = config.num_removed(cfg.depth, cfg.kept_block_ids())
    batches = list(calibration_batches) if calibration_batches is not None else None
    scores, warnings = score_blocks(encoder, config, batches)
    removed = list(config.blocks) if config.blocks is not None else sorted(removal_order(scores)[:k])
    new = remove_blocks(encoder, removed)

    ids = cfg.kept_block_ids()
    metrics: dict[str, Any] = {
        "criterion": config.criterion,
        "selection": "blocks" if config.blocks is not None else "lowest_scores",
        "block_ids": ids,
        "scores": {config.criterion: [round(float(s), 6) for s in scores]},
        "removed_blocks": [ids[i] for i in removed],
        "removed_positions": removed,
        "kept_blocks": list(new.config.block_ids),
        **shrink_metrics(encoder, new, batches),
    }
    if warnings:
        metrics["warnings"] = warnings
    return new, metrics


__all__ = ["BlockPruningConfig", "remove_blocks", "prune_blocks", "score_blocks"]
