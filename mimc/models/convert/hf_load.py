"""Loading transformers models (local directory or hub id) for :func:`.hf.convert_hf_model`.

References: github.com/huggingface/transformers (``from_pretrained``), github.com/huggingface/huggingface_hub
(offline mode, cache layout).

Rules: a local directory loads from disk only. A hub id uses transformers' own loading; when the
hub's host does not resolve (or ``HF_HUB_OFFLINE=1``) it loads from the local cache only, at once,
instead of huggingface_hub retrying for ~25 s. Every failure is one line: not found, gated, offline,
unreadable weights, or a ``pytorch_model.bin`` whose pickle would run code.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from mimc.errors import ModelNotFoundError, NotAModelError, UnsafeCheckpointError, clip
from mimc.models.vit import Encoder
from mimc.models.convert.common import one_line, refuse_code_pickle
from mimc.models.convert.hf import convert_hf_model, family_of

# Classes loaded as themselves when a checkpoint names them, so that pieces outside the base model
# survive (VideoMAE's ``fc_norm``, BEiT/data2vec poolers); convert_hf_model then takes the encoder
# only. Any other class of a supported model_type loads through AutoModel (the bare encoder).
KNOWN_CLASSES = {
    "ViTMAEModel", "ViTMAEForPreTraining", "ViTModel", "ViTForImageClassification",
    "VideoMAEModel", "VideoMAEForPreTraining", "VideoMAEForVideoClassification",
    "BeitModel", "BeitForImageClassification", "BeitForMaskedImageModeling",
    "Data2VecVisionModel", "Data2VecVisionForImageClassification",
}  # fmt: skip

# The weights transformers loads from a local folder, in the order it looks for them.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
PREPROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")
_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")  # an encoder layer's weight (4.x and 5.x names); not a decoder_layers one


def preprocess_geometry(data: dict) -> dict:
    """``resize`` / ``crop_pct`` of an EncoderConfig from a transformers preprocessor config.

    ``size: {shortest_edge: S}`` with ``crop_size: C`` (ConvNeXt/BEiT style): short side to S, centre
    crop C (crop_pct C / S); ``size: {height, width}`` without a centre crop (ViTImageProcessor,
    VideoMAE): resized straight to the square ("squash"); with a crop, as the shortest-edge case.
    """
    size, crop = data.get("size"), data.get("crop_size")
    if data.get("do_resize") is False or not isinstance(size, dict):
        return {}
    edge = size.get("shortest_edge") or size.get("height")
    crop_edge = crop.get("height") if isinstance(crop, dict) else crop if isinstance(crop, int) else None
    if data.get("do_center_crop") and isinstance(edge, int) and isinstance(crop_edge, int) and 0 < crop_edge <= edge:
        return {"crop_pct": crop_edge / edge} if crop_edge != edge else {}
    if "height" in size and "width" in size and not data.get("do_center_crop"):
        return {"resize": "squash"}
    return {}


def read_preprocessor_config(source: str | os.PathLike, local_files_only: bool = False) -> dict:
    """``image_mean``, ``image_std``, ``resize``, ``crop_pct`` from a model's preprocessor config
    (local dir or hub) — what it has of them."""
    for name in PREPROCESSOR_FILES:
        path = Path(source) / name if Path(source).is_dir() else _hub_file(str(source), name, local_files_only)
        try:  # regular files only: a named pipe would block the read forever
            data = json.loads(path.read_text()) if path is not None and path.is_file() else None
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        out = preprocess_geometry(data)
        if "image_mean" in data and "image_std" in data:
            try:
                out.update({key: [float(x) for x in data[key]] for key in ("image_mean", "image_std")})
            except (TypeError, ValueError):
                raise NotAModelError(f"{path}: image_mean and image_std must be lists of numbers, got {clip(data['image_mean'])} and "
                                     f"{clip(data['image_std'])}: fix the file") from None
        return out
    return {}


def _hub_file(repo_id: str, filename: str, local_files_only: bool) -> Path | None:
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, filename, local_files_only=local_files_only))
    except Exception:  # noqa: BLE001 - the preprocessor is optional metadata; the weights decide success
        return None


def hub_reachable() -> bool:
    """Whether the hub's host resolves. Checked first so an offline machine gets mimc's error at
    once (or a cached copy) instead of huggingface_hub's five retries with backoff (~25 s)."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy local DNS says nothing; let the client try
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _model_class(hf_config):
    import transformers

    for name in getattr(hf_config, "architectures", None) or []:
        if name in KNOWN_CLASSES and hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


