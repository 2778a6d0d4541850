"""Static-shape token reduction: pure tensor functions and the per-block plan built from a schedule.

References:
- ToMe: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (arXiv 2210.09461),
  github.com/facebookresearch/ToMe (tome/merge.py: bipartite soft matching, size-weighted merge).
- EViT: Liang et al., "Not All Patches are What You Need", ICLR 2022 (arXiv 2202.07800),
  github.com/youweiliang/evit (top-k tokens by cls attention, inattentive tokens fused).
- MAE: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022 (arXiv 2111.06377),
  github.com/facebookresearch/mae: the encoder was pretrained on 25 % visible patches, which is why
  dropping patches works untrained.

Where mimc differs from upstream ToMe: a mean-pooled encoder weights each output token by its size
(the patches it stands for, :meth:`~mimc.models.vit.Encoder.pool`); upstream's MAE / timm heads
average the merged tokens unweighted. The same holds for EViT's fused token.

Everything here keeps shapes static: every count (r, k, kept patches) is a Python int fixed by the
schedule, so the exported graph has fixed token dimensions. The ToMe merge is a product with a
one-hot assignment matrix instead of ``scatter_reduce``: ONNX ScatterElements with a reduction is
outside TensorRT's core and returned wrong results in TensorRT 8.6, and ``scatter_reduce(mean)`` has
no ONNX mapping at all. Sorting uses ``topk``/``sort`` only, which export as TopK.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from mimc.errors import ConfigError

METHODS = ("tome", "topk", "drop")
PATTERNS = ("grid", "variance")
SCORES = ("cls", "mean")


# ToMe ---------------------------------------------------------------------------------------------
def bipartite_assignment(metric: torch.Tensor, r: int, protected: int = 0) -> torch.Tensor:
    """ToMe's bipartite soft matching (tome/merge.py ``bipartite_soft_matching``) as a one-hot matrix.

    ``metric`` (B, N, C) describes the whole sequence, protected (cls) tokens included: tokens
    alternate into A (even positions, so the cls token is A's first) and B (odd). Each A token's
    best cosine match in B is an edge; the r strongest edges merge their A token into its B partner.
    The cls token never merges (upstream sets its score row to -inf, which puts it last in the edge
    order; here it is simply left out of the ranking). Returns S (B, N - r, N) whose columns are
    ordered [A tokens, B tokens] (see :func:`split_ab`) and whose rows are the output tokens in
    upstream's order: the unmerged A tokens, then every B token. Upstream keeps the unmerged A
    tokens in edge order (strongest edge first) and re-sorts them by position only when there is a
    cls token, to keep it first; the next block's A/B split depends on that order, so it is copied.
    ``r`` must already be clipped to ``(N - protected) // 2`` (the plan does it, see
    :func:`clip_r`).
    """
    if protected not in (0, 1):
        raise ValueError(f"ToMe protects at most one (cls) token, got {protected}")
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    n_a, n_b = a.shape[1], b.shape[1]
    scores = a @ b.transpose(-1, -2)
    node_max, node_idx = scores.max(dim=-1)
    # argsort(descending) via topk: exports as one TopK node. Only unprotected A tokens are ranked.
    ranked = n_a - protected
    edge_order = node_max[:, protected:].topk(ranked, dim=-1).indices + protected
    unmerged = edge_order[:, r:]
    if protected:
        # Sorting puts cls back in front; equal to upstream's sort of all unmerged (cls included).
        cls_index = torch.zeros_like(node_idx[:, :1])
        unmerged = torch.cat([cls_index, unmerged.sort(dim=-1).values], dim=1)
    a_range = torch.arange(n_a, device=metric.device)
    b_range = torch.arange(n_b, device=metric.device)
    keep_a = (unmerged[:, :, None] == a_range).to(metric.dtype)  # (B, n_a - r, n_a)
    merged = 1.0 - keep_a.sum(dim=1)  # (B, n_a): 1 where the A token is merged away
    into_b = (node_idx[:, None, :] == b_range[None, :, None]).to(metric.dtype) * merged[:, None, :]
    batch = metric.shape[0]
    eye_b = torch.eye(n_b, dtype=metric.dtype, device=metric.device).expand(batch, n_b, n_b)
    zeros = torch.zeros(batch, n_a - r, n_b, dtype=metric.dtype, device=metric.device)
    top = torch.cat([keep_a, zeros], dim=2)
    bottom = torch.cat([into_b, eye_b], dim=2)
    return torch.cat([top, bottom], dim=1)


def split_ab(x: torch.Tensor) -> torch.Tensor:
    """Reorder tokens (B, N, C) as [even positions, odd positions]: the column order of S."""
    return torch.cat([x[:, ::2], x[:, 1::2]], dim=1)


def merge_weighted(x: torch.Tensor, sizes: torch.Tensor, assignment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x' = S(s*x) / (S s), s' = S s, with x and sizes already in [A, B] order (two GEMMs).

    Upstream's ``merge_wavg``: the same size-weighted mean, by gather + scatter_reduce(sum).
    """
    new_sizes = assignment @ sizes
    return (assignment @ (x * sizes)) / new_sizes, new_sizes


