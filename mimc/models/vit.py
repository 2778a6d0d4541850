"""The canonical encoder every source is converted into.

A plain pre-norm vision transformer: patch (or tubelet) embedding, optional cls token, absolute
position embedding and/or relative position bias, blocks with optional layer scale, final norm,
pooling. It sees every patch in order and is deterministic: MAE-style random masking has no place
in a deployed encoder, and token reduction is an explicit, static stage (``token_schedule``).

Attention is written out (matmul, softmax, matmul) rather than through SDPA so both ONNX exporters
produce the same plain graph, quantization sees the two attention MatMuls, and token-reduction
methods can read the attention they need.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mimc.errors import ConfigError, clip
from mimc.models import token_ops
from mimc.models.position import RelativePositionBias
from mimc.models.vit_tokens import BlockTokenReduction, EncoderTokenReduction
from mimc.options import Options, option

POOLINGS = ("cls", "mean")
REL_POS_BIAS = ("none", "per_block", "shared")
POS_EMBEDS = ("learned", "none")
ACTIVATIONS = ("gelu", "gelu_tanh")


@dataclass(frozen=True)
class EncoderConfig(Options):
    """Everything needed to rebuild an encoder's structure (weights live in safetensors)."""

    image_size: int = option(224, ge=1)
    patch_size: int = option(16, ge=1)
    in_chans: int = option(3, ge=1)
    num_frames: int = option(1, ge=1)  # > 1: video input (B, T, C, H, W) cut into tubelets
    tubelet_size: int = option(1, ge=1)
    dim: int = option(768, ge=1)
    depth: int = option(12, ge=0)
    num_heads: int = option(12, ge=1)
    mlp_dim: int = option(3072, ge=1)
    qkv_bias: bool = True
    norm_eps: float = option(1e-6, gt=0)
    cls_token: bool = True
    pos_embed: str = option("learned", choices=POS_EMBEDS)
    rel_pos_bias: str = option("none", choices=REL_POS_BIAS)
    layer_scale: bool = False
    final_norm: bool = True
    pooling: str = option("mean", choices=POOLINGS)  # cls token, or mean of patch tokens (MAE, BEiT, VideoMAE)
    pool_norm: bool = False  # LayerNorm after mean pooling (BEiT / data2vec / VideoMAE fc_norm)
    act: str = option("gelu", choices=ACTIVATIONS)
    # Per-block overrides written by width pruning; None means every block uses the global value.
    block_mlp_dims: list[int] | None = option(None, ge=1)
    block_heads: list[int] | None = option(None, ge=1)
    head_dim: int | None = option(None, ge=1)  # None: dim // num_heads
    # Lineage of structure: original index of every kept block (None: all of 0..depth-1).
    block_ids: list[int] | None = None
    source_depth: int | None = None
    # Static token reduction (written by the tokens stage); None: every block sees every token.
    token_schedule: dict[str, Any] | None = None
    nm_pattern: str | None = None  # "2:4" when every block Linear satisfies the pattern
    family: str = "vit"
    image_mean: list[float] = (0.485, 0.456, 0.406)  # one per input channel (a list once built)
    image_std: list[float] = option((0.229, 0.224, 0.225), gt=0)
    # Preprocessing geometry (from the model's preprocessor_config.json): "shortest" resizes the short
    # side to image_size / crop_pct and centre-crops image_size; "squash" resizes to image_size x
    # image_size (HF ViTImageProcessor without crop). Left out of to_dict() at their defaults.
    resize: str = option("shortest", choices=("shortest", "squash"))
    crop_pct: float = option(1.0, gt=0, le=1)

    def __post_init__(self) -> None:
        try:  # each key's type and range as declared above, then check()
            super().__post_init__()
        except ConfigError as exc:  # a key of the artifact's encoder record, never an option of a command
            raise ConfigError(f"invalid encoder config: {exc}") from None

    def check(self) -> None:  # the rules across keys
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if len(values) != self.in_chans:
                raise ConfigError(f"{name} must hold one number per input channel ({self.in_chans}), "
                                  f"got {clip(values)}")
        checks = [
            (self.image_size % self.patch_size == 0, "image_size must be a multiple of patch_size"),
            (self.num_frames % self.tubelet_size == 0, "num_frames must be a multiple of tubelet_size"),
            (self.pooling != "cls" or self.cls_token, "cls pooling needs a cls token"),
            (self.head_dim is not None or self.dim % self.num_heads == 0, "dim must be divisible by num_heads"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)
        for name in ("block_mlp_dims", "block_heads", "block_ids"):
            value = getattr(self, name)
            if value is not None and len(value) != self.depth:
                raise ConfigError(f"{name} has {len(value)} entries for depth {self.depth}")

    # Derived quantities -------------------------------------------------------------------------
    @property
    def is_video(self) -> bool:
        return self.num_frames > 1

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (T', H', W')."""
        side = self.image_size // self.patch_size
        return (self.num_frames // self.tubelet_size, side, side)

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.cls_token else 0

    @property
    def num_tokens(self) -> int:
        return self.num_patches + self.num_prefix_tokens

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input without the batch dimension."""
        if self.is_video:
            return (self.num_frames, self.in_chans, self.image_size, self.image_size)
        return (self.in_chans, self.image_size, self.image_size)

    def mlp_dim_of(self, i: int) -> int:
        return self.block_mlp_dims[i] if self.block_mlp_dims is not None else self.mlp_dim

    def heads_of(self, i: int) -> int:
        return self.block_heads[i] if self.block_heads is not None else self.num_heads

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.num_heads

    def kept_block_ids(self) -> list[int]:
        return list(self.block_ids) if self.block_ids is not None else list(range(self.depth))

    # Serialization ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for name, default in (("resize", "shortest"), ("crop_pct", 1.0)):  # manifests of the default stay as they were
            if data[name] == default:
                del data[name]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EncoderConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown encoder config keys {unknown}: this artifact was written by a newer mimc; upgrade mimc")
        return cls(**data)

    def replace(self, **changes: Any) -> "EncoderConfig":
        return dataclasses.replace(self, **changes)


class EncoderOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, N, D) after the final norm
    pooled: torch.Tensor  # (B, D)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # input of every block and the final output


class PatchEmbed(nn.Module):
    """Images (B, C, H, W) -> (B, N, D) by a strided conv; video (B, T, C, H, W) by a 3D conv."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.video = cfg.is_video
        if self.video:
            k = (cfg.tubelet_size, cfg.patch_size, cfg.patch_size)
            self.proj = nn.Conv3d(cfg.in_chans, cfg.dim, kernel_size=k, stride=k)
        else:
            self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.video:
            x = x.permute(0, 2, 1, 3, 4)  # (B, T, C, H, W) -> (B, C, T, H, W)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, cfg: EncoderConfig, num_heads: int, per_block_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = cfg.attn_head_dim
        inner = num_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(cfg.dim, 3 * inner, bias=cfg.qkv_bias)
        self.proj = nn.Linear(inner, cfg.dim)
        self.rel_pos_bias = RelativePositionBias(cfg, num_heads) if per_block_bias else None

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, return_keys: bool = False, return_attn: bool = False):
        """The attention output; with ``return_keys``/``return_attn`` also (keys averaged over heads,
        attention probabilities) for token reduction. The default call builds exactly the plain graph."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.rel_pos_bias is not None:
            attn = attn + self.rel_pos_bias()
        if bias is not None:
            attn = attn + bias
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        out = self.proj(out)
        if not (return_keys or return_attn):
            return out
        return out, (k.mean(dim=1) if return_keys else None), (attn if return_attn else None)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.approximate = "tanh" if act == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(BlockTokenReduction, nn.Module):
    """x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); ``forward_tokens`` (vit_tokens) adds the
    block's static token reduction between the two."""

    def __init__(self, cfg: EncoderConfig, index: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg, cfg.heads_of(index), per_block_bias=cfg.rel_pos_bias == "per_block")
        self.ls1 = LayerScale(cfg.dim) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.dim, cfg.mlp_dim_of(index), cfg.act)
        self.ls2 = LayerScale(cfg.dim) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), bias))
        return x + self.ls2(self.mlp(self.norm2(x)))