def _not_found(source: str, offline: bool, exc: BaseException | None = None) -> ModelNotFoundError:
    text = str(exc or "").lower()
    if offline or "couldn't connect" in text or "connection error" in text:
        return ModelNotFoundError(
            f"model '{source}' is not in the local Hugging Face cache and the hub cannot be reached (offline): connect to the internet or give a local model directory"
        )
    if "gated" in text:
        return ModelNotFoundError(f"model '{source}' is gated on the Hugging Face hub: request access and log in with `hf auth login`, or give a local model directory")
    return ModelNotFoundError(
        f"model '{source}' was not found on the Hugging Face hub: check the id (like facebook/vit-mae-base; private repos need `hf auth login`) or give a local model directory"
    )


def load_hf(source: str | os.PathLike) -> Encoder:
    """A local transformers model directory or a hub id -> canonical :class:`Encoder` (rules: module docstring)."""
    from huggingface_hub import constants as hub_constants

    source = str(source)
    local = Path(source).is_dir()
    saved = hub_constants.HF_HUB_OFFLINE
    offline = not local and (bool(saved) or not hub_reachable())
    # huggingface_hub honours ``local_files_only`` for files but still makes side requests (its
    # user-agent registry) unless its offline flag is set, so set it for the duration of the load.
    hub_constants.HF_HUB_OFFLINE = saved or offline
    try:
        return _load_hf(source, local, offline)
    finally:
        hub_constants.HF_HUB_OFFLINE = saved


def refuse_custom_code(folder: str | os.PathLike) -> None:
    """Refuse a local model folder that ships code for transformers to run (``auto_map`` in its
    config.json, naming a .py beside it): mimc loads weights only and never executes a folder's code."""
    folder = Path(folder)
    for name in ("config.json", *PREPROCESSOR_FILES):
        try:
            data = json.loads((folder / name).read_text()) if (folder / name).is_file() else None
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "auto_map" in data:
            files = sorted({str(v).split("--")[-1].split(".")[0] + ".py" for v in _flat(data["auto_map"])})
            raise UnsafeCheckpointError(
                f"{folder / name} has auto_map: the model needs its own code ({', '.join(files[:3]) or 'a .py file'}), which mimc "
                "never runs: use a model of a built-in transformers class (vit_mae, vit, videomae, beit, data2vec-vision)"
            )


def _flat(value) -> list:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flat(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat(v)]
    return [value] if value else []


def _check_depth(folder: Path, hf_config) -> None:
    """Compare config.json's layer count with the layers in the weights (an index, a safetensors header,
    or a ``pytorch_model.bin`` memory-mapped with ``weights_only=True``: no tensor is read) before
    transformers builds the model (the file it would load): a config that lies would otherwise drop
    trained layers silently, or build millions of layers first."""
    import torch
    from safetensors import safe_open

    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        return  # no weights: the load that follows reports it
    try:
        if weights.suffix == ".json":
            names = list(json.loads(weights.read_text())["weight_map"])
        elif weights.suffix == ".safetensors":
            with safe_open(str(weights), framework="pt") as f:
                names = list(f.keys())
        else:
            names = list(torch.load(weights, map_location="cpu", weights_only=True, mmap=True))
    except Exception:  # noqa: BLE001 - no readable names: the load that follows reports it
        return
    found = len({m.group(1) for k in names if (m := _LAYER.search(k))})
    if hf_config.num_hidden_layers != found:
        raise NotAModelError(f"{folder}/config.json does not fit its weights (num_hidden_layers {clip(hf_config.num_hidden_layers)}, the weights "
                             f"hold {found} layers): the checkpoint lacks layers or config.json was edited; re-save the model")


