"""Stage configs, the registry from config type to handler, and the one verb ``compress``.

A stage is a frozen dataclass with ``name``, ``version`` and ``needs_data`` class attributes.
Configs round-trip through plain dicts (unknown keys rejected) so a manifest or a YAML recipe can
replay them. A handler takes ``(encoder, config, calibration_batches)`` and returns
``(new_encoder, metrics)``; it must not modify the encoder it was given. A learning stage's handler
also takes ``run`` (a :class:`mimc.train.TrainRun`: checkpoints, resume, progress, teacher), which
``compress`` passes on when its caller gives one.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import time
from typing import Any, Callable, ClassVar, Iterable

import torch

from mimc.artifact import Manifest, StageRecord, state_hash
from mimc.errors import ConfigError, DataError
from mimc.train.config import TrainRun

Handler = Callable[[Any, "StageConfig", "Iterable[torch.Tensor] | None"], "tuple[Any, dict[str, Any]]"]

_HANDLERS: dict[type, Handler] = {}
_CONFIGS: dict[str, type] = {}
_TAKES_RUN: set[type] = set()  # config types whose handler takes the runtime options of a learning run


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """Base of every stage's options."""

    name: ClassVar[str] = "stage"
    version: ClassVar[int] = 1

    @property
    def needs_data(self) -> bool:
        """Whether this configuration needs calibration or training images."""
        return False

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StageConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} for stage '{cls.name}': valid options are {sorted(known)}")
        values = {}
        for key, value in data.items():
            # Lists from JSON/YAML become tuples where the field default is a tuple (frozen, hashable).
            if isinstance(value, list):
                value = tuple(value)
            values[key] = value
        return cls(**values)


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


def config_from_dict(name: str, options: dict[str, Any]) -> StageConfig:
    types = config_types()
    if name not in types:
        raise ConfigError(f"unknown stage '{name}': known stages are {sorted(types)}")
    return types[name].from_dict(options)


def _import_stages() -> None:
    """Import every technique module so its ``@register`` runs (they are cheap to import)."""
    import importlib
    import pkgutil

    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in ("registry", "__init__"):
            importlib.import_module(f"{__package__}.{info.name}")
    importlib.import_module("mimc.quant.quantize")  # the graph-level stage registers here too (moved by the pipeline work)


def compress(encoder, config: StageConfig, calibration_batches: Iterable[torch.Tensor] | None = None, run: TrainRun | None = None):
    """Apply one stage. Returns ``(new_encoder, StageRecord)``; ``encoder`` is left untouched.

    ``run`` reaches the learning stages; the others ignore it.
    """
    _import_stages()
    handler = _HANDLERS.get(type(config))
    if handler is None:
        raise ConfigError(f"no handler registered for {type(config).__name__}")
    if config.needs_data and calibration_batches is None:
        raise DataError(f"stage '{config.name}' with these options needs images: pass --data/--calib DIR (a folder, .npz/.npy or 'builtin')")
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
    """A deep copy that shares nothing with the input (handlers start from this)."""
    manifest = getattr(encoder, "manifest", None)
    if manifest is not None:
        encoder.manifest = None
    try:
        new = copy.deepcopy(encoder)
    finally:
        if manifest is not None:
            encoder.manifest = manifest
    return new