class Encoder(EncoderTokenReduction, nn.Module):
    """The canonical MIM encoder. ``forward(pixels)`` returns an :class:`EncoderOutput`; the token plan
    and ``drop_patches`` come from :class:`~mimc.models.vit_tokens.EncoderTokenReduction`."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.dim)) if cfg.pos_embed == "learned" else None
        self.rel_pos_bias = RelativePositionBias(cfg, cfg.num_heads) if cfg.rel_pos_bias == "shared" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.final_norm else nn.Identity()
        self.pool_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps) if cfg.pool_norm else nn.Identity()
        self._apply_token_plan(token_ops.build_plan(cfg))

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x

    def pool(self, hidden: torch.Tensor, sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Pooled feature: the cls token, or the (size-weighted) mean of the patch tokens."""
        if self.config.pooling == "cls":
            return hidden[:, 0]
        patches = hidden[:, self.config.num_prefix_tokens :]
        if sizes is None:
            pooled = patches.mean(dim=1)
        else:
            w = sizes[:, self.config.num_prefix_tokens :]
            pooled = (patches * w).sum(dim=1) / w.sum(dim=1)
        return self.pool_norm(pooled)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> EncoderOutput:
        x = self.embed(pixel_values)
        reduces = self.token_plan.reduces
        if reduces:
            x = self.drop_patches(x, pixel_values)
        shared_bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        hidden_states = [x] if output_hidden_states else None
        sizes = None  # patches per token, once tokens were merged or fused
        for block in self.blocks:
            if reduces:
                x, sizes = block.forward_tokens(x, shared_bias, sizes)
            else:
                x = block(x, shared_bias)
            if hidden_states is not None:
                hidden_states.append(x)
        x = self.norm(x)
        return EncoderOutput(x, self.pool(x, sizes), tuple(hidden_states) if hidden_states is not None else None)

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_encoder(cfg: EncoderConfig, seed: int | None = None) -> Encoder:
    """A randomly initialised encoder (truncated-normal linears, as timm and MAE do), drawn from a
    copy of the torch RNG (seeded with ``seed``): the caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        enc = Encoder(cfg)
        for name, p in enc.named_parameters():
            if name.endswith("bias") or "norm" in name or name.endswith("gamma"):
                continue
            if p.dim() >= 2 or name in ("cls_token", "pos_embed"):
                nn.init.trunc_normal_(p, std=0.02)
    return enc.eval()


def blank_encoder(cfg: EncoderConfig) -> Encoder:
    """An Encoder whose weights the caller overwrites: its default init draws from a copy of the
    torch RNG, never from the caller's."""
    with torch.random.fork_rng(devices=[]):
        return Encoder(cfg)


