"""Typed reports of the verbs: dataclasses with ``to_dict()`` (what ``--json`` prints)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class StageReport:
    """A model stage run by a single command: the artifact it wrote and what the stage measured."""

    output: Path | None
    stage: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    seconds: float
    model: str = ""
    encoder: Any = field(default=None, repr=False)  # the new encoder, in memory (not in to_dict)
    written: bool = True  # False on torchrun ranks other than 0, which write nothing
    skipped_images: list[str] = field(default_factory=list)  # unreadable images skipped (skip_corrupt)

    def to_dict(self) -> dict[str, Any]:
        body = {"model": self.model, "output": str(self.output) if self.output is not None else None, "stage": self.stage,
                "config": self.config, "metrics": self.metrics, "seconds": self.seconds}
        return {**body, "skipped_images": self.skipped_images} if self.skipped_images else body


@dataclass
class GraphReport:
    """A graph written by export / quantize: the file, its artifact, and the stage's own report."""

    path: Path
    artifact: Path | None
    report: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {**self.report, "path": str(self.path), "artifact": str(self.artifact) if self.artifact else None}


@dataclass
class DictReport:
    """A report whose body is a measured mapping (profile, eval, inspect, run, search, build)."""

    body: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.body[key]

    def __contains__(self, key: str) -> bool:  # (without it, `in` iterates __getitem__ from 0: a KeyError)
        return key in self.body

    def get(self, key: str, default: Any = None) -> Any:
        return self.body.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.body)
