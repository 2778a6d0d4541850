"""YAML files users give mimc (recipes, device profiles), parsed strictly: plain YAML only.

Anchors and aliases (``&a`` / ``*a``, which let a few hundred bytes expand to gigabytes), tags
(``!!int x``: a traceback) and duplicate keys (YAML would keep the last one silently) are refused, as
is a file over 1 MiB; YAML 1.2's reading of ``1e-4`` (a float), ``010`` (ten, not YAML 1.1's octal 8)
and ``2:4`` (text, not YAML 1.1's base 60) is kept.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from mimc.errors import BadInputError, MimcError, clip, shorten

MAX_YAML_BYTES = 1 << 20


def read_yaml(path: Path, what: str = "recipe", error: type[MimcError] = BadInputError) -> Any:
    """The parsed file; ``error`` (naming it as ``what``) for anything refused or unreadable."""
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise error(f"{what} {path} is over {MAX_YAML_BYTES >> 20} MiB: a {what} is a short YAML file")
        return yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        where = f" at line {exc.problem_mark.line + 1}" if exc.problem_mark is not None else ""
        raise error(f"{what} {path} is not valid YAML{where} ({shorten(exc.problem or exc.context)}): fix the file") from None
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        raise error(f"{what} {path} is not readable YAML ({shorten(exc)}): fix the file") from None


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses anchors, aliases, tags and duplicate keys (see :func:`read_yaml`)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise ConstructorError(None, None, "anchors and aliases (&name, *name) are not allowed: write the values out",
                                   event.start_mark)
        if getattr(event, "tag", None) is not None:  # !!int abc, !!timestamp x: tracebacks; !!int 1:30: base 60
            tag = shorten(event.tag.replace("tag:yaml.org,2002:", "!!"), 24)
            raise ConstructorError(None, None, f"tags ({tag}) are not allowed: write plain values", event.start_mark)
        return super().compose_node(parent, index)

    def resolve(self, kind, value, implicit):
        if kind is yaml.ScalarNode and implicit[0] and re.fullmatch(r"[-+]?[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?", value):
            return "tag:yaml.org,2002:str"  # YAML 1.1's base 60 (2:4 = 124): an N:M pattern stays text
        return super().resolve(kind, value, implicit)

    def construct_yaml_int(self, node):
        value = self.construct_scalar(node).replace("_", "")
        if re.fullmatch(r"[-+]?0[0-7]+", value):
            return int(value)  # YAML 1.1's octal (010 = 8); YAML 1.2 and every user read 010 as ten
        return super().construct_yaml_int(node)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # an unhashable key; the base class refuses it
            if duplicate:
                raise ConstructorError(None, None, f"duplicate key {clip(key)}: give each key once", key_node.start_mark)
        return super().construct_mapping(node, deep)


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)
# YAML 1.2 floats PyYAML (YAML 1.1) reads as strings: an exponent without a dot (lr: 1e-4)
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+(?:\.[0-9]*)?[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))

__all__ = ["read_yaml", "MAX_YAML_BYTES"]
