"""RSQ token weights: weight each calibration token by the attention it receives.

RSQ (Sung et al., "RSQ: Learning from Important Tokens Leads to Better Quantized LLMs",
arXiv 2503.01820; code: https://github.com/ylsung/rsq) accumulates the layer-wise second-order
statistics of GPTQ with a per-token weight, H = Σₜ rₜ xₜxₜᵀ, so the reconstruction favours the
tokens the model attends to. mimc uses the same weights for SparseGPT's H and for Wanda's per-input
norms (Σₜ rₜ xₜⱼ²), and so for the SparseGPT / Wanda prior of learned masks.

The weight of token t in block l (:func:`token_weights`), following upstream
``fake_quant/input_weighting_module.py::OriginalAttentionWeighting`` (``configs/input_weighting/
attncon.yaml``) and ``gptq_utils.py::add_batch``:
- the block's own attention probabilities on its (already-compressed) input, norm1 applied, summed
  over heads and over query tokens: the column sums, i.e. the attention token t receives;
- min-max normalised per sequence (per image here) to [r_min, 1] (upstream: [1, 3], the same as
  r_min = 1/3, the default), then rescaled to mean 1 over the image's tokens (upstream normalises
  ``w / w.sum() * len``), so the statistics keep the scale of the uniform ones;
- the same weights serve every Linear of the block (qkv, proj, fc1, fc2), as upstream weights every
  module of a decoder layer.
Where mimc differs: upstream calibrates one sequence per batch; mimc's batches hold many images and
the weights are computed per image inside the batch. An image whose column sums are all equal gets
weight 1 everywhere (upstream would divide by zero).

Weighted accumulation (:func:`weighted_moments`) scales each token by √rₜ, as upstream does, so
XᵀX of the scaled tokens is Σₜ rₜ xₜxₜᵀ; with no weights the statistics are exactly mimc's
uniform ones (the uniform path in :mod:`mimc.compression.nm` does not call this module at all).
"""
from __future__ import annotations

import torch
from torch import nn

WEIGHTINGS = ("uniform", "rsq")
DEFAULT_R_MIN = 1.0 / 3.0  # upstream attncon.yaml: min_value 1, max_value 3


def normalise_weights(received: torch.Tensor, r_min: float) -> torch.Tensor:
    """(B, N) attention received -> weights min-max scaled to [r_min, 1] per row, then to mean 1 per row."""
    lo = received.min(dim=-1, keepdim=True).values
    hi = received.max(dim=-1, keepdim=True).values
    span = hi - lo
    unit = torch.where(span > 0, (received - lo) / span.clamp_min(torch.finfo(received.dtype).tiny), torch.ones_like(received))
    r = r_min + (1.0 - r_min) * unit
    return r / r.mean(dim=-1, keepdim=True)


@torch.no_grad()
def token_weights(block: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, r_min: float = DEFAULT_R_MIN) -> torch.Tensor:
    """RSQ weights (B, N) of block ``block``'s input tokens ``x`` (B, N, D): attention received, normalised."""
    _, _, attn = block.attn(block.norm1(x), bias, return_attn=True)
    received = attn.float().sum(dim=1).sum(dim=1)  # heads, then queries: (B, N) per key token
    return normalise_weights(received, r_min)


def weighted_moments(x: torch.Tensor, weights: torch.Tensor, hessian: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Σₜ rₜ xₜ², Σₜ rₜ xₜxₜᵀ) of tokens ``x`` (T, in) with weights (T,)."""
    xs = x * weights.reshape(-1, 1).sqrt()
    return (xs * xs).sum(dim=0), (xs.T @ xs if hessian else None)


__all__ = ["WEIGHTINGS", "DEFAULT_R_MIN", "normalise_weights", "token_weights", "weighted_moments"]
