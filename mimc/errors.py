"""Typed errors. User mistakes exit 2, failures in the work exit 1.

Each message is one line naming the problem and the fix; the CLI prints it without a traceback.
The library speaks in option names: an error about an option carries its name (``option="ratio"``)
and its message words it as that bare name (``ratio must be in (0, 1), got 1.5``). The CLI rephrases
the name as its flag (``--ratio``), a recipe as its key (``stages[0].prune.ratio``); see
:meth:`MimcError.phrased`.
"""
from __future__ import annotations

import importlib
import numbers
import re
from typing import Any, Mapping, Sequence


class MimcError(Exception):
    """Base class; `exit_code` is what the CLI returns; `options` the option names the message uses."""

    exit_code = 1

    def __init__(self, message: str = "", *, option: str | Sequence[str] | None = None) -> None:
        super().__init__(message)
        self.options: tuple[str, ...] = (option,) if isinstance(option, str) else tuple(option or ())

    def phrased(self, names: Mapping[str, str]) -> str:
        """The message with each carried option's name replaced by ``names[option]`` (a flag, a key
        path); an option missing from the message is named in front of it."""
        message = str(self)
        for option in self.options:
            if option not in names:
                continue
            # a whole word only: not part of another name, a flag, a dotted key or a file name or path
            pattern = re.compile(rf"(?<![\w.\-/\\]){re.escape(option)}(?![\w\-/\\]|\.\w)")
            message, count = pattern.subn(lambda _: names[option], message)
            if not count:
                message = f"{names[option]}: {message}"
        return message


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


def whole(value: Any) -> bool:
    """A whole number (a Python or numpy integer), not a bool, a float or text: what a count option takes."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def clip(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for an error line, cut to ``limit`` characters: a message never echoes an
    unbounded user value (a huge recipe value would otherwise become the error itself)."""
    return shorten(repr(value), limit)


def shorten(text: Any, limit: int = 80, keep_end: bool = False) -> str:
    """``str(text)`` on one line, cut to ``limit`` characters; ``keep_end``: its last ones (a path's file
    name is what tells two paths apart)."""
    text = str(text).replace("\n", " ")
    if len(text) <= limit:
        return text
    return "..." + text[3 - limit:] if keep_end else text[: limit - 3] + "..."


def require(module: str, extra: str, purpose: str):
    """Import an optional module or fail with the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(
            f"{purpose} needs the Python package '{module}', which is not installed: "
            f"pip install 'mimc[{extra}]'"
        ) from exc
