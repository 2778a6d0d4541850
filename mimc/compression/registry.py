"""The registry from stage config type to handler, and the one verb ``compress``.

A stage's options are a :class:`mimc.options.StageConfig`. A handler takes ``(encoder, config,
calibration_batches)`` and returns ``(new_encoder, metrics)``; it must not modify the encoder it was given.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import pkgutil
import time
from typing import Any, Callable, Iterable

import torch

from mimc.artifact import Manifest, StageRecord, state_hash
from mimc.data import deterministic_inputs
from mimc.errors import ConfigError, DataError
from mimc.models.vit import flops_per_image
from mimc.train.config import TrainRun
from mimc.options import StageConfig  # re-exported: stage modules import it from here

__all__ = ["StageConfig", "register", "config_types", "compress", "clone_encoder", "shrink_metrics"]

Handler = Callable[[Any, "StageConfig", "Iterable[torch.Tensor] | None"], "tuple[Any, dict[str, Any]]"]

_HANDLERS: dict[type, Handler] = {}
_CONFIGS: dict[str, type] = {}
_TAKES_RUN: set[type] = set()  # config types whose handler takes the runtime options of a learning run


def register(config_type: type) -> Callable[[Handler], Handler]:
    """Decorator: ``@register(BlockPruningConfig) def prune_blocks(encoder, config, batches): ...``."""

    def wrap(fn: Handler) -> Handler:
        _HANDLERS[config_type] = fn
        _CONFIGS[config_type.name] = config_type
        if "run" in inspect.signature(fn).parameters:
            _TAKES_RUN.add(config_type)
        return fn

    return wrap


def config_types() -> dict[str, type]:
    _import_stages()
    return dict(_CONFIGS)


def _import_stages() -> None:
    """Import every technique module so its ``@register`` runs (they are cheap to import)."""
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in ("registry", "__init__"):
            importlib.import_module(f"{__package__}.{info.name}")


def compress(encoder, config: StageConfig, calibration_batches: Iterable[torch.Tensor] | None = None, run: TrainRun | None = None):
    """Apply one stage. Returns ``(new_encoder, StageRecord)``; ``encoder`` is left untouched.

    ``run`` reaches the learning stages; the others ignore it.
    """
    _import_stages()
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise ConfigError(f"no handler registered for {type(config).__name__}")
    if config.needs_data and calibration_batches is None:
        raise DataError(f"stage '{config.name}' with these options needs images: give data (a folder, .npz/.npy or 'builtin')", option="data")
    parent_hash = state_hash(encoder)
    start = time.perf_counter()
    extra = {"run": run} if type(config) in _TAKES_RUN else {}
    new_encoder, metrics = handler(encoder, config, calibration_batches, **extra)
    seconds = time.perf_counter() - start
    record = StageRecord(
        name=config.name,
        config=config.to_dict(),
        config_version=config.version,
        metrics=metrics,
        seconds=round(seconds, 4),
        parent_hash=parent_hash,
    )
    parent_manifest = getattr(encoder, "manifest", None) or Manifest(encoder=encoder.config.to_dict())
    new_encoder.manifest = parent_manifest.with_stage(record, new_encoder.config.to_dict())
    return new_encoder, record


def clone_encoder(encoder):
    """A deep copy that shares nothing with the input and carries no manifest (handlers start from this)."""
    # The memo maps the manifest to None: deepcopy then neither copies it nor touches the input.
    return copy.deepcopy(encoder, {id(getattr(encoder, "manifest", None)): None})


def shrink_metrics(encoder, new, batches, **before_fidelity) -> dict[str, Any]:
    """Parameters and MACs per image of ``new`` against the stage's input ``encoder``, ``before_fidelity``, then the
    fidelity to ``encoder`` on one seeded input (one forward of each: most of a ViT-B prune's few seconds) and
    on ``batches`` when there are any."""
    from mimc.evaluation import fidelity

    cfg = encoder.config
    macs_before, macs_after = flops_per_image(cfg), flops_per_image(new.config)
    metrics = {
        "params_before": encoder.num_params, "params_after": new.num_params,
        "macs_before": macs_before, "macs_after": macs_after,
        "macs_ratio": round(macs_after / macs_before, 6) if macs_before else None,
        **before_fidelity,
        "fidelity_deterministic": fidelity(new, encoder, deterministic_inputs(cfg, batch=1, seed=0)).to_dict(),
    }
    if batches:
        metrics["fidelity_data"] = fidelity(new, encoder, batches).to_dict()
    return metrics
