"""Option types: declared validation, dict round-trip and a JSON Schema, for every stage's options.

A field states its type (the annotation) and its range once, beside its default::

    @dataclass(frozen=True)
    class BlockPruningConfig(StageConfig):
        ratio: float | None = option(None, gt=0, lt=1, doc="fraction of blocks to remove")
        criterion: str = option("entropy", choices=CRITERIA)

The base ``__post_init__`` checks every field against its annotation (bools are not integers,
strings are not numbers; a list or tuple becomes the field's ``tuple[...]`` or ``list[...]``) and its
declared bounds, then calls ``check()``, where a config keeps the rules that tie fields together.

Errors are :class:`~mimc.errors.ConfigError` carrying the option's name and wording it as that bare
name, which the CLI and recipes rephrase (:mod:`mimc.errors`). This module imports only :mod:`mimc.errors`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types
import typing
from typing import Any, ClassVar

from mimc.errors import ConfigError, clip, whole

_SPEC = "mimc.option"
MAX_BATCH = 4096  # the most images one process takes at once (a batch, a learning step, an exported or profiled graph): a ViT-B input alone is 2.5 GB there


@dataclasses.dataclass(frozen=True)
class Spec:
    """What :func:`option` declares about one field (beyond its annotation)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple[Any, ...] | None = None
    min_items: int | None = None  # tuple fields: at least this many values
    doc: str = ""

    def describe_range(self) -> str:
        """``(0, 1)``, ``[90, 100]``, ``>= 1``: the bounds as a reader writes them."""
        low = (f"({_num(self.gt)}" if self.gt is not None else f"[{_num(self.ge)}") if (self.gt, self.ge) != (None, None) else None
        high = (f"{_num(self.lt)})" if self.lt is not None else f"{_num(self.le)}]") if (self.lt, self.le) != (None, None) else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"> {_num(self.gt)}" if self.gt is not None else f">= {_num(self.ge)}"
        return f"< {_num(self.lt)}" if self.lt is not None else f"<= {_num(self.le)}"

    def in_range(self, value: Any) -> bool:
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))


def option(default: Any = dataclasses.MISSING, *, choices: Any = None, **spec: Any) -> Any:
    """A dataclass field with what :class:`Spec` declares: bounds ``gt`` / ``ge`` / ``lt`` / ``le`` (numbers,
    and each value of a tuple), ``min_items``, allowed ``choices`` and a one-line ``doc`` (the JSON
    Schema's description; messages name the option alone, so the CLI and recipes can rephrase it)."""
    spec = Spec(choices=tuple(choices) if choices is not None else None, **spec)
    return dataclasses.field(default=default, metadata={_SPEC: spec})


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


# The field's annotation, reduced to what is checked --------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Kind:
    bases: tuple[type, ...]  # allowed scalar types (int, float, bool, str); empty: anything
    nullable: bool = False
    items: type | None = None  # tuple or list: a tuple[T, ...] / list[T] of these scalars


def _kind(annotation: Any) -> _Kind:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        kinds = [_kind(a) for a in inner]
        if any(not k.bases or k.items for k in kinds) and len(kinds) > 1:
            return _Kind((), nullable=True)  # unions of containers: left to check()
        bases = tuple(b for k in kinds for b in k.bases)
        return _Kind(bases, nullable=len(inner) < len(args), items=kinds[0].items if kinds else None)
    if typing.get_origin(annotation) in (tuple, list):
        return _Kind(_kind(args[0]).bases if args else (), items=typing.get_origin(annotation))
    if annotation in (bool, int, float, str):
        return _Kind((annotation,))
    return _Kind(())


_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
_PLURAL = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
_JSON = {bool: "boolean", int: "integer", float: "number", str: "string"}


def _is(value: Any, base: type) -> bool:
    if isinstance(value, bool):
        return base is bool  # True is an int to Python, never to an option
    if base is int:
        return whole(value)
    if base is float:
        return isinstance(value, numbers.Real)
    return isinstance(value, base)


def plain(value: Any) -> Any:
    """A number as Python's own int or float (numpy's, even np.float64, are not written by YAML); else ``value``."""
    if isinstance(value, (numbers.Integral, numbers.Real)) and not isinstance(value, bool) and type(value) not in (int, float):
        return int(value) if isinstance(value, numbers.Integral) else float(value)
    return value


def _check_value(name: str, value: Any, kind: _Kind, spec: Spec) -> None:
    if kind.bases and not any(_is(value, b) for b in kind.bases):
        raise ConfigError(f"{name} must be {' or '.join(_WORDS[b] for b in kind.bases)}, got {clip(value)}", option=name)
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(f"unknown {name} {clip(value)}: choose one of {', '.join(map(str, spec.choices))}", option=name)
    if isinstance(value, numbers.Real) and not spec.in_range(value):  # always in range without bounds
        raise ConfigError(f"{name} must be {spec.describe_range()}, got {clip(value)}", option=name)
    if isinstance(value, numbers.Real) and not math.isfinite(value):  # nan / inf, unbounded or within a one-sided bound
        raise ConfigError(f"{name} must be a finite number, got {clip(value)}", option=name)


