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

from mimc.errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser options of a learning run: AdamW, linear warm-up then cosine decay, clipping.

    ``batch_size`` is global (split over torchrun ranks); ``clip_grad`` 0 disables clipping;
    ``mask_ratio`` > 0 hides that fraction of the patches from teacher and student alike.
    """

    steps: int = 1000
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 32
    clip_grad: float = 1.0
    mask_ratio: float = 0.0
    flip: bool = True
    seed: int = 0

    # The order of ``to_dict()``'s keys (a stage's fields interleave with these): manifests and
    # recipes written before the shared type existed keep their byte layout. Empty: field order.
    key_order: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps={self.steps}: train for at least 1 step")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size}: use at least 1")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio={self.mask_ratio} must be in [0, 1): 0.75 shows the student a quarter of the patches")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be positive")

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
