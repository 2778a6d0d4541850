"""A timm-layout state dict (VisionTransformer, BEiT) -> EncoderConfig + canonical weights.

References are in :mod:`.timm`; timm's ``checkpoint_filter_fn`` is the same idea (one table of foreign
names into one layout), and MAE, DINO and BEiT checkpoints use timm's key names.

The architecture is read off tensor shapes, because a bare checkpoint carries no config:
dim, in_chans and patch size from ``patch_embed.proj.weight``; depth from the block indices;
MLP width per block from ``mlp.fc1``; cls token from ``cls_token``; image size from the position
grid (``pos_embed``, else the size of BEiT's relative-position table). What shapes cannot say comes
from ``hints`` (a sidecar JSON / safetensors metadata, or the timm module itself):

- ``num_heads``: BEiT tables carry it (their second dim); otherwise ``dim // 64`` (every timm/MAE/
  DINO/BEiT ViT-Ti/S/B/L has 64-dim heads) except the known non-64 widths below (ViT-H/g/G: 16 heads).
- ``global_pool`` ("token" or "avg"): an ``fc_norm`` means mean pooling; MAE and BEiT-style weights
  default to mean pooling, everything else (DINO, supervised ViT) to the cls token, as in timm.
- ``family``: BEiT-style from q/v biases, ``gamma_1`` or relative-position tables; MAE from a decoder
  in the checkpoint or from MAE's frozen 2D sin-cos position table; otherwise "vit".
- ``norm_eps``: 1e-6 (timm, MAE, DINO and BEiT all use it).
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch

from mimc.errors import NotAModelError, clip
from mimc.models.vit import Encoder, EncoderConfig
from mimc.models.convert.common import IMAGENET_DEFAULT, IMAGENET_STANDARD, encoder_with_weights

# Widths whose heads are not 64-dim: ViT-H/14 (1280), ViT-g/14 (1408), ViT-G/14 (1664) all use 16 heads.
HEADS_BY_DIM = {1280: 16, 1408: 16, 1664: 16}

# timm name (regex over the key without the block prefix) -> canonical name. Block keys first.
BLOCK_KEYS = {
    r"(norm[12]|attn\.qkv|attn\.proj|mlp\.fc[12])\.(weight|bias)": r"\1.\2",
    r"(?:ls1\.gamma|gamma_1)": "ls1.gamma",
    r"(?:ls2\.gamma|gamma_2)": "ls2.gamma",
    r"attn\.relative_position_bias_table": "attn.rel_pos_bias.table",
}
TOP_KEYS = {
    r"(cls_token|pos_embed)": r"\1",
    r"(patch_embed\.proj|norm)\.(weight|bias)": r"\1.\2",
    r"fc_norm\.(weight|bias)": r"pool_norm.\1",
    r"rel_pos_bias\.relative_position_bias_table": "rel_pos_bias.table",
}
# Consumed separately (BEiT's q/v biases are fused into qkv below) or rebuilt (index buffers).
FUSED = re.compile(r"^blocks\.\d+\.attn\.(q_bias|v_bias|k_bias|relative_position_index)$|^(rel_pos_bias\.)?relative_position_index$")
# Not part of the encoder: classifier / distillation / DINO / BEiT-MIM heads, MAE decoder and mask token.
DROPPED = re.compile(r"^(head|head_dist|lm_head|decoder|mask_token|pre_logits)([._]|$)")
BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _canonical_name(key: str) -> str | None:
    m = BLOCK.match(key)
    table, rest, prefix = (BLOCK_KEYS, m.group(2), f"blocks.{m.group(1)}.") if m else (TOP_KEYS, key, "")
    for pattern, target in table.items():
        if re.fullmatch(pattern, rest):
            return prefix + re.sub(pattern, target, rest)
    return None


def _perfect_square(n: int) -> int | None:
    r = math.isqrt(n)
    return r if r > 0 and r * r == n else None


def _grid_side(state: dict[str, torch.Tensor], has_cls: bool) -> tuple[int | None, bool]:
    """(patches per side, pos_embed has a cls row) from the position embedding or BEiT's bias table."""
    pos = state.get("pos_embed")
    if pos is not None:
        length = pos.shape[-2]
        if has_cls and (side := _perfect_square(length - 1)):
            return side, True
        if side := _perfect_square(length):  # timm's no_embed_class: the cls token gets no position
            return side, False
        raise NotAModelError(f"pos_embed has {length} positions, which is no square patch grid: mimc needs square images")
    tables = [v for k, v in state.items() if k.endswith("relative_position_bias_table")]
    if tables:
        side = _perfect_square(tables[0].shape[0] - 3)  # (2h-1)^2 offsets + 3 cls entries
        if side and side % 2 == 1:
            return (side + 1) // 2, False
    return None, False