def _load_hf(source: str, local: bool, offline: bool) -> Encoder:
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    if local:
        refuse_custom_code(source)
    try:
        # trust_remote_code=False everywhere: transformers must neither run a model's code nor ask.
        hf_config = AutoConfig.from_pretrained(source, local_files_only=offline, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - transformers and huggingface_hub raise their own types for bad values
        if local:
            raise NotAModelError(f"{source}/config.json is not a usable transformers config ({one_line(exc)}): point at a saved model directory") from None
        raise _not_found(source, offline, exc) from None
    if getattr(hf_config, "auto_map", None):
        raise UnsafeCheckpointError(f"model '{source}' has auto_map: it needs its own code, which mimc never runs: "
                                    "use a model of a built-in transformers class")
    family_of(hf_config.model_type, source)
    if local:
        _check_depth(Path(source), hf_config)
    cls = _model_class(hf_config)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # missing keys are checked below, in one clear line
    hf_logging.disable_progress_bar()  # mimc's CLI draws its own progress on stderr
    # transformers itself loads .bin weights with torch.load(weights_only=True).
    kwargs = dict(output_loading_info=True, local_files_only=offline, weights_only=True, trust_remote_code=False)
    try:
        model, info = cls.from_pretrained(source, **kwargs)
        for listed, pooler in (("unexpected_keys", True), ("missing_keys", False)):
            if any("pooler.layernorm" in k for k in info.get(listed, ())) and cls.__name__.endswith("Model"):
                # Data2VecVisionModel defaults to no pooler, BeitModel to one: build the bare model with
                # the pooler LayerNorm exactly when the checkpoint has its trained weights.
                model, info = cls.from_pretrained(source, add_pooling_layer=pooler, **kwargs)
                break
    except Exception as exc:  # noqa: BLE001 - torch, safetensors and transformers each raise their own types
        for weights in sorted(Path(source).glob("*.bin")) if local else []:
            refuse_code_pickle(weights)  # names the culprit of a local pickle refused for running code
        if local:  # transformers' size-mismatch error points at a report its hidden log would have printed
            detail = "their shapes differ from what config.json describes" if "ignore_mismatched_sizes" in str(exc) else one_line(exc)
            raise NotAModelError(f"{source}: its weights cannot be loaded ({detail}): re-save or re-download the model") from None
        raise ModelNotFoundError(f"model '{source}' weights could not be loaded from the hub ({one_line(exc)}): check internet access or use a local directory") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    # ViT's tanh pooler is unused by mimc; any other missing weight means the encoder would be random.
    missing = sorted(k for k in info.get("missing_keys", ()) if "pooler.dense" not in k)
    if missing:
        raise NotAModelError(f"{source} lacks {len(missing)} encoder weights (e.g. {missing[0]}): the checkpoint is incomplete or of another architecture")
    unused = sorted(k for k in info.get("unexpected_keys", ()) if _LAYER.search(k))  # e.g. biases under qkv_bias: false
    if unused:
        raise NotAModelError(f"{source} has weights its config.json leaves unused ({len(unused)}, e.g. {unused[0]}): "
                             "config.json does not describe this checkpoint; re-save the model")
    found = read_preprocessor_config(source, local_files_only=offline)
    encoder = convert_hf_model(model.eval(), image_mean=found.get("image_mean"), image_std=found.get("image_std"), copy=False)
    encoder.config = encoder.config.replace(**{k: found[k] for k in ("resize", "crop_pct") if k in found})
    return encoder


__all__ = ["load_hf", "read_preprocessor_config", "preprocess_geometry", "hub_reachable"]
