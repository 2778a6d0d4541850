"""Rebuilding an encoder from an artifact directory (``mimc.json`` + ``model.safetensors``).

It lives with the models rather than in :mod:`mimc.artifact`, which reads and writes the directory
without knowing what an Encoder is.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mimc.artifact import MANIFEST_NAME, read_manifest, verify_weights
from mimc.errors import MimcError, NotAModelError, clip, shorten
from mimc.models.vit import Encoder, EncoderConfig, blank_encoder


class ArtifactShape:
    """An artifact's validated config and manifest without its weights: what a step needs that works on
    a graph already in the artifact (quantizing its model.onnx reads the graph, never the weights)."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        self.path = path
        self.manifest = read_manifest(path)
        where = path / MANIFEST_NAME
        try:
            self.config = EncoderConfig.from_dict(self.manifest.encoder)
        except (MimcError, TypeError, ValueError, KeyError) as exc:
            raise NotAModelError(f"{where}: its encoder config is invalid ({shorten(exc)}): re-create the artifact") from None
        _check_structure(self.config, where)


def load_artifact(path: str | os.PathLike) -> Encoder:
    """Rebuild the encoder from ``mimc.json`` and load ``model.safetensors`` into it, after checking
    the weights are the ones the manifest names and the manifest's structure is consistent."""
    path = Path(path)
    shape = ArtifactShape(path)
    manifest, cfg = shape.manifest, shape.config
    weights = verify_weights(path, manifest)
    _check_shapes(cfg, weights)  # the same names and shapes as the module's, or refused here
    encoder = blank_encoder(cfg)
    own = encoder.state_dict()  # the module's own tensors: every value is read into them in place
    try:
        with safe_open(str(weights), framework="pt") as f, torch.no_grad():
            for name, tensor in _read_into(weights, own):  # stored in another dtype: converted by copy_
                tensor.copy_(f.get_tensor(name))
    except (SafetensorError, OSError, ValueError) as exc:
        raise NotAModelError(f"{weights} is not a valid safetensors file ({shorten(exc)}): re-create the artifact") from exc
    encoder.eval()
    encoder.manifest = manifest
    return encoder


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _read_into(weights: Path, own: dict) -> list:
    """Read each tensor of a safetensors file straight into the module's tensor of that name, with
    plain reads one tensor at a time: the weights are never held twice, and no memory map of the
    file adds its pages to the process's resident set (a ViT-H/14 would count 2.5 GB twice).
    Returns the (name, tensor) pairs whose stored dtype or shape differs (copied by the caller)."""
    left = []
    with open(weights, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        for name, tensor in own.items():
            info = header.get(name) or {}
            begin, end = (info.get("data_offsets") or [0, -1])[:2]
            same = (_SAFETENSORS_DTYPES.get(info.get("dtype")) == str(tensor.dtype).removeprefix("torch.")
                    and list(info.get("shape", [])) == list(tensor.shape) and tensor.is_contiguous()
                    and end - begin == tensor.numel() * tensor.element_size())
            if not same:
                left.append((name, tensor))
                continue
            f.seek(8 + size + begin)
            view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            if f.readinto(view) != end - begin:
                raise ValueError(f"tensor {name} is cut short")
    return left


def _check_shapes(cfg: EncoderConfig, weights: Path) -> None:
    """Compare the tensor shapes the config implies with the file's header before allocating: an
    encoder is built on the meta device (no memory), so a manifest claiming a 10^9-pixel image or
    a wider model than its weights is refused instead of allocating terabytes or half-loading."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError):
        return  # unreadable weights are reported by the load that follows, with its own message
    depth = len({k.split(".")[1] for k in found if k.startswith("blocks.")})
    if cfg.depth != depth:  # before building: even on the meta device, 10^7 blocks would take hours
        raise NotAModelError(f"{weights} does not match its mimc.json (depth {clip(cfg.depth)} by the config, {depth} blocks in the weights): re-create the artifact")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Encoder(cfg).state_dict().items()}
    if expected.keys() != found.keys():
        missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
        raise NotAModelError(f"{weights} does not match its mimc.json (missing {missing[:3]}, unexpected {unexpected[:3]}): re-create the artifact")
    for name, shape in expected.items():
        if found[name] != shape:
            raise NotAModelError(f"{weights} does not match its mimc.json ({name} is {list(found[name])} in the weights, "
                                 f"{list(shape)} by the config): re-create the artifact")


def _check_structure(cfg: EncoderConfig, where: Path) -> None:
    """Lineage that must hold for any artifact mimc wrote: kept blocks are distinct, in order and
    within the source depth."""
    ids = cfg.block_ids
    if ids is None:
        return
    source_depth = cfg.source_depth
    bad = None
    if not all(i >= 0 for i in ids):  # whole numbers, and source_depth one, as EncoderConfig declares them
        bad = "block_ids must be non-negative whole numbers"
    elif any(b <= a for a, b in zip(ids, ids[1:])):
        bad = "block_ids must be increasing without repeats"
    elif source_depth is not None and source_depth < len(ids):
        bad = f"source_depth {clip(source_depth)} is smaller than the {len(ids)} kept blocks"
    elif source_depth is not None and ids and ids[-1] >= source_depth:
        bad = f"block_ids names block {ids[-1]} of {source_depth}"
    if bad:
        raise NotAModelError(f"{where}: {bad}: re-create the artifact")


__all__ = ["load_artifact", "ArtifactShape"]
