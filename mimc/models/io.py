"""Rebuilding an encoder from an artifact directory (``mimc.json`` + ``model.safetensors``).

It lives with the models rather than in :mod:`mimc.artifact`, which reads and writes the directory
without knowing what an Encoder is.
"""
from __future__ import annotations

import os
from pathlib import Path

from mimc.artifact import WEIGHTS_NAME, read_manifest
from mimc.errors import NotAModelError
from mimc.models.vit import Encoder, EncoderConfig


def load_artifact(path: str | os.PathLike) -> Encoder:
    """Rebuild the encoder from ``mimc.json`` and load ``model.safetensors`` into it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    manifest = read_manifest(path)
    cfg = EncoderConfig.from_dict(manifest.encoder)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise NotAModelError(f"{path} has mimc.json but no {WEIGHTS_NAME}: re-create the artifact")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise NotAModelError(f"{weights} is not a valid safetensors file ({exc}): re-create the artifact") from exc
    encoder = Encoder(cfg)
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise NotAModelError(
            f"{weights} does not match its mimc.json (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}): re-create the artifact"
        )
    encoder.eval()
    encoder.manifest = manifest
    return encoder


__all__ = ["load_artifact"]