def mae_sincos_table(dim: int, side: int) -> torch.Tensor:
    """MAE's fixed 2D sin-cos position table (patch rows only): [sin w, cos w, sin h, cos h]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    h, w = torch.meshgrid(torch.arange(side, dtype=torch.float64), torch.arange(side, dtype=torch.float64), indexing="ij")

    def embed(coord: torch.Tensor) -> torch.Tensor:
        angles = coord.flatten()[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(w), embed(h)], dim=1).float()


def _has_mae_positions(state: dict[str, torch.Tensor], side: int) -> bool:
    """MAE (and its descendants) freeze this exact table; learned tables (DINO, DeiT) never match it,
    so it identifies MAE weights even in encoder-only checkpoints without a decoder."""
    pos = state.get("pos_embed")
    if pos is None or pos.shape[-1] % 4:
        return False
    patches = pos.reshape(-1, pos.shape[-1])[-side * side :].float()
    return torch.allclose(patches, mae_sincos_table(pos.shape[-1], side), atol=1e-4)


def _number(hints: dict[str, Any], key: str, kind: type) -> Any:
    """A numeric hint as ``kind``; a hint that is no number (``"four"``, a list) is refused by name."""
    try:
        return kind(hints[key])
    except (TypeError, ValueError):
        raise NotAModelError(f"hint {key} {clip(hints[key])} is not a number: fix it in the sidecar JSON or the safetensors metadata") from None


def infer_config(state: dict[str, torch.Tensor], hints: dict[str, Any]) -> tuple[EncoderConfig, bool]:
    """EncoderConfig from shapes (+ hints), and whether pos_embed needs a zero row for the cls token."""
    patch = state["patch_embed.proj.weight"]
    if patch.dim() != 4 or patch.shape[-1] != patch.shape[-2]:
        raise NotAModelError(f"patch_embed.proj.weight has shape {tuple(patch.shape)}: mimc reads square 2D patch embeddings from timm checkpoints (video loads through transformers)")
    dim, in_chans, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
    block_ids = sorted({int(m.group(1)) for k in state if (m := BLOCK.match(k))})
    if block_ids != list(range(len(block_ids))):
        raise NotAModelError(f"checkpoint blocks are not numbered 0..N-1 (found {block_ids[:6]}...): the file is incomplete")
    depth = len(block_ids)
    mlp_dims = [state[f"blocks.{i}.mlp.fc1.weight"].shape[0] for i in range(depth)]
    per_block_table = "blocks.0.attn.relative_position_bias_table" in state
    shared_table = "rel_pos_bias.relative_position_bias_table" in state
    beit_style = per_block_table or shared_table or "blocks.0.gamma_1" in state or "blocks.0.attn.q_bias" in state
    if hints.get("num_heads"):
        heads = _number(hints, "num_heads", int)
    elif per_block_table or shared_table:
        key = "blocks.0.attn.relative_position_bias_table" if per_block_table else "rel_pos_bias.relative_position_bias_table"
        heads = state[key].shape[1]
    else:
        heads = HEADS_BY_DIM.get(dim, max(1, dim // 64))
    inner = state["blocks.0.attn.qkv.weight"].shape[0] // 3 if depth else dim
    if inner % heads:
        raise NotAModelError(f"attention width {inner} is not divisible by {heads} heads: give num_heads in a sidecar JSON next to the checkpoint")
    has_cls = "cls_token" in state
    side, cls_row = _grid_side(state, has_cls)
    if side is None:
        side = _number(hints, "image_size", int) // patch_size if hints.get("image_size") else None
    if side is None:
        raise NotAModelError("cannot infer the image size (no pos_embed or relative-position table): give image_size in a sidecar JSON next to the checkpoint")
    mae_style = hints.get("has_decoder") or _has_mae_positions(state, side)
    family = hints.get("family") or ("beit" if beit_style else "mae" if mae_style else "vit")
    has_fc_norm = "fc_norm.weight" in state
    pool = hints.get("global_pool")
    if has_fc_norm or pool == "avg" or not has_cls:
        pooling = "mean"
    elif pool == "token":
        pooling = "cls"
    else:
        pooling = "mean" if family in ("mae", "beit") else "cls"
    mean, std = IMAGENET_STANDARD if family == "beit" else IMAGENET_DEFAULT
    cfg = EncoderConfig(
        image_size=side * patch_size,
        patch_size=patch_size,
        in_chans=in_chans,
        dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_dim=mlp_dims[0] if mlp_dims else 4 * dim,
        block_mlp_dims=mlp_dims if len(set(mlp_dims)) > 1 else None,
        qkv_bias="blocks.0.attn.qkv.bias" in state or "blocks.0.attn.q_bias" in state,
        norm_eps=_number({"norm_eps": 1e-6, **hints}, "norm_eps", float),
        cls_token=has_cls,
        pos_embed="learned" if "pos_embed" in state else "none",
        rel_pos_bias="per_block" if per_block_table else "shared" if shared_table else "none",
        layer_scale="blocks.0.gamma_1" in state or "blocks.0.ls1.gamma" in state,
        final_norm="norm.weight" in state,
        pooling=pooling,
        pool_norm=has_fc_norm and pooling == "mean",
        act=hints.get("act", "gelu"),
        head_dim=inner // heads if inner != dim else None,
        family=family,
        image_mean=list(hints.get("mean") or mean),
        image_std=list(hints.get("std") or std),
    )
    return cfg, has_cls and "pos_embed" in state and not cls_row


def canonical_state(state: dict[str, torch.Tensor], cfg: EncoderConfig, pad_cls_pos: bool) -> dict[str, torch.Tensor]:
    """Rename timm keys, fuse BEiT's q/v biases into qkv, give the cls token a zero position if needed."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if FUSED.match(key) or DROPPED.match(key):
            continue
        name = _canonical_name(key)
        if name is None:
            unknown.append(key)
        else:
            out[name] = value.float()
    if unknown:
        raise NotAModelError(f"unsupported timm variant: {len(unknown)} weights have no place in mimc's encoder (e.g. {unknown[0]})")
    for i in range(cfg.depth):
        q_bias = state.get(f"blocks.{i}.attn.q_bias")
        if q_bias is not None:
            # BEiT trains q and v biases only; timm fuses them as cat(q, zeros, v) at run time.
            v_bias = state[f"blocks.{i}.attn.v_bias"]
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]).float()
    if pad_cls_pos:
        pos = out["pos_embed"]
        out["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    if "pos_embed" in out:
        out["pos_embed"] = out["pos_embed"].reshape(1, cfg.num_tokens, cfg.dim)
    return out


def encoder_from_state(state: dict[str, torch.Tensor], hints: dict[str, Any], copy: bool = True) -> Encoder:
    """A timm-layout state dict (prefix already stripped) -> canonical :class:`Encoder`.

    ``copy=False`` adopts the tensors as parameters (for a state dict just read from a file)."""
    cfg, pad_cls_pos = infer_config(state, hints)
    weights = canonical_state(state, cfg, pad_cls_pos)
    try:
        encoder, result = encoder_with_weights(cfg, weights, copy=copy, strict=False)
    except RuntimeError as exc:  # a shape that contradicts the inferred architecture
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), "shape mismatch")
        raise NotAModelError(f"checkpoint does not fit the inferred architecture ({detail}): give num_heads/image_size in a sidecar JSON") from None
    if result.missing_keys or result.unexpected_keys:
        bad = (result.missing_keys or result.unexpected_keys)[0]
        what = "lacks" if result.missing_keys else "has an unexpected"
        raise NotAModelError(f"checkpoint {what} weight '{bad}' for the inferred architecture: the file is incomplete or of an unsupported variant")
    return encoder.eval()
