"""Learned N:M masks (MaskLLM): a categorical choice among the C(M, N) masks of every weight group.

Each group of M consecutive input weights of every block Linear gets logits π over the C(M, N)
candidate masks (``itertools.combinations``; 6 for 2:4). Training draws a soft mask per step:
p = softmax((κ·π + g)/τ), g Gumbel noise, m = pᵀS (S the candidates; ``hard=False``, soft trains
better) and runs the encoder with W⊙m. The weights are frozen (buffers); only π learns, by
distillation from the dense encoder (:func:`mimc.train.train`) minus λ·Σ‖W⊙m‖², which rewards keeping large
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

import itertools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mimc.artifact import state_hash
from mimc.compression.nm_oneshot import one_shot_sparsify
from mimc.compression.registry import StageConfig, clone_encoder
from mimc.errors import ConfigError
from mimc.models.nm_pattern import block_linears, check_nm
from mimc.options import option
from mimc.train import TrainConfig, TrainRun, as_indexed, fingerprint, first_batches, train
from mimc.train.schedule import linear

PRIORS = ("sparsegpt", "wanda", "magnitude", "none")


@dataclass(frozen=True)
class NMLearnedConfig(TrainConfig, StageConfig):
    """MaskLLM's options (the ``learned`` field of the sparsify stage): the shared optimiser options
    with MaskLLM's defaults, plus its temperatures, regulariser and prior."""

    name: ClassVar[str] = "sparsify.learned"
    key_order: ClassVar[tuple[str, ...]] = (
        "steps", "lr", "min_lr", "warmup_steps", "weight_decay", "batch_size", "clip_grad", "tau_start", "tau_end",
        "kappa_start", "kappa_end", "reg_lambda", "prior", "prior_strength", "sigma0", "mask_ratio", "flip", "seed",
    )  # fmt: skip

    # The shared options whose defaults differ for MaskLLM (the rest: TrainConfig's defaults).
    steps: int = option(300, ge=1, doc="optimizer steps")
    lr: float = option(1e-2, gt=0, doc="peak learning rate")
    min_lr: float = option(1e-3, ge=0, doc="learning rate at the end of the cosine decay")
    # MaskLLM's own options.
    warmup_steps: int = 0
    tau_start: float = option(4.0, gt=0, doc="Gumbel-softmax temperature at the first step")
    tau_end: float = option(0.05, gt=0, doc="Gumbel-softmax temperature at the last step")
    kappa_start: float = option(10.0, gt=0, doc="logit scale at the first step")
    kappa_end: float = option(100.0, gt=0, doc="logit scale at the last step")
    reg_lambda: float = 1e-5
    prior: str = option("sparsegpt", choices=PRIORS, doc="one-shot mask the logits start from")
    prior_strength: float = 3.0  # α: the prior's mask starts α·σ above the mean
    sigma0: float = option(0.2, gt=0, doc="spread of the initial logits")

    @property
    def warmup(self) -> int:
        return self.warmup_steps


def candidate_masks(n: int, m: int) -> torch.Tensor:
    """(C(m, n), m) 0/1 rows: every way to keep n of m."""
    rows = [[1.0 if j in keep else 0.0 for j in range(m)] for keep in itertools.combinations(range(m), n)]
    return torch.tensor(rows)


class MaskedLinear(nn.Module):
    """A frozen Linear whose weight is multiplied by a learned N:M mask."""

    def __init__(self, linear: nn.Linear, n: int, m: int, logits: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
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


def masked_layers(model: nn.Module) -> list[MaskedLinear]:
    """The learned-mask layers of ``model``, in block order (the order their noise is drawn in)."""
    return [m for m in model.modules() if isinstance(m, MaskedLinear)]


def anneal_and_draw_noise(layers: list[MaskedLinear], cfg: NMLearnedConfig, step: int, generator: torch.Generator) -> None:
    """Set τ and κ of ``step`` and draw every layer's Gumbel noise from the step's generator."""
    tau = linear(step, cfg.steps, cfg.tau_start, cfg.tau_end)
    kappa = linear(step, cfg.steps, cfg.kappa_start, cfg.kappa_end)
    for layer in layers:
        layer.tau, layer.kappa = tau, kappa
        u = torch.rand(layer.logits.shape, generator=generator).clamp_(1e-10, 1.0 - 1e-7)
        layer.noise = (-torch.log(-torch.log(u))).to(layer.logits.device)


def keep_large_weights_penalty(layers: list[MaskedLinear], reg_lambda: float) -> torch.Tensor | None:
    """−λ·Σ‖W⊙m‖² over the masks of the last forward: lower when the masks keep large weights."""
    if not reg_lambda:
        return None
    total = sum(((layer.weight * layer.last_mask) ** 2).sum() for layer in layers)
    return -reg_lambda * total


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def learn_nm_masks(encoder, config, calibration_batches, run: TrainRun | None = None) -> tuple[Any, dict[str, Any]]:
    """The ``learned`` method of the sparsify stage (``config`` is an NMSparsityConfig)."""
    from mimc.evaluation import fidelity

    n, m = config.nm
    lc: NMLearnedConfig = config.learned
    images = as_indexed(calibration_batches)
    if not len(images):
        raise ConfigError("learned N:M needs training images: give data (a folder, .npz/.npy or 'builtin')", option="data")
    lc = lc.for_images(len(images))  # steps from epochs: the temperatures anneal over the steps that run
    calib = first_batches(images, config.n_calib, config.calib_batch_size)

    prior_masks: dict[str, torch.Tensor] = {}
    prior_fidelity = None
    if lc.prior != "none":
        prior_model = clone_encoder(encoder).eval()
        prior_masks = one_shot_sparsify(prior_model, n, m, lc.prior, calib, update_weights=False, damp=config.damp, blocksize=config.blocksize,
                                        weighting=config.weighting, r_min=config.r_min)
        prior_fidelity = fidelity(prior_model, encoder, calib).to_dict() if calib else None

    student = clone_encoder(encoder).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(lc.seed)
    layers: list[MaskedLinear] = []
    for name, lin in block_linears(student):
        logits = init_logits(prior_masks.get(name), lin.out_features, lin.in_features, n, m, lc, generator)
        layer = MaskedLinear(lin, n, m, logits)
        _set_module(student, name, layer)
        layers.append(layer)

    meta = {"stage": config.to_dict(), "source_sha256": state_hash(encoder), "data_sha256": fingerprint(images)}
    # The hooks act on the student being trained: ``student`` itself, or its sharded copy under FSDP.
    result = train(student, clone_encoder(encoder), images, lc, run, meta=meta,
                   prepare_step=lambda model, step, gen: anneal_and_draw_noise(masked_layers(model), lc, step, gen),
                   penalty=lambda model: keep_large_weights_penalty(masked_layers(model), lc.reg_lambda))

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
    eval_pixels = first_batches(images, 256, 32)
    metrics: dict[str, Any] = {
        "pattern": config.pattern,
        "method": "learned",
        "prior": lc.prior,
        "density": round(sum(density) / len(density), 6),
        "fidelity_data": fidelity(out, encoder, eval_pixels).to_dict(),
        "n_train_images": len(images),
        **result.metrics(),
    }
    if prior_masks:
        metrics["prior_fidelity_calib"] = prior_fidelity
        metrics["groups_changed_vs_prior"] = round(changed / max(groups, 1), 6)
    return out, metrics


__all__ = ["NMLearnedConfig", "MaskedLinear", "candidate_masks", "init_logits", "anneal_and_draw_noise", "masked_layers",
           "keep_large_weights_penalty", "learn_nm_masks"]