def check_batch_size(value: Any, option: str = "batch_size") -> None:
    """A batch size refused as a declared ``option(ge=1, le=MAX_BATCH)`` would be (past the cap memory fills before any work)."""
    _check_value(option, value, _Kind((int,)), Spec(ge=1, le=MAX_BATCH))


def _check_items(name: str, values: tuple, kind: _Kind, spec: Spec) -> None:
    shown = list(values)
    if spec.min_items is not None and len(values) < spec.min_items:
        raise ConfigError(f"{name} must hold at least {spec.min_items} value(s), got {clip(shown)}", option=name)
    if kind.bases and not all(any(_is(v, b) for b in kind.bases) for v in values):
        raise ConfigError(f"{name} must be a list of {' or '.join(_PLURAL[b] for b in kind.bases)}, got {clip(shown)}", option=name)
    if spec.choices is not None and any(v not in spec.choices for v in values):
        raise ConfigError(f"{name} must hold values from {', '.join(map(str, spec.choices))}, got {clip(shown)}", option=name)
    if not all(spec.in_range(v) for v in values):
        raise ConfigError(f"{name} must hold values {spec.describe_range()}, got {clip(shown)}", option=name)
    if not all(math.isfinite(v) for v in values if isinstance(v, numbers.Real)):  # nan / inf, as for one value
        raise ConfigError(f"{name} must hold finite numbers, got {clip(shown)}", option=name)


@functools.cache
def _declared(cls: type) -> list[tuple[dataclasses.Field, _Kind, Spec]]:
    """Each field with its checked kind and spec (string annotations of `from __future__` resolved once per class)."""
    hints = typing.get_type_hints(cls)
    return [(f, _kind(hints.get(f.name, Any)), f.metadata.get(_SPEC, Spec())) for f in dataclasses.fields(cls)]


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of a frozen options dataclass: declared checks, ``check()``, dict round-trip, schema."""

    def __post_init__(self) -> None:
        for f, kind, spec in _declared(type(self)):
            value = getattr(self, f.name)
            if value is None and (kind.nullable or not kind.bases):
                continue
            if kind.items:
                if not isinstance(value, (list, tuple)):
                    raise ConfigError(f"{f.name} must be a list, got {clip(value)}: write [{clip(value)}]", option=f.name)
                _check_items(f.name, tuple(value), kind, spec)
                object.__setattr__(self, f.name, kind.items(map(plain, value)))  # the declared tuple (hashable) or list
            else:
                _check_value(f.name, value, kind, spec)
                object.__setattr__(self, f.name, plain(value))
        self.check()

    def check(self) -> None:
        """Rules across fields (one of ratio/keep/blocks, ...); raise ConfigError(..., option=...)."""

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known, key=str)  # a YAML key may be a number
        if unknown:
            label = getattr(cls, "name", cls.__name__)
            raise ConfigError(f"unknown option(s) {unknown} for stage '{label}': valid options are {sorted(known)}")
        # Lists from JSON/YAML become tuples (frozen, hashable).
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()})

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """A JSON Schema (draft 2020-12) of the options mapping, from the declarations."""
        properties = {}
        for f, kind, spec in _declared(cls):
            prop = _scalar_schema(kind.bases, spec)
            if kind.items:
                prop = {"type": "array", "items": prop, **({"minItems": spec.min_items} if spec.min_items else {})}
            if kind.nullable and "type" in prop:
                prop["type"] = [*(prop["type"] if isinstance(prop["type"], list) else [prop["type"]]), "null"]
                if "enum" in prop:
                    prop["enum"] = [*prop["enum"], None]
            if f.default is not dataclasses.MISSING:
                default = f.default
                prop["default"] = list(default) if isinstance(default, tuple) else default
            if spec.doc:
                prop["description"] = spec.doc
            properties[f.name] = prop
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
                  "properties": properties, "additionalProperties": False}
        label = getattr(cls, "name", None)
        if label:
            schema["title"] = label
        if cls.__doc__:
            schema["description"] = " ".join(cls.__doc__.split())
        return schema


def _scalar_schema(bases: tuple[type, ...], spec: Spec) -> dict[str, Any]:
    prop: dict[str, Any] = {}
    if bases:
        names = list(dict.fromkeys(_JSON[b] for b in bases))
        prop["type"] = names[0] if len(names) == 1 else names
    if spec.choices is not None:
        prop["enum"] = list(spec.choices)
    for key, bound in (("exclusiveMinimum", spec.gt), ("minimum", spec.ge), ("exclusiveMaximum", spec.lt), ("maximum", spec.le)):
        if bound is not None:
            prop[key] = bound
    return prop


@dataclasses.dataclass(frozen=True)
class StageConfig(Options):
    """Base of every stage's options: a ``name`` (the recipe key), a ``version`` and ``needs_data``."""

    name: ClassVar[str] = "stage"
    version: ClassVar[int] = 1

    @property
    def needs_data(self) -> bool:
        """Whether this configuration needs calibration or training images."""
        return False

    @property
    def learns(self) -> bool:
        """Whether this configuration trains (its images are then handed over indexed, read a batch at a time)."""
        return False


__all__ = ["Options", "StageConfig", "Spec", "option"]
