"""Outlier folding before int8: SmoothQuant and a RepQ-ViT-style reparameterization.

Post-LayerNorm activations of ViTs carry a few channels with ranges 10-100x wider than the rest;
with one int8 scale per tensor those channels eat the whole range and every other channel is
quantized to a handful of levels. Both transforms here are exact in float: they rescale (and
shift) LayerNorm's affine output per channel and undo it inside the next Linear's weights/bias,
so the deployed graph is unchanged in shape and TensorRT-friendly (no extra ops).

- SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1-alpha); gamma, beta /= s; W[:, j] *= s.
  Moves part of the activation range into the weights (which are quantized per output channel).
- RepQ (per-channel -> per-tensor): with per-channel asymmetric ranges [min_c, max_c] of X,
  step_c = (max_c - min_c) / 255, r = step_c / mean(step), b = min_c / r - mean(min);
  gamma /= r, beta = beta / r - b, W[:, c] *= r, bias += W_new @ b. Afterwards every channel spans
  the same range, so one per-tensor scale fits all of them as well as per-channel scales would.
  Where mimc differs from RepQ-ViT's code (classification/test_quant.py): the ranges are the raw
  per-channel min / max (upstream: a 0.999-0.99999 percentile search per channel, integer zero
  points), the common minimum is mean(min) (upstream: -mean(zero point) * mean(step), a shift shared
  by every channel that the per-tensor recalibration absorbs), and the post-Softmax log2
  reparameterization is not done.

Both apply to norm1 -> attn.qkv and norm2 -> mlp.fc1 of every block.

References:
- Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language
  Models", ICML 2023, arXiv 2211.10438; github.com/mit-han-lab/smoothquant (smooth.py).
- Li et al., "RepQ-ViT: Scale Reparameterization for Post-Training Quantization of Vision
  Transformers", ICCV 2023, arXiv 2212.08254; github.com/zkkli/RepQ-ViT.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from mimc.errors import ConfigError, DataError
from mimc.compression.registry import StageConfig, clone_encoder, register
from mimc.options import option


@dataclasses.dataclass(frozen=True)
class SmoothQuantConfig(StageConfig):
    """SmoothQuant migration strength ``alpha`` in [0, 1] (0.5: balance activations and weights)."""

    name: ClassVar[str] = "smooth"
    needs_data: ClassVar[bool] = True
    alpha: float = option(0.5, ge=0, le=1, doc="migration strength (0.5 balances activations and weights)")
    max_batches: int | None = option(None, ge=1, doc="calibration batches used; null: all")


@dataclasses.dataclass(frozen=True)
class RepQConfig(StageConfig):
    """RepQ-ViT reparameterization of post-LayerNorm activations to one shared range.

    ``symmetric``: centre every channel's range on zero instead of aligning the minima; the right
    choice for symmetric int8 activations (TensorRT), the paper's choice (False) for asymmetric u8.
    """

    name: ClassVar[str] = "repq"
    needs_data: ClassVar[bool] = True
    symmetric: bool = False
    max_batches: int | None = option(None, ge=1, doc="calibration batches used; null: all")


# Calibration statistics ---------------------------------------------------------------------------
def _pairs(encoder) -> list[tuple[str, nn.LayerNorm, nn.Linear]]:
    """(name, LayerNorm, the Linear it feeds) for norm1 -> qkv and norm2 -> fc1 of every block."""
    return [pair for i, block in enumerate(encoder.blocks)
            for pair in ((f"blocks.{i}.norm1", block.norm1, block.attn.qkv),
                         (f"blocks.{i}.norm2", block.norm2, block.mlp.fc1))]


@torch.no_grad()
def channel_ranges(encoder, calibration_batches: Iterable[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel (min, max) of every smoothed LayerNorm's output over the calibration batches."""
    stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def fn(_module, _inputs, output):
            flat = output.detach().reshape(-1, output.shape[-1]).to(torch.float64)
            lo, hi = flat.amin(0), flat.amax(0)
            if name in stats:
                lo, hi = torch.minimum(stats[name][0], lo), torch.maximum(stats[name][1], hi)
            stats[name] = (lo, hi)
        return fn

    seen = 0
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(encoder.train, encoder.training)
        encoder.eval()
        for name, norm, _ in _pairs(encoder):
            cleanup.enter_context(norm.register_forward_hook(hook(name)))
        for batch in calibration_batches:
            if not isinstance(batch, torch.Tensor) or tuple(batch.shape[1:]) != tuple(encoder.config.input_shape):
                shape = tuple(batch.shape) if hasattr(batch, "shape") else type(batch).__name__
                raise DataError(
                    f"calibration batch has shape {shape}, the model expects (N, {', '.join(map(str, encoder.config.input_shape))}): "
                    "load images with mimc.data.load_images for this model"
                )
            encoder(batch.to(torch.float32))
            seen += 1
    if seen == 0:
        raise DataError("no calibration batches: give data (a folder, .npz/.npy or 'builtin') with at least one image", option="data")
    return stats


