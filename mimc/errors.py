"""Typed errors. User mistakes exit 2, failures in the work exit 1.

Each message is one line naming the problem and the fix; the CLI prints it without a traceback.
"""
from __future__ import annotations


class MimcError(Exception):
    """Base class; `exit_code` is what the CLI returns."""

    exit_code = 1


class BadInputError(MimcError):
    """The user asked for something impossible or pointed at something unusable (exit 2)."""

    exit_code = 2


class ModelNotFoundError(BadInputError):
    """The MODEL argument names no path, hub id or built-in model."""


class NotAModelError(BadInputError):
    """The path exists but holds nothing mimc can load."""


class UnsafeCheckpointError(BadInputError):
    """A pickle checkpoint that would execute code on load."""


class ConfigError(BadInputError):
    """A stage's options are out of range or unknown."""


class DataError(BadInputError):
    """Calibration or evaluation data is missing or of the wrong shape."""


class MissingExtraError(MimcError):
    """An optional dependency is not installed; the message names `pip install mimc[...]`."""

    exit_code = 2


class ValidationError(MimcError):
    """A graph's outputs differ from its torch model beyond the precision's gate (exit 1)."""


class DeviceUnavailableError(MimcError):
    """The target device (GPU, TensorRT) is not present on this machine (exit 2)."""

    exit_code = 2


def require(module: str, extra: str, purpose: str):
    """Import an optional module or fail with the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(
            f"{purpose} needs the Python package '{module}', which is not installed: "
            f"pip install 'mimc[{extra}]'"
        ) from exc
