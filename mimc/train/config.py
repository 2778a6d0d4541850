"""What a learning run is given: the recorded optimisation options and the runtime options.

:class:`TrainConfig` holds the optimiser fields every learning stage shares; a stage's options
class (``DistillConfig``, ``NMLearnedConfig``) derives from it, sets its own defaults and adds what
only it learns, so the fields and their checks are written once. :class:`TrainRun` is what a run
needs beside them and never records (options that change how a run computes, not what: its result
is the same up to float rounding); the caller builds it and passes it down
(``compress(..., run=TrainRun(...))``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from mimc.data.source import check_workers
from mimc.errors import ConfigError
from mimc.options import MAX_BATCH, Options, option
from mimc.train.images import steps_for_epochs

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig(Options):
    """Optimiser options of a learning run: AdamW, linear warm-up then cosine decay, clipping.

    A stage that changes a default redeclares the field with the same ``option()`` bounds.
    """

    steps: int = option(1000, ge=1, doc="optimizer steps (or give epochs)")
    epochs: float | None = option(None, gt=0, doc="passes over the images instead of steps: steps = ceil(epochs × images / batch_size)")
    lr: float = option(1e-4, gt=0, doc="peak learning rate")
    min_lr: float = option(0.0, ge=0, doc="learning rate at the end of the cosine decay")
    weight_decay: float = option(0.0, ge=0, doc="AdamW weight decay (matrices only)")
    batch_size: int = option(32, ge=1, le=MAX_BATCH, doc="global batch, split over torchrun ranks")
    clip_grad: float = option(1.0, ge=0, doc="gradient norm clip; 0 disables clipping")
    mask_ratio: float = option(0.0, ge=0, lt=1, doc="fraction of the patches hidden from teacher and student (0.75: a quarter shown)")
    flip: bool = True
    seed: int = option(0, ge=0, le=(1 << 32) - 1, doc="seed of everything random in the stage")
    precision: str = option("fp32", choices=PRECISIONS, doc="bf16: forwards under CUDA bf16 autocast (the loss and optimizer stay fp32)")

    # Fields recorded only away from these defaults: added after runs had been recorded without them, whose
    # options keep their exact layout and whose checkpoints stay resumable.
    recorded_when_set: ClassVar[dict[str, Any]] = {"epochs": None, "precision": "fp32"}
    # The order of ``to_dict()``'s keys (a stage's fields interleave with these): manifests and
    # recipes written before the shared type existed keep their byte layout. Empty: field order.
    key_order: ClassVar[tuple[str, ...]] = ()

    @property
    def warmup(self) -> int:
        """Steps of linear learning-rate warm-up (a stage spells the option its own way)."""
        return 0

    def check(self) -> None:
        if self.epochs is not None and self.steps != type(self).__dataclass_fields__["steps"].default:
            raise _both_given()

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if data.get("epochs") is not None and data.get("steps") is not None:
            raise _both_given()
        return super().from_dict(data)

    def for_images(self, count: int) -> "TrainConfig":
        """These options with ``steps`` resolved from ``epochs`` for ``count`` images (unchanged without epochs)."""
        if self.epochs is None:
            return self
        return dataclasses.replace(self, epochs=None, steps=steps_for_epochs(self.epochs, count, self.batch_size))

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, default in self.recorded_when_set.items():
            if data.get(name, default) == default:
                data.pop(name, None)
        if self.epochs is not None:
            data.pop("steps")  # follows from epochs and the images; the run's metrics record both
        return {**{k: data[k] for k in self.key_order if k in data}, **data}


def _both_given() -> ConfigError:
    return ConfigError("steps and epochs are mutually exclusive: give one of them", option=("steps", "epochs"))


@dataclass
class TrainRun:
    """Runtime options of a learning run; not part of a stage's recorded config."""

    run_dir: Path | None = None  # where checkpoints go (the future output folder)
    checkpoint_every: int = 100
    resume: bool = False
    show_progress: bool = False
    on_step: Callable[[int, float], None] | None = None  # called after each step (and its checkpoint)
    teacher: Any = None  # an explicit teacher encoder (distill); None: the stage's default
    workers: int | None = None  # processes prefetching the next steps' images; 0: in the main process; None: images.default_workers
    fsdp: bool = False  # shard the student, the teacher and the optimizer state over the torchrun ranks (FSDP2) instead of replicating them (DDP)
    checkpoint_activations: bool = False  # recompute each block's activations in the backward pass instead of keeping them

    def __post_init__(self) -> None:
        if self.run_dir is not None:
            self.run_dir = Path(self.run_dir)
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0):
            raise ConfigError(f"workers must be a whole number >= 0, got {self.workers!r}", option="workers")
        check_workers(self.workers)  # the API's workers, as the CLI's (which reach an ImageSource first)


__all__ = ["TrainConfig", "TrainRun"]
