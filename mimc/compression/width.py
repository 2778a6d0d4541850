"""Width pruning: remove attention heads and MLP hidden neurons from every block (structured, exact).

With ``macs`` (a ratio of the dense MACs) the widths are allocated per block instead, globally
under that budget (:mod:`mimc.compression.optin`; any criterion, including OPTIN's trajectory
score ``optin``). Otherwise every block keeps the same fraction: ``mlp`` of its hidden neurons
and ``heads`` of its attention heads are removed, chosen per block by importance. Either way the
result is a plain narrower ViT whose per-block widths are written to
``EncoderConfig.block_mlp_dims`` / ``block_heads``. It exports and
quantizes like any encoder (ORT's QAttention takes the per-block head count from the graph).

Importance (per block, per unit):
- ``l2`` (data-free): neuron j: ||fc1 row j|| * ||fc2 column j||; head h: ||W_v rows of h|| *
  ||proj columns of h|| (the value path, which is what reaches the residual stream).
- ``activation`` (calibration images, Wanda-style output contribution): neuron j: mean |GELU
  output j| * ||fc2 column j||; head h: mean ||head h's attention output|| * ||proj columns of h||.

MLP widths are rounded to multiples of ``round_to`` (GEMM kernels on CPU and tensor cores run
whole tiles; 16 suits both), never below one tile.

Why written here rather than with torch-pruning (which does handle ViT heads): the coupled
dimensions of this fixed block are known exactly (fc1 rows + bias with fc2 columns; per head, the q,
k and v rows + biases with proj columns and the per-block relative position bias table column), so
slicing them is a few lines, needs no tracing of the forward (whose token-reduction path differs per
configuration), keeps the config and the weights consistent by construction, and is deterministic.
torch-pruning stays the peer a benchmark can compare with.

References:
- Michel et al., "Are Sixteen Heads Really Better than One?", NeurIPS 2019 (head importance).
- Sun et al., "A Simple and Effective Pruning Approach for LLMs" (Wanda), ICLR 2024 (|activation| x
  |weight| importance).
- Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023; code:
  https://github.com/VainF/Torch-Pruning (the library alternative).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, ClassVar

import torch

from mimc.errors import ConfigError
from mimc.models.vit import Encoder, build_encoder
from mimc.compression.calib_stats import calibration_pixels
from mimc.compression.optin import TRAJECTORIES, allocate, optin_scores, ranked
from mimc.compression.registry import StageConfig, register, shrink_metrics
from mimc.options import option

CRITERIA = ("l2", "activation", "optin")


@dataclasses.dataclass(frozen=True)
class WidthPruningConfig(StageConfig):
    """Fractions removed per block: ``mlp`` of the MLP hidden neurons, ``heads`` of the heads; or, with
    ``macs``, a global per-block allocation of heads and neurons keeping that ratio of the dense MACs
    (:mod:`mimc.compression.optin`). ``optin_*``: the OPTIN criterion's images and pooled-term ratio λ."""

    name: ClassVar[str] = "width"

    mlp: float = option(0.0, ge=0, lt=1, doc="fraction of each block's MLP neurons removed")
    heads: float = option(0.0, ge=0, lt=1, doc="fraction of each block's attention heads removed")
    criterion: str = option("l2", choices=CRITERIA)
    round_to: int = option(16, ge=1, doc="MLP widths are kept a multiple of this")
    max_batches: int = option(8, ge=1)
    macs: float | None = option(None, gt=0, lt=1, doc="ratio of MACs kept, allocated per block (global); replaces mlp/heads")
    optin_images: int = option(32, ge=2, doc="optin: images the trajectory scores are computed on")
    optin_lambda: float = option(10.0, ge=0, doc="optin: how far the pooled-feature term sits below the token term (lambda)")
    optin_trajectory: str = option("sum", choices=TRAJECTORIES,
                                   doc="optin: sum the loss over every later block (the paper) or the last block's only")

    def check(self) -> None:
        if self.macs is not None and (self.mlp or self.heads):
            raise ConfigError("macs allocates heads and neurons per block itself: drop mlp / heads", option=("macs", "mlp", "heads"))
        if self.mlp == 0 and self.heads == 0 and self.macs is None:
            raise ConfigError("width pruning removes nothing: give mlp and/or heads above 0, e.g. mlp 0.5", option=("mlp", "heads"))

    @property
    def needs_data(self) -> bool:
        return self.criterion in ("activation", "optin")

    def kept_mlp(self, width: int) -> int:
        keep = width * (1.0 - self.mlp)
        tile = min(self.round_to, width)
        return width if self.mlp == 0 else max(tile, min(width, int(round(keep / tile)) * tile))

    def kept_heads(self, heads: int) -> int:
        return heads if self.heads == 0 else max(1, int(round(heads * (1.0 - self.heads))))


def _scores(encoder: Encoder, config: WidthPruningConfig, batches: list[torch.Tensor] | None):
    """Per block: (neuron importance (mlp_dim,), head importance (heads,))."""
    if config.criterion == "optin":  # OPTIN's one calibration batch, streamed as given
        return optin_scores(encoder, calibration_pixels(batches, config.optin_images), config.optin_lambda,
                            trajectory=config.optin_trajectory)
    acts = _activation_stats(encoder, batches[: config.max_batches]) if config.criterion == "activation" else None
    out = []
    for i, block in enumerate(encoder.blocks):
        attn, mlp = block.attn, block.mlp
        fc2_cols = mlp.fc2.weight.detach().float().norm(dim=0)
        neuron = (acts[i][0] if acts else mlp.fc1.weight.detach().float().norm(dim=1)) * fc2_cols
        hd, heads = attn.head_dim, attn.num_heads
        inner = heads * hd
        proj = attn.proj.weight.detach().float().reshape(-1, heads, hd)
        proj_norm = proj.pow(2).sum(dim=(0, 2)).sqrt()
        if acts:
            head = acts[i][1] * proj_norm
        else:
            v = attn.qkv.weight.detach().float()[2 * inner : 3 * inner].reshape(heads, hd, -1)
            head = v.pow(2).sum(dim=(1, 2)).sqrt() * proj_norm
        out.append((neuron, head))
    return out


