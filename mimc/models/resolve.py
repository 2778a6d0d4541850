"""MODEL argument -> canonical encoder.

Accepted: ``ref`` (the built-in reference MAE), a mimc artifact directory, a transformers model
directory (``config.json`` with a ``model_type``), a timm checkpoint file (``.safetensors`` / ``.pth``
/ ``.pt`` / ``.bin``) or a timm hub download (``config.json`` naming an ``architecture`` beside
``model.safetensors``), a hub id (``org/name``; loaded by transformers, needs internet or a cached copy),
or ``random:NAME``: a randomly initialised ViT of a named size (``random:vit-h/14``; seed 0,
:data:`mimc.models.vit.VIT_SIZES`), for measuring what a big encoder costs without downloading one.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from mimc.errors import ConfigError, ModelNotFoundError, NotAModelError

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
RANDOM_PREFIX = "random:"
RANDOM_SEED = 0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def model_slug(model: str) -> str:
    """A short name for default output paths: ``ref``, a directory's or file's stem, a hub id's name."""
    if model.startswith(RANDOM_PREFIX):
        return re.sub(r"[^\w.\-]", "-", model[len(RANDOM_PREFIX):]) or "random"
    name = Path(model.rstrip("/\\")).name or "model"
    for suffix in (*CHECKPOINT_SUFFIXES, ".onnx"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name or "model"


def describe_source(model: str) -> str:
    """What kind of MODEL argument this is: ref, random, artifact, hf-dir, timm-dir, checkpoint or hub."""
    from mimc.artifact import is_artifact

    if model == "ref":
        return "ref"
    if model.startswith(RANDOM_PREFIX):
        from mimc.models.vit import VIT_SIZES

        if model[len(RANDOM_PREFIX):] not in VIT_SIZES:
            raise ModelNotFoundError(f"model '{model[:60]}' names no random ViT size: give one of "
                                     f"{', '.join(RANDOM_PREFIX + n for n in VIT_SIZES)}")
        return "random"
    path = Path(model).expanduser()  # quoted paths and recipe files keep a literal '~'
    if path.exists():
        if is_artifact(path):
            return "artifact"
        if path.is_dir() and (path / "config.json").is_file():
            return "timm-dir" if _timm_weights(path) is not None else "hf-dir"
        if path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
            return "checkpoint"
        if path.is_dir():
            raise NotAModelError(
                f"{path} is a directory but neither a mimc artifact (mimc.json) nor a transformers model (config.json): point at a model directory"
            )
        raise NotAModelError(
            f"{path} is not a model file: expected one of {', '.join(CHECKPOINT_SUFFIXES)}, a model directory, a hub id or 'ref'"
        )
    looks_like_path = model.startswith((".", "/", "~")) or os.sep in model.strip("/").split("/", 1)[-1] or model.endswith(CHECKPOINT_SUFFIXES)
    if not looks_like_path and _HUB_ID.match(model):
        return "hub"
    raise ModelNotFoundError(f"model '{model}' not found: give an existing path, a hub id like facebook/vit-mae-base, or 'ref'")


def load_model(model: str | os.PathLike):
    """Load any MODEL argument as a canonical :class:`~mimc.models.vit.Encoder` with a manifest."""
    from mimc.artifact import Manifest, recorded_path, sha256_file
    from mimc.models.io import load_artifact

    model = str(model)
    kind = describe_source(model)
    if kind != "hub":
        model = os.path.expanduser(model)
    if kind == "artifact":
        return load_artifact(model)
    extra = {} if kind == "ref" else {"kind": kind}  # the built-in ref records no kind, as it always has
    if kind == "ref":
        from mimc.models.reference import REF_WEIGHTS, load_reference

        encoder = load_reference()  # refuses missing weights, so the file is there to hash
        sha = sha256_file(REF_WEIGHTS)
    elif kind == "random":
        from mimc.models.vit import build_encoder, vit_config

        encoder, sha = build_encoder(vit_config(model[len(RANDOM_PREFIX):]), seed=RANDOM_SEED), None
        extra["seed"] = RANDOM_SEED
    else:
        try:
            encoder, sha = _convert(model, kind)
        except ConfigError as exc:  # a shape or setting the canonical encoder cannot represent
            raise NotAModelError(f"{model} cannot be converted ({str(exc).removeprefix('invalid encoder config: ')}): mimc's encoder does "
                                 "not support this model, or its config / sidecar / preprocessor file says otherwise; fix it") from None
    import torch

    bad = next((name for name, t in encoder.state_dict().items() if not torch.isfinite(t).all()), None)
    if bad is not None:  # a corrupt checkpoint would otherwise prune, export and "validate" NaN against NaN
        raise NotAModelError(f"{model}: weight {bad} holds NaN or infinite values: the checkpoint is corrupt; re-save or re-download it")
    source = {"id": recorded_path(model), "family": encoder.config.family, "sha256": sha, **extra}
    encoder.eval()
    encoder.manifest = Manifest(encoder=encoder.config.to_dict(), source=source)
    return encoder


def _convert(model: str, kind: str):
    """(encoder, sha256 of the weights) of a transformers model or a timm checkpoint."""
    from mimc.artifact import sha256_file

    if kind in ("hf-dir", "hub"):
        from mimc.models.convert.hf_load import load_hf

        encoder = load_hf(model)
        weights = _first_file(Path(model), ("model.safetensors", "pytorch_model.bin")) if kind == "hf-dir" else None
        return encoder, sha256_file(weights) if weights else None
    from mimc.models.convert.timm import load_timm_checkpoint

    weights = _timm_weights(Path(model)) if kind == "timm-dir" else Path(model)
    return load_timm_checkpoint(weights), sha256_file(weights)


def _timm_weights(path: Path) -> Path | None:
    """The weights of a timm hub download: its config.json names an ``architecture`` and has no
    transformers ``model_type``; the weights sit beside it (read with that config as hints)."""
    import json

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None  # left to the transformers loader, which reports a broken config.json
    if not isinstance(config, dict) or "model_type" in config or "architecture" not in config:
        return None
    return _first_file(path, ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"))


def _first_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / name for name in names if (folder / name).is_file()), None)
