"""Learned N:M masks (MaskLLM): a categorical choice among the C(M, N) masks of every weight group.

Each group of M consecutive input weights of every block Linear gets logits π over the C(M, N)
candidate masks (``itertools.combinations``; 6 for 2:4). Training draws a soft mask per step:
p = softmax((κ·π + g)/τ), g Gumbel noise, m = pᵀS (S the candidates; ``hard=False``, soft trains
better) and runs the encoder with W⊙m. The weights are frozen (buffers); only π learns, by
distillation from the dense encoder (:mod:`mimc.train`) minus λ·Σ‖W⊙m‖², which rewards keeping large
weights. The final mask is the argmax candidate of each group, baked into the weights as zeros.

Defaults (``NMLearnedConfig``), after MaskLLM-4V (the ViT port) unless noted:

- τ 4 → 0.05 and κ 10 → 100, both linear over the run; λ = 1e-5 (constant, as in 4V).
- π ~ N(0, σ0 = 0.2), then shifted by the agreement with a one-shot prior (default: SparseGPT
  without weight update): candidate k moves by (⟨s_k, m_prior⟩ − N/2)/(N/2)·α·std(π), α = 3, i.e.
  +3σ for the prior's own mask and −3σ for a disjoint one (the N/2 scaling generalises MaskLLM's
  2:4 rule to any N:M).
- AdamW on π, lr 1e-2 with cosine decay to 1e-3, no weight decay, 300 steps of 32 images: mimc's
  runs are a few hundred steps rather than 4V's 20 epochs (lr 1e-3), so the logits must move faster.
- ``mask_ratio`` 0 (every patch, as MaskLLM); 0.75 hides three quarters of the patches from teacher
  and student alike (DMAE-style), about 4x cheaper per step — benchmarks/ref_nm.py uses it.
- Gumbel noise is drawn from a generator seeded by (seed, step), identical on every torchrun rank.

References:
- Fang et al., "MaskLLM: Learnable Semi-Structured Sparsity for Large Language Models", NeurIPS
  2024 — github.com/NVlabs/MaskLLM; ViT port github.com/VainF/MaskLLM-4V
- Jang et al., "Categorical Reparameterization with Gumbel-Softmax", ICLR 2017.
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mimc.artifact import state_hash
from mimc.errors import ConfigError
from mimc.compression.nm import block_linears, calibration_pixels, check_nm, one_shot_sparsify, pooled_fidelity
from mimc.compression.registry import StageConfig, clone_encoder

PRIORS = ("sparsegpt", "wanda", "magnitude", "none")


@dataclass(frozen=True)
class NMLearnedConfig(StageConfig):
    """MaskLLM's options (the ``learned`` field of the sparsify stage)."""

    name: ClassVar[str] = "sparsify.learned"
    version: ClassVar[int] = 1

    steps: int = 300
    lr: float = 1e-2
    min_lr: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    batch_size: int = 32
    clip_grad: float = 1.0
    tau_start: float = 4.0
    tau_end: float = 0.05
    kappa_start: float = 10.0
    kappa_end: float = 100.0
    reg_lambda: float = 1e-5
    prior: str = "sparsegpt"
    prior_strength: float = 3.0  # α: the prior's mask starts α·σ above the mean
    sigma0: float = 0.2
    mask_ratio: float = 0.0
    flip: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prior not in PRIORS:
            raise ConfigError(f"unknown MaskLLM prior '{self.prior}': choose one of {', '.join(PRIORS)}")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("learned N:M needs steps >= 1 and batch_size >= 1")
        if min(self.tau_start, self.tau_end, self.kappa_start, self.kappa_end) <= 0:
            raise ConfigError("MaskLLM temperatures (tau) and logit scales (kappa) must be positive")
        if self.sigma0 <= 0:
            raise ConfigError("sigma0 must be positive: it is the spread of the initial logits")


def candidate_masks(n: int, m: int) -> torch.Tensor:
    """(C(m, n), m) 0/1 rows: every way to keep n of m."""
    rows = [[1.0 if j in keep else 0.0 for j in range(m)] for keep in itertools.combinations(range(m), n)]
    return torch.tensor(rows)


