"""N:M semi-structured sparsity along the input dimension of every block Linear.

Every Linear inside the blocks (``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``) keeps at most N
non-zeros in every group of M consecutive input weights of each output row: the layout sparse
tensor cores read (2:4 on Ampere and later). Masks are baked into the dense weights as zeros and
``EncoderConfig.nm_pattern`` is set, so the manifest tells a TensorRT build to enable sparse weights.

One-shot methods (``NMSparsityConfig.method``):

- ``magnitude``: keep the N largest |W_ij| per group; no data.
- ``wanda``: keep the N largest |W_ij|·‖X_j‖₂, ‖X_j‖₂ the norm of input feature j over the
  calibration tokens.
- ``sparsegpt``: H = XᵀX + 1 % mean-diagonal damping; saliency w²/[H⁻¹]_jj² from the upper Cholesky
  factor of H⁻¹, processed in column blocks; with ``update_weights`` the pruned weights' error is
  spread onto the not-yet-processed columns (the OBS update).
- ``learned``: MaskLLM, see :mod:`mimc.compression.nm_learned`.

``weighting='rsq'`` weights every calibration token by the attention it receives when the Wanda and
SparseGPT statistics are accumulated (RSQ, :mod:`mimc.compression.rsq`); ``uniform`` (the default)
weights every token equally and runs exactly the unweighted code.

Calibration is sequential per block: the statistics of block i come from its inputs after the
already-sparsified blocks 0..i-1 (as Wanda and SparseGPT do), so later blocks see the errors of
earlier ones. Each block's inputs are carried forward from the previous block (one pass over the
calibration images in all); with a token schedule the encoder's own forward is re-run up to each
block instead. The four Linears of one block share the same inputs.

:func:`check_nm` is the one checker of the pattern; the stage calls it after writing masks and
export calls it before writing a graph.

References:
- Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot",
  ICML 2023 — github.com/IST-DASLab/sparsegpt
- Sun et al., "A Simple and Effective Pruning Approach for Large Language Models" (Wanda), ICLR 2024
  — github.com/locuslab/wanda
- Mishra et al., "Accelerating Sparse Deep Neural Networks" (2:4 sparse tensor cores), 2021.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from mimc.errors import ConfigError, DataError, ValidationError
from mimc.compression.registry import StageConfig, clone_encoder, register
from mimc.compression.rsq import DEFAULT_R_MIN, WEIGHTINGS, token_weights, weighted_moments

METHODS = ("magnitude", "wanda", "sparsegpt", "learned")


# The pattern and the one checker ------------------------------------------------------------------
def parse_pattern(pattern: str) -> tuple[int, int]:
    """'2:4' -> (2, 4); N must be at least 1 and smaller than M."""
    try:
        n_str, m_str = str(pattern).split(":")
        n, m = int(n_str), int(m_str)
    except ValueError:
        raise ConfigError(f"N:M pattern '{pattern}' is not of the form N:M: pass e.g. --pattern 2:4") from None
    if n < 1 or m < 2:
        raise ConfigError(f"N:M pattern '{pattern}' needs N >= 1 and M >= 2: pass e.g. --pattern 2:4")
    if n >= m:
        raise ConfigError(f"N:M pattern '{pattern}' keeps N={n} of M={m}, which prunes nothing: N must be smaller than M (e.g. 2:4)")
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
        return None
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
    return None


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Boolean mask keeping the n highest scores in each group of m consecutive columns."""
    out, cols = scores.shape
    grouped = scores.reshape(out, cols // m, m)
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    keep.scatter_(-1, grouped.topk(n, dim=-1).indices, True)
    return keep.reshape(out, cols)


# Calibration statistics -----------------------------------------------------------------------------
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
            s.sq_norm += sq
            if hess is not None:
                s.hessian += hess
        else:
            s.sq_norm += (x * x).sum(dim=0)
            if s.hessian is not None:
                s.hessian += x.T @ x
        s.tokens += x.shape[0]
        if stop:
            raise _StopForward

    return hook


def collect_block_stats(encoder: nn.Module, block_index: int, pixels: list[torch.Tensor], hessian: bool) -> dict[str, LayerStats]:
    """Input statistics of block ``block_index``'s Linears over the calibration batches.

    Runs the encoder's own forward (so any structure it has is respected) and stops it right after
    the block; every hook is removed even when the forward raises.
    """
    prefix = f"blocks.{block_index}."
    linears = [(name, lin) for name, lin in block_linears(encoder) if name.startswith(prefix)]
    stats: dict[str, LayerStats] = {}
    last_name = linears[-1][0]
    handles = [lin.register_forward_hook(_stats_hook(stats, name, hessian, stop=name == last_name)) for name, lin in linears]
    try:
        with torch.no_grad():
            for batch in pixels:
                try:
                    encoder(batch)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    return stats


def _carried_block_stats(block: nn.Module, prefix: str, inputs: list[torch.Tensor], shared_bias, hessian: bool,
                         r_min: float | None = None) -> dict[str, LayerStats]:
    """Input statistics of one block's Linears, running only that block on its carried inputs.

    With ``r_min`` every token is weighted by RSQ's attention-received weight for this block.
    """
    stats: dict[str, LayerStats] = {}
    holder = {} if r_min is not None else None
    # The weights read this block's attention, so they are computed before the hooks go on.
    weights = [token_weights(block, x, shared_bias, r_min) for x in inputs] if r_min is not None else None
    handles = [mod.register_forward_hook(_stats_hook(stats, prefix + name, hessian, weights=holder)) for name, mod in block.named_modules()
               if isinstance(mod, nn.Linear)]
    try:
        with torch.no_grad():
            for k, x in enumerate(inputs):
                if holder is not None:
                    holder["r"] = weights[k]
                block(x, shared_bias)
    finally:
        for h in handles:
            h.remove()
    return stats


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
    original = w.clone()
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
    new = w if update_weights else original
    return (new * keep).to(weight.dtype), keep


# One-shot masks -------------------------------------------------------------------------------------
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
            with torch.no_grad():
                lin.weight.mul_(masks[name])
        return masks
    if not pixels:
        raise DataError(f"N:M method '{method}' needs calibration images: pass --calib DIR (a folder, .npz/.npy or 'builtin')")
    # Without a token schedule each block's input can be carried forward (one pass in all);
    # otherwise the encoder's own forward is re-run up to each block.
    carried = shared_bias = None
    if weighting == "rsq" and encoder.config.token_schedule is not None:
        raise ConfigError("--weighting rsq reads each block's attention on its carried inputs: sparsify before the tokens stage")
    if encoder.config.token_schedule is None:
        with torch.no_grad():
            carried = [encoder.embed(batch) for batch in pixels]
            shared_bias = encoder.rel_pos_bias() if encoder.rel_pos_bias is not None else None
    for b in range(len(encoder.blocks)):
        if carried is not None:
            stats = _carried_block_stats(encoder.blocks[b], f"blocks.{b}.", carried, shared_bias, hessian=method == "sparsegpt",
                                         r_min=r_min if weighting == "rsq" else None)
        else:
            stats = collect_block_stats(encoder, b, pixels, hessian=method == "sparsegpt")
        for name, s in stats.items():
            lin = linears[name]
            with torch.no_grad():
                if method == "wanda":
                    masks[name] = nm_keep_mask(lin.weight.abs() * s.sq_norm.sqrt()[None, :], n, m)
                    lin.weight.mul_(masks[name])
                else:
                    new, masks[name] = sparsegpt_prune(lin.weight, s.hessian / max(s.tokens, 1), n, m, damp, blocksize, update_weights)
                    lin.weight.copy_(new)
        if carried is not None:
            with torch.no_grad():  # the sparsified block's output is the next block's calibration input
                carried = [encoder.blocks[b](x, shared_bias) for x in carried]
    return masks


# The stage ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NMSparsityConfig(StageConfig):
    """N:M sparsity of every block Linear. ``learned`` holds MaskLLM's options (method 'learned')."""

    name: ClassVar[str] = "sparsify"
    version: ClassVar[int] = 1

    pattern: str = "2:4"
    method: str = "magnitude"
    n_calib: int = 128  # calibration images for wanda / sparsegpt (and the learned prior)
    update_weights: bool = True  # sparsegpt: OBS update of the kept weights
    damp: float = 0.01  # sparsegpt: damping, a fraction of the mean Hessian diagonal
    blocksize: int = 128  # sparsegpt: columns per lazy-update block
    calib_batch_size: int = 16
    seed: int = 0
    learned: Any = None  # NMLearnedConfig; None means its defaults
    weighting: str = "uniform"  # token weights of the wanda / sparsegpt statistics: uniform or rsq (RSQ)
    r_min: float = DEFAULT_R_MIN  # rsq: the least-attended token's weight before the mean-1 rescale

    def __post_init__(self) -> None:
        parse_pattern(self.pattern)
        if self.method not in METHODS:
            raise ConfigError(f"unknown N:M method '{self.method}': choose one of {', '.join(METHODS)}")
        if self.n_calib < 1 or self.calib_batch_size < 1:
            raise ConfigError("n_calib and calib_batch_size must be >= 1")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown token weighting '{self.weighting}': choose one of {', '.join(WEIGHTINGS)}")
        if isinstance(self.r_min, bool) or not isinstance(self.r_min, (int, float)) or not 0.0 < float(self.r_min) <= 1.0:
            raise ConfigError(f"r_min must lie in (0, 1], got {self.r_min!r}: the default is 1/3 (RSQ's 1..3 range)")
        if self.weighting == "rsq" and self.method == "magnitude":
            raise ConfigError("--weighting rsq weights calibration tokens: use it with --method wanda, sparsegpt or learned")
        if not 0.0 <= self.damp < 1.0:
            raise ConfigError(f"damp={self.damp} must be in [0, 1): the usual value is 0.01")
        from mimc.compression.nm_learned import NMLearnedConfig

        if self.learned is None:
            object.__setattr__(self, "learned", NMLearnedConfig())
        elif isinstance(self.learned, dict):
            object.__setattr__(self, "learned", NMLearnedConfig.from_dict(self.learned))
        elif not isinstance(self.learned, NMLearnedConfig):
            raise ConfigError("sparsify option 'learned' must be a mapping of MaskLLM options")

    @property
    def needs_data(self) -> bool:
        return self.method != "magnitude"

    @property
    def nm(self) -> tuple[int, int]:
        return parse_pattern(self.pattern)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "learned"}
        data["learned"] = self.learned.to_dict()
        return data


