"""timm VisionTransformer checkpoints (MAE, BEiT-style and DINO weights) -> the canonical encoder.

References:
- timm: Wightman, github.com/huggingface/pytorch-image-models (models/vision_transformer.py, beit.py)
- MAE: He et al., CVPR 2022, github.com/facebookresearch/mae
- DINO: Caron et al., ICCV 2021, github.com/facebookresearch/dino
- BEiT: Bao et al., ICLR 2022, github.com/microsoft/unilm/tree/master/beit

Safety: ``.pth/.pt/.bin`` files are pickles, and unpickling can run arbitrary code. They are read only
through ``torch.load(path, map_location="cpu", weights_only=True)``, which refuses any object that is
not a tensor or plain container; a refusal becomes :class:`UnsafeCheckpointError`. ``.safetensors``
holds raw tensors only. Checkpoints are read, never written.

Shape inference (and what a sidecar can override) is documented in :mod:`.timm_state`. Hints come,
in increasing priority, from: a timm hub ``config.json`` beside the file (``pretrained_cfg``,
``model_args``, ``architecture``), a ``<checkpoint stem>.json`` beside the file, the safetensors
header metadata, and keyword arguments. Keys: ``num_heads``, ``image_size``, ``global_pool``
(token|avg), ``family``, ``norm_eps``, ``mean``, ``std``.
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimc.errors import NotAModelError
from mimc.models.vit import Encoder
from mimc.models.convert.common import one_line, refuse_code_pickle
from mimc.models.convert.timm_state import encoder_from_state

ANCHOR = "patch_embed.proj.weight"
# Nested dicts that hold the weights in training checkpoints, in order of preference
# (DINO saves student and teacher; the teacher is the one evaluated and released).
WRAPPERS = ("model", "state_dict", "teacher", "model_ema", "module", "student")
HINT_KEYS = ("num_heads", "image_size", "global_pool", "family", "norm_eps", "mean", "std")


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """(loaded object, safetensors metadata) without ever executing pickled code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                metadata = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, metadata
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise NotAModelError(f"{path} is not a valid .safetensors file ({one_line(exc)}): re-download or re-export it") from None
    try:
        # argparse.Namespace is allowlisted: MAE/DeiT/BEiT training checkpoints store their ``args``
        # as one; rebuilding it only sets attributes and runs no code.
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's pickle-protocol notice; failures are reported below
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for unreadable files
        refuse_code_pickle(path)
        raise NotAModelError(f"{path} is not a readable PyTorch checkpoint ({one_line(exc)}): re-download it or export .safetensors") from None
    if not isinstance(obj, dict):
        raise NotAModelError(f"{path} holds a {type(obj).__name__}, not a state dict: save model.state_dict() instead")
    return obj, {}


def _has_anchor(d: dict) -> bool:
    return any(isinstance(k, str) and (k == ANCHOR or k.endswith("." + ANCHOR)) for k in d)


def unwrap_state_dict(obj: dict[str, Any]) -> tuple[dict[str, torch.Tensor], bool]:
    """Find the encoder weights in a checkpoint: unwrap training dicts, strip ``module.``/``backbone.``
    style prefixes, keep only tensors under the encoder's prefix. Also says whether an MAE decoder is there."""
    candidates = [obj] + [obj[k] for k in WRAPPERS if isinstance(obj.get(k), dict)]
    candidates += [v for v in obj.values() if isinstance(v, dict) and all(v is not c for c in candidates)]
    found = next((c for c in candidates if _has_anchor(c)), None)
    if found is None:
        hint = " (it looks like a transformers checkpoint: point at its directory with config.json)" if any(
            isinstance(k, str) and ("embeddings.patch_embeddings" in k) for k in obj
        ) else ""
        raise NotAModelError(f"no timm ViT weights found (no '{ANCHOR}'){hint}: give a timm/MAE/DINO/BEiT ViT checkpoint")
    prefix = min((k[: -len(ANCHOR)] for k in found if isinstance(k, str) and k.endswith(ANCHOR)), key=len)
    state = {k[len(prefix) :]: v for k, v in found.items() if isinstance(k, str) and k.startswith(prefix) and isinstance(v, torch.Tensor)}
    return state, any(k.startswith(("decoder", "mask_token")) for k in state)