class MaskedLinear(nn.Module):
    """A frozen Linear whose weight is multiplied by a learned N:M mask."""

    def __init__(self, linear: nn.Linear, n: int, m: int, logits: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features, self.n, self.m = linear.in_features, linear.out_features, n, m
        self.register_buffer("weight", linear.weight.detach().clone())
        self.register_buffer("bias", linear.bias.detach().clone() if linear.bias is not None else None)
        self.register_buffer("candidates", candidate_masks(n, m))
        self.logits = nn.Parameter(logits)
        self.tau, self.kappa = 4.0, 10.0
        self.noise: torch.Tensor | None = None
        self.last_mask: torch.Tensor | None = None

    def soft_mask(self) -> torch.Tensor:
        scores = self.kappa * self.logits
        if self.noise is not None:
            scores = scores + self.noise
        probs = F.softmax(scores / self.tau, dim=-1)
        return (probs @ self.candidates).reshape(self.out_features, self.in_features)

    def hard_mask(self) -> torch.Tensor:
        return self.candidates[self.logits.detach().argmax(dim=-1)].reshape(self.out_features, self.in_features).bool()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_mask = self.soft_mask()
        return F.linear(x, self.weight * self.last_mask, self.bias)


def init_logits(keep: torch.Tensor | None, out: int, cols: int, n: int, m: int, cfg: NMLearnedConfig,
                generator: torch.Generator) -> torch.Tensor:
    """N(0, σ0) logits shifted toward the candidates that agree with the prior's keep mask."""
    cands = candidate_masks(n, m)
    logits = torch.randn(out, cols // m, len(cands), generator=generator) * cfg.sigma0
    if keep is not None:
        overlap = keep.reshape(out, cols // m, m).float() @ cands.T  # (out, groups, C): shared kept weights
        logits = logits + (overlap - n / 2) / (n / 2) * logits.std() * cfg.prior_strength
    return logits


class _MaskHooks:
    """Anneals τ and κ, draws the step's Gumbel noise, and adds −λ·Σ‖W⊙m‖² to the loss."""

    def __init__(self, layers: list[MaskedLinear], cfg: NMLearnedConfig):
        self.layers, self.cfg = layers, cfg

    def before_step(self, step: int, total: int, generator: torch.Generator) -> None:
        from mimc.train.schedule import linear

        tau = linear(step, total, self.cfg.tau_start, self.cfg.tau_end)
        kappa = linear(step, total, self.cfg.kappa_start, self.cfg.kappa_end)
        for layer in self.layers:
            layer.tau, layer.kappa = tau, kappa
            u = torch.rand(layer.logits.shape, generator=generator).clamp_(1e-10, 1.0 - 1e-7)
            layer.noise = (-torch.log(-torch.log(u))).to(layer.logits.device)

    def extra_loss(self) -> torch.Tensor | None:
        if not self.cfg.reg_lambda:
            return None
        total = sum(((layer.weight * layer.last_mask) ** 2).sum() for layer in self.layers)
        return -self.cfg.reg_lambda * total

    def after_step(self) -> None:
        return None


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _pixels_sha(pixels: torch.Tensor) -> str:
    return hashlib.sha256(pixels.contiguous().numpy().tobytes()).hexdigest()


def learn_nm_masks(encoder, config, calibration_batches) -> tuple[Any, dict[str, Any]]:
    """The ``learned`` method of the sparsify stage (``config`` is an NMSparsityConfig)."""
    from mimc.train import TrainSettings, train

    n, m = config.nm
    lc: NMLearnedConfig = config.learned
    batches = list(calibration_batches or [])
    if not batches:
        raise ConfigError("learned N:M needs training images: pass --data DIR (a folder, .npz/.npy or 'builtin')")
    pixels = torch.cat(batches)
    calib = calibration_pixels([pixels], config.n_calib, config.calib_batch_size)

    prior_masks: dict[str, torch.Tensor] = {}
    prior_fidelity = None
    if lc.prior != "none":
        prior_model = clone_encoder(encoder).eval()
        prior_masks = one_shot_sparsify(prior_model, n, m, lc.prior, calib, update_weights=False, damp=config.damp, blocksize=config.blocksize,
                                        weighting=config.weighting, r_min=config.r_min)
        prior_fidelity = pooled_fidelity(prior_model, encoder, calib)

    student = clone_encoder(encoder).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(lc.seed)
    layers: list[MaskedLinear] = []
    for name, lin in block_linears(student):
        logits = init_logits(prior_masks.get(name), lin.out_features, lin.in_features, n, m, lc, generator)
        layer = MaskedLinear(lin, n, m, logits)
        _set_module(student, name, layer)
        layers.append(layer)

    settings = TrainSettings(
        steps=lc.steps, lr=lc.lr, batch_size=lc.batch_size, warmup_steps=lc.warmup_steps, min_lr=lc.min_lr,
        weight_decay=lc.weight_decay, clip_grad=lc.clip_grad, mask_ratio=lc.mask_ratio, flip=lc.flip, seed=lc.seed,
    )
    meta = {"stage": config.to_dict(), "source_sha256": state_hash(encoder), "data_sha256": _pixels_sha(pixels)}
    result = train(student, clone_encoder(encoder), pixels, settings, meta=meta, hooks=_MaskHooks(layers, lc))

    out = clone_encoder(encoder).eval()
    linears = dict(block_linears(out))
    changed = groups = 0
    density = []
    for (name, _), layer in zip(block_linears(encoder), layers):
        keep = layer.hard_mask()
        with torch.no_grad():
            linears[name].weight.mul_(keep)
        density.append(float(keep.float().mean()))
        if name in prior_masks:
            g_new = keep.reshape(keep.shape[0], -1, m)
            g_old = prior_masks[name].reshape(keep.shape[0], -1, m)
            changed += int((g_new != g_old).any(dim=-1).sum())
            groups += g_new.shape[0] * g_new.shape[1]
    out.config = out.config.replace(nm_pattern=config.pattern)
    check_nm(out)
    eval_pixels = calibration_pixels([pixels], 256, 32)
    metrics: dict[str, Any] = {
        "pattern": config.pattern,
        "method": "learned",
        "prior": lc.prior,
        "density": round(sum(density) / len(density), 6),
        "fidelity_pooled_cosine": pooled_fidelity(out, encoder, eval_pixels),
        "n_train_images": int(len(pixels)),
        **result.metrics(),
    }
    if prior_masks:
        metrics["prior_fidelity_pooled_cosine_calib"] = prior_fidelity
        metrics["groups_changed_vs_prior"] = round(changed / max(groups, 1), 6)
    return out, metrics


__all__ = ["NMLearnedConfig", "MaskedLinear", "candidate_masks", "init_logits", "learn_nm_masks"]