def calibration_pixels(batches: Iterable[torch.Tensor] | None, limit: int, batch_size: int) -> list[torch.Tensor]:
    """At most ``limit`` images from the batches, re-cut into batches of ``batch_size``."""
    if batches is None:
        return []
    taken, count = [], 0
    for batch in batches:
        if count >= limit:
            break
        batch = batch[: limit - count]
        taken.append(batch)
        count += batch.shape[0]
    if not taken:
        return []
    pixels = torch.cat(taken)
    return list(pixels.split(batch_size))


def pooled_fidelity(student: nn.Module, teacher: nn.Module, pixels: list[torch.Tensor]) -> float:
    """Mean cosine between student and teacher pooled features (1.0 = identical direction)."""
    if not pixels:
        return float("nan")
    sims = []
    with torch.no_grad():
        for batch in pixels:
            sims.append(torch.nn.functional.cosine_similarity(student(batch).pooled, teacher(batch).pooled, dim=-1))
    return round(float(torch.cat(sims).mean()), 6)


@register(NMSparsityConfig)
def sparsify(encoder, config: NMSparsityConfig, calibration_batches=None):
    n, m = config.nm
    validate_pattern(encoder, n, m)
    if config.method == "learned":
        from mimc.compression.nm_learned import learn_nm_masks

        return learn_nm_masks(encoder, config, calibration_batches)
    pixels = calibration_pixels(calibration_batches, config.n_calib, config.calib_batch_size)
    student = clone_encoder(encoder).eval()
    masks = one_shot_sparsify(student, n, m, config.method, pixels, config.update_weights, config.damp, config.blocksize,
                              config.weighting, config.r_min)
    student.config = student.config.replace(nm_pattern=config.pattern)
    check_nm(student)
    metrics: dict[str, Any] = {
        "pattern": config.pattern,
        "method": config.method,
        "density": round(sum(float(k.float().sum()) for k in masks.values()) / sum(k.numel() for k in masks.values()), 6),
        "n_calib": sum(p.shape[0] for p in pixels),
        "weighting": config.weighting,
    }
    if pixels:
        metrics["fidelity_pooled_cosine"] = pooled_fidelity(student, encoder, pixels)
    else:
        from mimc.data import deterministic_inputs

        metrics["fidelity_pooled_cosine_random_inputs"] = pooled_fidelity(student, encoder, [deterministic_inputs(encoder.config, 8)])
    return student, metrics


__all__ = [
    "NMSparsityConfig",
    "parse_pattern",
    "block_linears",
    "validate_pattern",
    "check_nm",
    "nm_keep_mask",
    "sparsegpt_prune",
    "one_shot_sparsify",
    "pooled_fidelity",
]