@torch.no_grad()
def _activation_stats(encoder: Encoder, batches: list[torch.Tensor]):
    """Mean |GELU output| per neuron and mean L2 norm of each head's attention output, per block."""
    if not batches:
        raise ConfigError("criterion 'activation' needs calibration images: give data, or use criterion l2", option=("criterion", "data"))
    sums = [[0, 0, 0] for _ in encoder.blocks]  # |GELU output| per neuron, head output norm per head, tokens
    with contextlib.ExitStack() as hooks:
        for i, block in enumerate(encoder.blocks):
            def on_fc2(mod, inp, out, i=i):
                a = inp[0].detach().float().abs().reshape(-1, inp[0].shape[-1])
                sums[i][0] += a.sum(0)
                sums[i][2] += a.shape[0]

            def on_proj(mod, inp, out, i=i, attn=block.attn):
                sums[i][1] += inp[0].detach().float().reshape(-1, attn.num_heads, attn.head_dim).norm(dim=-1).sum(0)

            hooks.enter_context(block.mlp.fc2.register_forward_hook(on_fc2))
            hooks.enter_context(block.attn.proj.register_forward_hook(on_proj))
        for x in batches:
            encoder(x)
    return [(s[0] / s[2], s[1] / s[2]) for s in sums]


@register(WidthPruningConfig)
def prune_width(encoder: Encoder, config: WidthPruningConfig, calibration_batches=None) -> tuple[Encoder, dict[str, Any]]:
    cfg = encoder.config
    if config.heads and cfg.rel_pos_bias == "shared":
        raise ConfigError("this model shares one relative position bias table across blocks: per-block head pruning would "
                          "need per-block tables; prune the MLP only (heads=0)", option="heads")
    widths = cfg.block_mlp_dims or [cfg.mlp_dim] * cfg.depth
    if config.macs is None and config.mlp and not config.heads and all(config.kept_mlp(w) == w for w in widths):
        raise ConfigError(f"mlp {config.mlp:g} rounded to multiples of round_to {config.round_to} keeps every neuron of the "
                          f"MLP widths {sorted(set(widths))[:4]}: lower round_to or raise mlp", option=("mlp", "round_to"))
    batches = list(calibration_batches) if calibration_batches is not None else None
    scores = _scores(encoder, config, batches)
    if config.macs is not None:  # global allocation under the MAC budget
        keep_neurons, keep_heads = allocate(cfg, scores, config.macs, config.round_to, prune_heads=cfg.rel_pos_bias != "shared",
                                            normalise=config.criterion != "optin")
    else:
        keep_neurons = [sorted(ranked(neuron)[: config.kept_mlp(neuron.numel())]) for neuron, _ in scores]
        keep_heads = [sorted(ranked(head)[: config.kept_heads(head.numel())]) for _, head in scores]
    new_cfg = cfg.replace(block_mlp_dims=[len(k) for k in keep_neurons], block_heads=[len(k) for k in keep_heads],
                          head_dim=cfg.attn_head_dim)
    new = build_encoder(new_cfg)
    state = dict(encoder.state_dict())  # sliced entries are new tensors; load_state_dict copies the rest
    for i, block in enumerate(encoder.blocks):
        p = f"blocks.{i}."
        neurons, heads = torch.tensor(keep_neurons[i]), torch.tensor(keep_heads[i])
        hd, inner = block.attn.head_dim, block.attn.num_heads * block.attn.head_dim
        cols = torch.tensor([h * hd + j for h in keep_heads[i] for j in range(hd)])
        rows = torch.cat([part * inner + cols for part in range(3)])  # the fused qkv: (q heads, k heads, v heads)
        # (entry, dimension sliced, kept indices); the qkv bias and a per-block position bias table are optional
        for key, dim, kept in (("mlp.fc1.weight", 0, neurons), ("mlp.fc1.bias", 0, neurons),
                               ("mlp.fc2.weight", 1, neurons), ("attn.qkv.weight", 0, rows), ("attn.qkv.bias", 0, rows),
                               ("attn.proj.weight", 1, cols), ("attn.rel_pos_bias.table", 1, heads)):
            if p + key in state:
                state[p + key] = state[p + key].index_select(dim, kept)
    new.load_state_dict(state)
    new = new.to(next(encoder.parameters()).dtype).eval()
    metrics: dict[str, Any] = {
        "criterion": config.criterion,
        "mlp_dims": new_cfg.block_mlp_dims, "heads": new_cfg.block_heads,
        "kept_heads": keep_heads, "kept_neurons": keep_neurons,
        **shrink_metrics(encoder, new, batches, macs_target=config.macs),
    }
    if not math.isfinite(metrics["fidelity_deterministic"]["pooled_cosine_mean"]):
        raise ConfigError("width pruning produced non-finite features: the model's weights are not usable")
    return new, metrics


__all__ = ["WidthPruningConfig", "prune_width", "CRITERIA"]
