"""What a learning run is given: the recorded optimisation options and the runtime options.

:class:`TrainConfig` holds the optimiser fields every learning stage shares; a stage's options
class (``DistillConfig``, ``NMLearnedConfig``) derives from it, sets its own defaults and adds what
only it learns, so the fields and their checks are written once. :class:`TrainRun` is what a run
needs beside them and never records: where to checkpoint, whether to resume, progress, an
explicit teacher. The caller builds it and passes it down (``compress(..., run=TrainRun(...))``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from mimc.options import Options, option


@dataclass(frozen=True)
class TrainConfig(Options):
    """Optimiser options of a learning run: AdamW, linear warm-up then cosine decay, clipping.

    A stage that changes a default redeclares the field with the same ``option()`` bounds.
    """

    steps: int = option(1000, ge=1, doc="optimizer steps")
    lr: float = option(1e-4, gt=0, doc="peak learning rate")
    min_lr: float = option(0.0, doc="learning rate at the end of the cosine decay")
    weight_decay: float = option(0.0, doc="AdamW weight decay (matrices only)")
    batch_size: int = option(32, ge=1, doc="global batch, split over torchrun ranks")
    clip_grad: float = option(1.0, doc="gradient norm clip; 0 disables clipping")
    mask_ratio: float = option(0.0, ge=0, lt=1, doc="fraction of the patches hidden from teacher and student (0.75: a quarter shown)")
    flip: bool = True
    seed: int = 0

    # The order of ``to_dict()``'s keys (a stage's fields interleave with these): manifests and
    # recipes written before the shared type existed keep their byte layout. Empty: field order.
    key_order: ClassVar[tuple[str, ...]] = ()

    @property
    def warmup(self) -> int:
        """Steps of linear learning-rate warm-up (a stage spells the option its own way)."""
        return 0

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**{k: data[k] for k in self.key_order if k in data}, **data}


@dataclass
class TrainRun:
    """Runtime options of a learning run; not part of a stage's recorded config."""

    run_dir: Path | None = None  # where checkpoints go (the future output folder)
    checkpoint_every: int = 100
    resume: bool = False
    show_progress: bool = False
    on_step: Callable[[int, float], None] | None = None  # called after each step (and its checkpoint)
    teacher: Any = None  # an explicit teacher encoder (distill); None: the stage's default

    def __post_init__(self) -> None:
        if self.run_dir is not None:
            self.run_dir = Path(self.run_dir)


__all__ = ["TrainConfig", "TrainRun"]
