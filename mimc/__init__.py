"""mimc: compress masked-image-modeling encoders into small, fast, validated deployables.

The documented Python API is the verbs of :mod:`mimc.api` (``mimc.prune``, ``mimc.width``,
``mimc.tokens``, ``mimc.sparsify``, ``mimc.distill``, ``mimc.export``, ``mimc.quantize``,
``mimc.build``, ``mimc.profile``, ``mimc.evaluate``, ``mimc.embed``, ``mimc.inspect``, ``mimc.run``,
``mimc.search``), plus ``load``, ``save`` and ``compress`` (one stage config on an Encoder in memory), and
``ImageSource`` (a data spec with its reading options: workers, skip_corrupt, columns), which
every ``data`` argument also takes.
They are imported on first use, so ``import mimc`` stays cheap; no subpackage shares a verb's name,
so a verb is never shadowed by a module import.
"""
from __future__ import annotations

from mimc._version import __version__

_VERBS = ("prune", "width", "tokens", "sparsify", "distill", "export", "quantize", "build", "profile", "evaluate",
          "embed", "inspect", "run", "recipe", "search", "profiles", "SearchSpace", "ImageSource")  # (and two types)


def load(model):
    """Any MODEL argument (``ref``, artifact dir, HF dir, checkpoint file, hub id) -> Encoder."""
    from mimc.models.resolve import load_model

    return load_model(model)


def save(encoder, out_dir, overwrite: bool = False):
    """Write an artifact directory (model.safetensors + mimc.json), atomically."""
    from mimc.artifact import save_artifact

    return save_artifact(encoder, out_dir, overwrite=overwrite)


def compress(encoder, config, calibration_batches=None):
    """Apply one stage config: ``(encoder, StageRecord)``; the input encoder is left untouched."""
    from mimc.compression.registry import compress as _compress

    return _compress(encoder, config, calibration_batches)


def __getattr__(name: str):
    if name in _VERBS:
        import mimc.api

        return getattr(mimc.api, name)
    raise AttributeError(f"module 'mimc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_VERBS])


__all__ = ["__version__", "load", "save", "compress", *_VERBS]
