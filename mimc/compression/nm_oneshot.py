"""One-shot N:M masks of every block Linear: magnitude, Wanda and SparseGPT.

- ``magnitude``: keep the N largest |W_ij| per group; no data.
- ``wanda``: keep the N largest |W_ij|·‖X_j‖₂, ‖X_j‖₂ the norm of input feature j over the
  calibration tokens.
- ``sparsegpt``: H = XᵀX + 1 % mean-diagonal damping; saliency w²/[H⁻¹]_jj² from the upper Cholesky
  factor of H⁻¹, processed in column blocks; with ``update_weights`` the pruned weights' error is
  spread onto the not-yet-processed columns (the OBS update).

Calibration is sequential per block: the statistics of block i come from its inputs after the
already-sparsified blocks 0..i-1 (as Wanda and SparseGPT do), so later blocks see the errors of
earlier ones. Each block's inputs are carried forward from the previous block (one pass over the
calibration images in all); with a token schedule the encoder's own forward is re-run up to each
block instead. The four Linears of one block share the same inputs. The sparsify stage
(:mod:`mimc.compression.nm`) and MaskLLM's prior (:mod:`mimc.compression.nm_learned`) both use these.

References:
- Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
  ICML 2023 — github.com/IST-DASLab/sparsegpt
- Sun et al., "A Simple and Effective Pruning Approach for Large Language Models" (Wanda), ICLR 2024
  — github.com/locuslab/wanda
"""
from __future__ import annotations

import torch
from torch import nn

from mimc.compression.calib_stats import carried_block_stats, collect_block_stats
from mimc.compression.rsq import DEFAULT_R_MIN
from mimc.errors import ConfigError, DataError
from mimc.models.nm_pattern import block_linears


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the n highest scores in each group of m consecutive columns.

    As Wanda and SparseGPT do, the m - n lowest are chosen for pruning (ties resolve as theirs do).
    """
    out, cols = scores.shape
    grouped = scores.reshape(out, cols // m, m)
    pruned = torch.zeros_like(grouped, dtype=torch.bool)
    pruned.scatter_(-1, grouped.topk(m - n, dim=-1, largest=False).indices, True)
    return ~pruned.reshape(out, cols)


# SparseGPT ------------------------------------------------------------------------------------------
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, n: int, m: int, damp: float = 0.01,
                    blocksize: int = 128, update_weights: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """N:M-prune ``weight`` (out, in) with SparseGPT; returns (new weight, keep mask).

    A dense per-column loop (fine at ViT sizes). Without ``update_weights`` only the mask is chosen
    (by the same saliency) and the kept weights stay as they were — MaskLLM's prior.
    """
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    cols = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0  # inputs that are always zero: any value works, their weights are zeroed
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError as exc:  # pragma: no cover - damping makes this rare
        raise ConfigError(f"SparseGPT's Hessian is not positive definite ({exc}): raise the damping or use more calibration images") from None
    blocksize = max(m, (blocksize // m) * m)  # a group of M columns never straddles two blocks
    pruned = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        hinv1 = hinv[i1:i2, i1:i2]
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        diag1 = torch.diag(hinv1)
        for i in range(i2 - i1):
            if i % m == 0:
                saliency = w1[:, i : i + m] ** 2 / diag1[i : i + m] ** 2
                drop = saliency.topk(m - n, dim=1, largest=False).indices
                pruned[:, i1 + i : i1 + i + m].scatter_(1, drop, True)
            col = w1[:, i]
            q = col.masked_fill(pruned[:, i1 + i], 0.0)
            q1[:, i] = q
            if update_weights:
                e = (col - q) / hinv1[i, i]
                w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
                err1[:, i] = e
        if update_weights:
            w[:, i1:i2] = q1
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    keep = ~pruned
    return (w * keep).to(weight.dtype), keep  # without update_weights, w is never written after the dead columns


# One-shot masks -------------------------------------------------------------------------------------
@torch.no_grad()
def one_shot_sparsify(encoder: nn.Module, n: int, m: int, method: str, pixels: list[torch.Tensor] | None,
                      update_weights: bool = False, damp: float = 0.01, blocksize: int = 128,
                      weighting: str = "uniform", r_min: float = DEFAULT_R_MIN) -> dict[str, torch.Tensor]:
    """Sparsify ``encoder`` in place block by block; returns the keep mask of every block Linear.

    ``weighting='rsq'``: token-weighted statistics (:mod:`mimc.compression.rsq`).
    """
    masks: dict[str, torch.Tensor] = {}
    linears = dict(block_linears(encoder))
    if method == "magnitude":
        for name, lin in linears.items():
            masks[name] = nm_keep_mask(lin.weight.detach().abs(), n, m)
            lin.weight.mul_(masks[name])
        return masks
    if not pixels:
        raise DataError(f"N:M method '{method}' needs calibration images: give data (a folder, .npz/.npy or 'builtin')", option="data")
    if weighting == "rsq" and encoder.config.token_schedule is not None:
        raise ConfigError("weighting rsq reads each block's attention on its carried inputs: sparsify before the tokens stage",
                          option="weighting")
    # Without a token schedule each block's input can be carried forward (one pass in all);
    # otherwise the encoder's own forward is re-run up to each block.
    carried = shared_bias = None
    if encoder.config.token_schedule is None:
        carried = [encoder.embed(batch) for batch in pixels]
        shared_bias = encoder.rel_pos_bias() if encoder.rel_pos_bias is not None else None
    for b in range(len(encoder.blocks)):
        if carried is not None:
            stats = carried_block_stats(encoder.blocks[b], f"blocks.{b}.", carried, shared_bias, hessian=method == "sparsegpt",
                                        r_min=r_min if weighting == "rsq" else None)
        else:
            stats = collect_block_stats(encoder, b, pixels, hessian=method == "sparsegpt")
        for name, s in stats.items():
            lin = linears[name]
            if method == "wanda":
                masks[name] = nm_keep_mask(lin.weight.abs() * s.sq_norm.sqrt()[None, :], n, m)
                lin.weight.mul_(masks[name])
            else:
                new, masks[name] = sparsegpt_prune(lin.weight, s.hessian / max(s.tokens, 1), n, m, damp, blocksize,
                                                   update_weights)
                lin.weight.copy_(new)
        if carried is not None:  # the sparsified block's output is the next block's calibration input
            carried = [encoder.blocks[b](x, shared_bias) for x in carried]
    return masks


__all__ = ["nm_keep_mask", "sparsegpt_prune", "one_shot_sparsify"]
