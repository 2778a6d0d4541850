"""transformers ViTMAE, ViT, VideoMAE, BEiT and data2vec-vision -> the canonical encoder.

References:
- MAE: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022; github.com/facebookresearch/mae
- BEiT: Bao et al., "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022; github.com/microsoft/unilm
- VideoMAE: Tong et al., NeurIPS 2022; github.com/MCG-NJU/VideoMAE
- data2vec: Baevski et al., ICML 2022; github.com/facebookresearch/fairseq
- Source code converted from: github.com/huggingface/transformers (models/vit_mae, vit, videomae, beit, data2vec)

Conversion reads the *loaded* modules, never raw checkpoint key names: transformers 5.x renamed
modules (ViT/ViTMAE/BEiT attention became ``q_proj/k_proj/v_proj/o_proj``, ``encoder.layer`` became
``layers``) while VideoMAE and data2vec-vision kept the 4.x names. Each canonical piece is looked up
through a short list of candidate module paths, newest naming first, so both layouts convert.

What is dropped, on purpose: MAE/VideoMAE decoders and random masking (the deployed encoder sees
every patch, in order), classification heads, BEiT's masked-image-modeling head, and ViT's
``pooler`` (a dense + tanh layer trained only for classification; the canonical ``pooled`` of a ViT
is the normalised cls token, which is what the pooler reads).

This module converts a model already in memory; loading one from a directory or the hub is
:mod:`mimc.models.convert.hf_load`, which imports this module and never the reverse.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mimc.errors import NotAModelError
from mimc.models.vit import Encoder, EncoderConfig
from mimc.models.convert.common import IMAGENET_STANDARD, encoder_with_weights

# transformers model_type -> mimc family
FAMILIES = {"vit_mae": "mae", "vit": "vit", "videomae": "videomae", "beit": "beit", "data2vec-vision": "data2vec"}

# Where each canonical piece lives inside one HF layer (candidates, newest naming first).
LAYER_PATHS = {
    "norm1": ("layernorm_before",),
    "norm2": ("layernorm_after",),
    "q": ("attention.q_proj", "attention.attention.query"),
    "k": ("attention.k_proj", "attention.attention.key"),
    "v": ("attention.v_proj", "attention.attention.value"),
    "proj": ("attention.o_proj", "attention.output.dense"),
    "fc1": ("mlp.fc1", "intermediate.dense"),
    "fc2": ("mlp.fc2", "output.dense"),
    "rel_pos": ("relative_position_bias", "attention.attention.relative_position_bias"),
}
# ... and inside the base model.
BASE_PATHS = {
    "layers": ("layers", "encoder.layer"),
    "patch": ("embeddings.patch_embeddings.projection",),
    "final_norm": ("layernorm",),
    "shared_rel_pos": ("shared_position_bias", "encoder.relative_position_bias"),
    "pooler_norm": ("pooler.layernorm",),
}
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _find(root: nn.Module, candidates: tuple[str, ...]) -> Any:
    """The first candidate attribute path that exists (and is not None) under ``root``."""
    for path in candidates:
        obj: Any = root
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def _square(value: Any, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise NotAModelError(f"non-square {what} {tuple(value)} is not supported: mimc's encoder needs square images and patches")
        value = value[0]
    return int(value)


def family_of(model_type: Any, what: str) -> str:
    """The mimc family of a transformers ``model_type``; ``what`` names the model when it has none."""
    if model_type not in FAMILIES:
        raise NotAModelError(f"{what} has transformers model_type '{model_type}', which is not supported: "
                             f"mimc converts {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def _layer_scale(layer: nn.Module, name: str) -> torch.Tensor | None:
    # BEiT stores the float 1.0 (not a Parameter) when layer scale is off; data2vec stores None.
    value = getattr(layer, name, None)
    return value.detach() if isinstance(value, torch.Tensor) else None


def _encoder_config(model: nn.Module, base: nn.Module, family: str, mean, std) -> EncoderConfig:
    hf = model.config
    layers = _find(base, BASE_PATHS["layers"])
    first = layers[0]
    act = ACTIVATIONS.get(hf.hidden_act) if isinstance(hf.hidden_act, str) else None
    if act is None:
        raise NotAModelError(f"activation '{hf.hidden_act}' is not supported: mimc's encoder has {sorted(set(ACTIVATIONS))}")
    heads = hf.num_attention_heads
    q = _find(first, LAYER_PATHS["q"])
    head_dim = q.out_features // heads
    per_block = _find(first, LAYER_PATHS["rel_pos"]) is not None
    shared = _find(base, BASE_PATHS["shared_rel_pos"]) is not None
    if per_block and shared:
        raise NotAModelError("a model with both shared and per-block relative position bias is not supported by mimc's encoder")
    # VideoMAEForVideoClassification keeps the pooled feature's LayerNorm outside the base model. Its
    # eps is torch's default 1e-5 while mimc uses layer_norm_eps for every norm: < 1e-5 relative on
    # unit-scale features, far inside the 1e-4 equivalence gate.
    fc_norm = getattr(model, "fc_norm", None)
    pooler_norm = _find(base, BASE_PATHS["pooler_norm"])
    if family == "vit":
        pooling = "cls"
    elif family in ("beit", "data2vec"):
        pooling = "mean" if getattr(hf, "use_mean_pooling", False) else "cls"
    else:  # MAE, VideoMAE: mean of the patch tokens (VideoMAE has no cls token at all)
        pooling = "mean"
    has_pos = isinstance(getattr(base.embeddings, "position_embeddings", None), torch.Tensor)
    return EncoderConfig(
        image_size=_square(hf.image_size, "image_size"),
        patch_size=_square(hf.patch_size, "patch_size"),
        in_chans=hf.num_channels,
        num_frames=getattr(hf, "num_frames", 1) if family == "videomae" else 1,
        tubelet_size=getattr(hf, "tubelet_size", 1) if family == "videomae" else 1,
        dim=hf.hidden_size,
        depth=len(layers),
        num_heads=heads,
        mlp_dim=_find(first, LAYER_PATHS["fc1"]).out_features,
        qkv_bias=any(_find(first, LAYER_PATHS[n]).bias is not None for n in ("q", "k", "v")),
        norm_eps=float(hf.layer_norm_eps),
        cls_token=family != "videomae",
        pos_embed="learned" if has_pos else "none",
        rel_pos_bias="per_block" if per_block else "shared" if shared else "none",
        layer_scale=_layer_scale(first, "lambda_1") is not None,
        final_norm=isinstance(_find(base, BASE_PATHS["final_norm"]), nn.LayerNorm),
        pooling=pooling,
        pool_norm=pooling == "mean" and (isinstance(pooler_norm, nn.LayerNorm) or isinstance(fc_norm, nn.LayerNorm)),
        act=act,
        head_dim=head_dim if head_dim * heads != hf.hidden_size else None,
        family=family,
        # transformers' image processors for these families default to IMAGENET_STANDARD_MEAN/STD: 0.5 for every channel.
        image_mean=list(mean if mean is not None else IMAGENET_STANDARD[0][:1] * hf.num_channels),
        image_std=list(std if std is not None else IMAGENET_STANDARD[1][:1] * hf.num_channels),
    )


def _copy(state: dict, prefix: str, module: nn.Module) -> None:
    """A Linear's or LayerNorm's weight and bias."""
    state[f"{prefix}.weight"] = module.weight.detach()
    state[f"{prefix}.bias"] = module.bias.detach()


def _convert_layer(state: dict, i: int, layer: nn.Module, cfg: EncoderConfig) -> None:
    p = f"blocks.{i}"
    q, k, v = (_find(layer, LAYER_PATHS[n]) for n in ("q", "k", "v"))
    state[f"{p}.attn.qkv.weight"] = torch.cat([q.weight, k.weight, v.weight]).detach()
    if cfg.qkv_bias:
        # BEiT, data2vec and VideoMAE train q and v biases only; a zero k bias is exactly equivalent.
        biases = [m.bias if m.bias is not None else torch.zeros(m.out_features) for m in (q, k, v)]
        state[f"{p}.attn.qkv.bias"] = torch.cat(biases).detach()
    for name, key in (("attn.proj", "proj"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"), ("norm1", "norm1"), ("norm2", "norm2")):
        _copy(state, f"{p}.{name}", _find(layer, LAYER_PATHS[key]))
    if cfg.layer_scale:
        state[f"{p}.ls1.gamma"] = _layer_scale(layer, "lambda_1")
        state[f"{p}.ls2.gamma"] = _layer_scale(layer, "lambda_2")
    if cfg.rel_pos_bias == "per_block":
        state[f"{p}.attn.rel_pos_bias.table"] = _find(layer, LAYER_PATHS["rel_pos"]).relative_position_bias_table.detach()


def convert_hf_model(model: nn.Module, image_mean=None, image_std=None, copy: bool = True) -> Encoder:
    """An already-loaded transformers model -> a canonical :class:`Encoder` with the same outputs.

    Accepts the bare encoders and their pre-training / classification wrappers; only the encoder
    is taken. ``image_mean``/``image_std`` come from the model's preprocessor config when known.
    ``copy=False`` lets the encoder share the source's weight storage (for a source about to be
    discarded, as in :func:`mimc.models.convert.hf_load.load_hf`); the default keeps the two independent.
    """
    family = family_of(getattr(getattr(model, "config", None), "model_type", None), type(model).__name__)
    base = getattr(model, "base_model", model)
    if not _find(base, BASE_PATHS["layers"]) or _find(base, BASE_PATHS["patch"]) is None:  # None, or no layer at all
        raise NotAModelError(f"{type(model).__name__} has no encoder layers mimc recognises: pass a {family} encoder model")
    cfg = _encoder_config(model, base, family, image_mean, image_std)
    emb = base.embeddings
    state: dict[str, torch.Tensor] = {}
    _copy(state, "patch_embed.proj", _find(base, BASE_PATHS["patch"]))
    if cfg.cls_token:
        state["cls_token"] = emb.cls_token.detach()
    if cfg.pos_embed == "learned":
        # VideoMAE's fixed sinusoidal table is a plain tensor attribute; copying it into the learned
        # slot gives identical numbers (and lets later stages treat every family alike).
        state["pos_embed"] = emb.position_embeddings.detach().reshape(1, cfg.num_tokens, cfg.dim).clone()
    if cfg.rel_pos_bias == "shared":
        state["rel_pos_bias.table"] = _find(base, BASE_PATHS["shared_rel_pos"]).relative_position_bias_table.detach()
    for i, layer in enumerate(_find(base, BASE_PATHS["layers"])):
        _convert_layer(state, i, layer, cfg)
    if cfg.final_norm:
        _copy(state, "norm", _find(base, BASE_PATHS["final_norm"]))
    if cfg.pool_norm:
        pooler_norm = _find(base, BASE_PATHS["pooler_norm"])
        _copy(state, "pool_norm", pooler_norm if isinstance(pooler_norm, nn.LayerNorm) else model.fc_norm)
    # strict: every canonical parameter must come from the source, none invented.
    encoder, _ = encoder_with_weights(cfg, state, copy=copy, strict=True)
    return encoder


__all__ = ["convert_hf_model", "family_of", "FAMILIES"]