def tome_merge(
    x: torch.Tensor, sizes: torch.Tensor, metric: torch.Tensor, r: int, prefix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge r tokens of ``x`` (B, N, D) as ToMe does; the first ``prefix`` (cls) tokens never merge.

    The cls token takes part in the A/B split (as upstream's), it is only excluded from matching.
    """
    assignment = bipartite_assignment(metric, r, prefix)
    return merge_weighted(split_ab(x), split_ab(sizes), assignment)


def clip_r(r: int, tokens: int, protected: int) -> int:
    """ToMe merges at most half the unprotected tokens per block: r = min(r, (t - protected) // 2)."""
    return max(0, min(r, (tokens - protected) // 2))


# EViT-style attention top-k -----------------------------------------------------------------------
def attention_received(attn: torch.Tensor, prefix: int, score: str) -> torch.Tensor:
    """Importance of each non-prefix token from attention probabilities (B, H, N, N) -> (B, N - prefix).

    ``cls``: the cls token's row averaged over heads (EViT; for models that pool by cls).
    ``mean``: attention received, averaged over all queries and heads (for mean-pooling MAE models,
    whose cls token is weakly trained).
    """
    if score == "cls":
        return attn[:, :, 0, prefix:].mean(dim=1)
    return attn[:, :, :, prefix:].mean(dim=(1, 2))


def topk_select(
    x: torch.Tensor, sizes: torch.Tensor, scores: torch.Tensor, k: int, prefix: int, fuse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the prefix and the k highest-scoring tokens; optionally fuse the rest into one token.

    The fused token is the score-weighted mean of the tokens not kept, with weights normalised to
    sum to one, and its size is their total size. EViT itself uses the raw cls-attention weights
    (sum a_i x_i, not normalised), which shrinks the fused token's norm by the attention mass it
    lost; that only works after fine-tuning, so for off-the-shelf weights we normalise.
    """
    rest, rest_sizes = x[:, prefix:], sizes[:, prefix:]
    index = scores.topk(k, dim=-1).indices  # (B, k), static k -> TopK + GatherElements
    kept = rest.gather(1, index[:, :, None].expand(-1, -1, rest.shape[-1]))
    kept_sizes = rest_sizes.gather(1, index[:, :, None])
    parts, part_sizes = [x[:, :prefix], kept], [sizes[:, :prefix], kept_sizes]
    if fuse:
        positions = torch.arange(rest.shape[1], device=x.device)
        # A mask from an equality test (no scatter): 1 for the tokens that were not kept.
        dropped = 1.0 - (index[:, :, None] == positions).to(x.dtype).sum(dim=1)
        weights = (scores * dropped)[:, :, None]
        fused = (weights * rest).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
        parts.append(fused)
        part_sizes.append((rest_sizes * dropped[:, :, None]).sum(dim=1, keepdim=True))
    return torch.cat(parts, dim=1), torch.cat(part_sizes, dim=1)


# MAE-native patch dropping ------------------------------------------------------------------------
def ordered_dither(h: int, w: int) -> torch.Tensor:
    """Bayer ordered-dither ranks (h, w): keeping the lowest n spreads n patches evenly over the grid.

    Half gives a checkerboard, a quarter every other row and column, any other count something
    in between, so a fixed keep rate always samples the whole image.
    """
    m = torch.zeros(1, 1, dtype=torch.long, device="cpu")  # indices, not weights: never on the meta device
    while m.shape[0] < max(h, w):
        m = torch.cat([torch.cat([4 * m, 4 * m + 2], 1), torch.cat([4 * m + 3, 4 * m + 1], 1)], 0)
    return m[:h, :w]


def grid_keep_index(grid: tuple[int, int, int], keep: float) -> list[int]:
    """Kept patch indices for a fixed pattern; video repeats the same spatial pattern on every tube."""
    t, h, w = grid
    n_spatial = max(1, round(keep * h * w))
    ranks = ordered_dither(h, w).flatten()
    spatial = sorted(torch.argsort(ranks * (h * w) + torch.arange(h * w, device="cpu"))[:n_spatial].tolist())
    return [ti * h * w + s for ti in range(t) for s in spatial]


def patch_variance(pixel_values: torch.Tensor, patch: int, tubelet: int) -> torch.Tensor:
    """Pixel variance of every patch (or tubelet), (B, N) in the patch embedding's token order."""
    if pixel_values.dim() == 4:
        b, c, hh, ww = pixel_values.shape
        p = pixel_values.reshape(b, c, hh // patch, patch, ww // patch, patch)
        p = p.permute(0, 2, 4, 1, 3, 5).reshape(b, (hh // patch) * (ww // patch), -1)
    else:
        b, t, c, hh, ww = pixel_values.shape
        p = pixel_values.reshape(b, t // tubelet, tubelet, c, hh // patch, patch, ww // patch, patch)
        p = p.permute(0, 1, 4, 6, 2, 3, 5, 7).reshape(b, (t // tubelet) * (hh // patch) * (ww // patch), -1)
    mean = p.mean(dim=-1, keepdim=True)
    return ((p - mean) ** 2).mean(dim=-1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor, prefix: int) -> torch.Tensor:
    """Prefix tokens plus the patch tokens at ``index`` (B, k) (patch numbering, without prefix)."""
    kept = x[:, prefix:].gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))
    return torch.cat([x[:, :prefix], kept], dim=1)


# The plan: a schedule dict -> static per-block attributes ------------------------------------------
@dataclass
class TokenPlan:
    """What each block does to the token sequence, resolved once when the encoder is built."""

    method: str | None = None
    merge_r: list[int] = field(default_factory=list)  # per block: tokens merged (ToMe), already clipped
    keep_k: list[int] = field(default_factory=list)  # per block: patch tokens kept (top-k), 0 = none
    fuse: bool = False
    score: str = "mean"
    prop_attn: bool = False
    drop_index: list[int] | None = None  # fixed kept patches (grid pattern)
    drop_keep: int = 0  # kept patches per image (variance pattern)
    counts: list[int] = field(default_factory=list)  # tokens entering each block, then the final count

    @property
    def reduces(self) -> bool:
        return self.method is not None


def tome_r_list(depth: int, r: int | list[int], inflection: float = 0.0) -> list[int]:
    """ToMe's r schedule (tome/utils.py ``parse_r``): an int (constant), (r, inflection) (inflection
    < 0 decreases), or a list padded with zeros. The requested values: :func:`build_plan` clips them."""
    if isinstance(r, (list, tuple)):
        values = [int(v) for v in r]
        if len(values) > depth:
            raise ConfigError(f"r lists {len(values)} blocks but the model has {depth}: give at most {depth} values")
        return values + [0] * (depth - len(values))
    if depth <= 1:
        return [int(r)] * depth
    low = int(r * (1.0 - inflection))
    high = 2 * r - low
    step = (high - low) / (depth - 1)
    return [int(low + step * i) for i in range(depth)]


def build_plan(cfg: Any) -> TokenPlan:
    """Validate ``cfg.token_schedule`` against the encoder's shape and resolve it per block."""
    sched = cfg.token_schedule
    prefix = cfg.num_prefix_tokens
    n = cfg.num_tokens
    if not sched:
        return TokenPlan(counts=[n] * (cfg.depth + 1))
    method = sched.get("method")
    if method not in METHODS:
        raise ConfigError(f"unknown token reduction method {method!r}: use one of {', '.join(METHODS)}")
    if method in ("tome", "topk") and cfg.rel_pos_bias != "none":
        raise ConfigError(
            f"token method '{method}' creates tokens without a grid position, which a relative position bias (BEiT) needs: use method drop with pattern grid",
            option=("method", "pattern"),
        )
    plan = TokenPlan(method=method, merge_r=[0] * cfg.depth, keep_k=[0] * cfg.depth)
    keep = float(sched.get("keep", 1.0)) if method != "tome" else 1.0  # drop and topk: the fraction kept
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"keep={keep} is out of range: give a fraction of tokens in (0, 1]")
    if method == "drop":
        pattern = sched.get("pattern", "grid")
        if pattern not in PATTERNS:
            raise ConfigError(f"unknown drop pattern {pattern!r}: use one of {', '.join(PATTERNS)}")
        if pattern == "grid":
            plan.drop_index = grid_keep_index(cfg.grid, keep)
            n_kept = len(plan.drop_index)
        else:
            if cfg.rel_pos_bias != "none":
                raise ConfigError("pattern 'variance' keeps different patches per image, so a relative position bias cannot follow it: use pattern grid", option="pattern")
            n_kept = plan.drop_keep = max(1, round(keep * cfg.num_patches))
        if n_kept == cfg.num_patches:
            plan.drop_index, plan.drop_keep = None, 0  # keep = 1: exactly the dense model
        n = prefix + n_kept
    counts = [n]
    if method == "tome":
        r_list = [int(v) for v in sched.get("r", [])]
        if len(r_list) != cfg.depth:
            raise ConfigError(f"token schedule lists r for {len(r_list)} blocks but the model has {cfg.depth}: re-run mimc tokens on this model")
        plan.prop_attn = bool(sched.get("prop_attn", False))
        for i, r in enumerate(r_list):
            if r < 0:
                raise ConfigError(f"r={r} at block {i + 1} is negative: give the number of tokens merged, >= 0")
            # Clipped here, once, as upstream clips at run time: the counts stay static for export.
            r = clip_r(r, n, prefix)
            plan.merge_r[i] = r
            n -= r
            counts.append(n)
    elif method == "topk":
        blocks = [int(b) for b in sched.get("blocks", [])]
        bad = [b + 1 for b in blocks if not 0 <= b < cfg.depth]
        if bad:
            raise ConfigError(f"at {bad} is beyond the model's {cfg.depth} blocks: give block numbers 1..{cfg.depth}", option="at")
        plan.fuse = bool(sched.get("fuse", True))
        plan.score = sched.get("score", "cls" if cfg.pooling == "cls" else "mean")
        if plan.score not in SCORES:
            raise ConfigError(f"unknown top-k score {plan.score!r}: use one of {', '.join(SCORES)}")
        if plan.score == "cls" and prefix == 0:
            raise ConfigError("top-k by cls attention needs a cls token and this model has none: use score 'mean'")
        for i in range(cfg.depth):
            m = n - prefix
            k = math.ceil(keep * m)
            # Fusing needs at least two leftover tokens to save anything; otherwise keep all.
            if i in blocks and m - k >= (2 if plan.fuse else 1):
                plan.keep_k[i] = k
                n = prefix + k + (1 if plan.fuse else 0)
            counts.append(n)
    else:
        counts.extend([n] * cfg.depth)
    plan.counts = counts
    return plan


def reduced_macs(cfg: Any, plan: TokenPlan | None = None) -> float:
    """Multiply-accumulates of one forward pass with the plan's per-block token counts.

    Attention (qkv, q@k, attn@v, proj) runs on the tokens entering a block and the MLP on the
    tokens left after that block's reduction; the merge/select overhead itself is not counted.
    """
    plan = plan or build_plan(cfg)
    d = cfg.dim
    macs = cfg.num_patches * d * cfg.in_chans * cfg.patch_size**2 * cfg.tubelet_size
    for i in range(cfg.depth):
        n_in, n_out = plan.counts[i], plan.counts[i + 1]
        inner = cfg.heads_of(i) * cfg.attn_head_dim
        macs += n_in * d * 4 * inner + 2 * n_in * n_in * inner
        macs += 2 * n_out * d * cfg.mlp_dim_of(i)
    return float(macs)