def _parse(value: str) -> Any:
    """A safetensors metadata value (always a string): its JSON value, or the string itself."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _hints_from_timm_config(data: dict[str, Any]) -> dict[str, Any]:
    hints: dict[str, Any] = {}
    arch = str(data.get("architecture", "")).lower()
    if "mae" in arch:
        hints["family"] = "mae"
    elif "beit" in arch:
        hints["family"] = "beit"
    pretrained = data.get("pretrained_cfg") or {}
    for key in ("mean", "std"):
        if key in pretrained:
            hints[key] = [float(x) for x in pretrained[key]]
    args = dict(data.get("model_args") or {})
    if "img_size" in args:
        args["image_size"] = args.pop("img_size")
    hints.update({k: args[k] for k in HINT_KEYS if k in args})
    hints.update({k: data[k] for k in HINT_KEYS if k in data})
    return hints


def read_hints(path: str | os.PathLike, metadata: dict[str, str] | None = None, **overrides: Any) -> dict[str, Any]:
    """What shapes cannot tell (heads, pooling, normalisation), from sidecars, metadata and overrides."""
    path = Path(path)
    hints: dict[str, Any] = {}
    for sidecar in (path.parent / "config.json", path.with_suffix(".json")):
        if sidecar.is_file():
            try:
                data = json.loads(sidecar.read_text())
            except (OSError, ValueError) as exc:
                raise NotAModelError(f"sidecar {sidecar} is not valid JSON ({one_line(exc)}): fix or remove it") from None
            if not isinstance(data, dict) or "model_type" in data:  # a transformers config is not a hint file
                continue
            # A directory's config.json counts only when it is timm's (an unrelated training config
            # with "num_heads" must not steer this file); <stem>.json is explicitly this file's sidecar.
            if sidecar.name == "config.json" and not {"architecture", "pretrained_cfg", "model_args"} & set(data):
                continue
            hints.update(_hints_from_timm_config(data))
    hints.update({k: _parse(v) for k, v in (metadata or {}).items() if k in HINT_KEYS})
    hints.update({k: v for k, v in overrides.items() if v is not None})
    return hints


def load_timm_checkpoint(path: str | os.PathLike, num_heads: int | None = None, image_size: int | None = None) -> Encoder:
    """A timm-layout checkpoint file (.safetensors, or .pth/.pt/.bin read weights-only) -> Encoder."""
    path = Path(path)
    if not path.is_file():
        raise NotAModelError(f"{path} is not a file: give a .safetensors/.pth checkpoint")
    obj, metadata = read_checkpoint(path)
    state, has_decoder = unwrap_state_dict(obj)
    hints = read_hints(path, metadata, num_heads=num_heads, image_size=image_size)
    hints.setdefault("has_decoder", has_decoder)  # MAE pre-training checkpoints keep the decoder
    return encoder_from_state(state, hints, copy=False)  # the tensors were just read: adopt them


def convert_timm_model(model: nn.Module) -> Encoder:
    """A timm VisionTransformer / Beit module -> Encoder; architecture details read off the module."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "patch_embed"):
        raise NotAModelError(f"{type(model).__name__} is not a timm VisionTransformer or Beit")
    act = getattr(blocks[0].mlp, "act", None) if len(blocks) else nn.GELU()
    if not isinstance(act, nn.GELU):
        raise NotAModelError(f"timm MLP activation {type(act).__name__} is not supported: mimc's encoder uses GELU")
    pool = getattr(model, "global_pool", None)
    img_size = getattr(model.patch_embed, "img_size", None)
    hints: dict[str, Any] = {
        "num_heads": blocks[0].attn.num_heads if len(blocks) else None,
        "global_pool": pool if pool in ("token", "avg") else None,
        "norm_eps": blocks[0].norm1.eps if len(blocks) else 1e-6,
        "act": "gelu_tanh" if act.approximate == "tanh" else "gelu",
        "image_size": img_size[0] if isinstance(img_size, (tuple, list)) else img_size,
        "family": "beit" if type(model).__name__ == "Beit" else "vit",
    }
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "mean" in cfg and "std" in cfg:
        hints["mean"], hints["std"] = [float(x) for x in cfg["mean"]], [float(x) for x in cfg["std"]]
    state = {k: v.detach() for k, v in model.state_dict().items()}
    return encoder_from_state(state, {k: v for k, v in hints.items() if v is not None})


__all__ = ["load_timm_checkpoint", "convert_timm_model", "read_checkpoint", "unwrap_state_dict", "read_hints"]