def vit_base_config(**overrides: Any) -> EncoderConfig:
    return vit_config("vit-b/16", **overrides)


# Named ViT sizes (Dosovitskiy et al., ICLR 2021, table 1; ViT-Ti/S from DeiT, Touvron et al. 2021)
# at 224 px, MAE-shaped (mean pooling): the shapes of `random:NAME` models.
VIT_SIZES: dict[str, dict[str, int]] = {
    "vit-ti/16": dict(patch_size=16, dim=192, depth=12, num_heads=3, mlp_dim=768),
    "vit-s/16": dict(patch_size=16, dim=384, depth=12, num_heads=6, mlp_dim=1536),
    "vit-b/16": dict(patch_size=16, dim=768, depth=12, num_heads=12, mlp_dim=3072),
    "vit-l/16": dict(patch_size=16, dim=1024, depth=24, num_heads=16, mlp_dim=4096),
    "vit-h/14": dict(patch_size=14, dim=1280, depth=32, num_heads=16, mlp_dim=5120),
}


def vit_config(name: str, **overrides: Any) -> EncoderConfig:
    """A named ViT size (``vit-b/16``, ``vit-h/14``, ... see :data:`VIT_SIZES`) at 224 px, MAE-shaped."""
    if name not in VIT_SIZES:
        raise ConfigError(f"unknown ViT size '{clip(name, 40)}': choose one of {', '.join(VIT_SIZES)}")
    return EncoderConfig(**{"image_size": 224, **VIT_SIZES[name], "family": "mae", **overrides})


# Multiply-accumulates of one forward pass (linears, attention matmuls, patch embedding), every block
# counted at its own token counts (without a token schedule: all tokens everywhere).
flops_per_image = token_ops.reduced_macs


__all__ = ["EncoderConfig", "EncoderOutput", "Encoder", "Block", "Attention", "Mlp", "PatchEmbed",
           "RelativePositionBias", "build_encoder", "vit_base_config", "vit_config", "VIT_SIZES", "flops_per_image"]