# Folding (pure weight rewrites) -------------------------------------------------------------------
@torch.no_grad()
def fold_smoothquant(norm: nn.LayerNorm, linear: nn.Linear, act_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """Apply SmoothQuant to one LayerNorm -> Linear pair in place; returns the scales s."""
    w = linear.weight.to(torch.float64)
    w_absmax = w.abs().amax(dim=0)
    # Dead channels (zero activation or weight range) keep s = 1: nothing to migrate, avoid 0/0.
    live = (act_absmax > 0) & (w_absmax > 0)
    s = torch.ones_like(act_absmax)
    s[live] = act_absmax[live].pow(alpha) / w_absmax[live].pow(1.0 - alpha)
    s = s.clamp(min=1e-5)
    _rescale(norm, linear, s, shift=None)
    return s


@torch.no_grad()
def fold_repq(norm: nn.LayerNorm, linear: nn.Linear, lo: torch.Tensor, hi: torch.Tensor, symmetric: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the RepQ-ViT reparameterization to one pair in place; returns (r, b)."""
    step = (hi - lo).clamp(min=0) / 255.0
    mean_step = step.mean()
    if mean_step <= 0:
        return torch.ones_like(lo), torch.zeros_like(lo)
    # A channel with (almost) no range would get r ~ 0 and blow up gamma / r; floor it.
    r = (step / mean_step).clamp(min=1e-3)
    if symmetric:
        b = (lo + hi) / (2 * r)  # every channel centred on 0 after the shift
    else:
        b = lo / r - lo.mean()  # every channel's minimum moved to mean(min) (upstream: to -mean(zp) * mean(step))
    _rescale(norm, linear, r, shift=b)
    return r, b


def _rescale(norm: nn.LayerNorm, linear: nn.Linear, s: torch.Tensor, shift: torch.Tensor | None) -> None:
    """X' = X / s - shift on the LayerNorm side; W' = W * s, bias' = bias + W' @ shift on the Linear."""
    if norm.weight is None or norm.bias is None:
        raise ConfigError("outlier folding needs LayerNorms with affine weight and bias (elementwise_affine=True)")
    dtype = norm.weight.dtype
    gamma = norm.weight.to(torch.float64) / s
    beta = norm.bias.to(torch.float64) / s
    w_new = linear.weight.to(torch.float64) * s[None, :]
    if shift is not None:
        beta = beta - shift
        extra = w_new @ shift
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype))
        linear.bias.copy_((linear.bias.to(torch.float64) + extra).to(linear.bias.dtype))
    norm.weight.copy_(gamma.to(dtype))
    norm.bias.copy_(beta.to(dtype))
    linear.weight.copy_(w_new.to(linear.weight.dtype))


def _summary(values: list[torch.Tensor]) -> dict[str, float]:
    cat = torch.cat([v.flatten() for v in values])
    return {"min": round(float(cat.min()), 6), "max": round(float(cat.max()), 6), "mean": round(float(cat.mean()), 6)}


def _range_spread(ranges: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean over LayerNorms of max channel range / median channel range: the outlier severity."""
    ratios = []
    for lo, hi in ranges.values():
        width = (hi - lo).clamp(min=0)
        med = width.median()
        if med > 0:
            ratios.append(float(width.max() / med))
    return round(sum(ratios) / len(ratios), 4) if ratios else 1.0


@torch.no_grad()
def _fidelity(original, folded, batch: torch.Tensor) -> dict[str, Any]:
    """The folded float model against its source: should be rounding noise (~1e-6)."""
    from mimc.metrics import compare_outputs

    was_training = original.training
    original.eval()
    folded.eval()
    try:  # compared by name: last_hidden_state and pooled (EncoderOutput's hidden_states is None here)
        return compare_outputs(original(batch), folded(batch)).to_dict()
    finally:
        original.train(was_training)


def _fold(encoder, calibration_batches, max_batches, fold_pair):
    new = clone_encoder(encoder)
    # Calibration sets are small (hundreds of images): a list lets us measure before and after.
    batches = list(itertools.islice(calibration_batches, max_batches))
    ranges = channel_ranges(new, batches)
    factors = [fold_pair(norm, linear, *ranges[name]) for name, norm, linear in _pairs(new)]
    if not new.config.qkv_bias and any(b.attn.qkv.bias is not None for b in new.blocks):
        # RepQ's shift gave qkv a bias: the config must say so or the artifact would not reload.
        for b in new.blocks:
            if b.attn.qkv.bias is None:
                b.attn.qkv.bias = nn.Parameter(torch.zeros(b.attn.qkv.out_features, dtype=b.attn.qkv.weight.dtype))
        new.config = new.config.replace(qkv_bias=True)
    after = channel_ranges(new, batches)
    metrics = {
        "pairs": len(factors),
        "factors": _summary(factors) if factors else None,
        # Outlier severity (max / median channel range, mean over LayerNorms), before and after.
        "channel_range_spread_before": _range_spread(ranges),
        "channel_range_spread_after": _range_spread(after),
        "fidelity": _fidelity(encoder, new, batches[0]),
        "calibration_images": int(sum(b.shape[0] for b in batches)),
    }
    return new, metrics


@register(SmoothQuantConfig)
def smooth_encoder(encoder, config: SmoothQuantConfig, calibration_batches):
    def pair(norm, linear, lo, hi):
        return fold_smoothquant(norm, linear, torch.maximum(lo.abs(), hi.abs()), config.alpha)

    return _fold(encoder, calibration_batches, config.max_batches, pair)


@register(RepQConfig)
def repq_encoder(encoder, config: RepQConfig, calibration_batches):
    def pair(norm, linear, lo, hi):
        return fold_repq(norm, linear, lo, hi, config.symmetric)[0]

    return _fold(encoder, calibration_batches, config.max_batches, pair)


__all__ = ["SmoothQuantConfig", "RepQConfig", "channel_ranges", "fold_smoothquant", "fold_repq"]
