"""Label-free recovery by feature distillation from the dense source (after block or token pruning).

The compressed encoder is the student, the dense source the teacher; the student learns to
reproduce the teacher's final token features and pooled feature on unlabeled images (loss and loop
in :mod:`mimc.train.engine`). With ``mask_ratio`` > 0 both see the same random 25 % (at 0.75) of the
patches, as in DMAE: several times cheaper per step, and the student still serves full images.

The teacher is, by default, the source the student's manifest names (``source.id``, e.g. ``ref``);
``mimc distill --teacher SRC`` (or ``compress(..., run=TrainRun(teacher=...))``) overrides it. A student that carries an
N:M pattern keeps it: its zeros are re-applied after every optimizer step.

References:
- Hinton et al., "Distilling the Knowledge in a Neural Network", 2015.
- Bai et al., "Masked Autoencoders Enable Efficient Knowledge Distillers" (DMAE), CVPR 2023 —
  github.com/UCSC-VLAA/DMAE
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from mimc.artifact import state_hash
from mimc.compression.registry import StageConfig, clone_encoder, register
from mimc.errors import ConfigError, DataError
from mimc.models.nm_pattern import block_linears, check_nm
from mimc.options import option
from mimc.train import FeatureLoss, TrainConfig, TrainRun, as_indexed, fingerprint, first_batches, train
from mimc.train.parallel import shard_like

# Structure a student may differ from its teacher in and still be compared feature by feature.
_MUST_MATCH = ("image_size", "patch_size", "in_chans", "num_frames", "tubelet_size", "dim", "cls_token", "pooling")


@dataclass(frozen=True)
class DistillConfig(TrainConfig, StageConfig):
    """Recovery by distillation: AdamW with warm-up and cosine decay on every student weight."""

    name: ClassVar[str] = "distill"
    needs_data: ClassVar[bool] = True
    learns: ClassVar[bool] = True
    key_order: ClassVar[tuple[str, ...]] = (
        "steps", "lr", "min_lr", "warmup_ratio", "weight_decay", "batch_size", "clip_grad", "mask_ratio",
        "token_weight", "pooled_weight", "hidden_weight", "flip", "seed",
    )  # fmt: skip

    # The shared options whose defaults differ for distillation (the rest: TrainConfig's defaults).
    min_lr: float = option(1e-6, ge=0, doc="learning rate at the end of the cosine decay")
    weight_decay: float = option(0.05, ge=0, doc="AdamW weight decay (matrices only)")
    mask_ratio: float = option(0.75, ge=0, lt=1, doc="fraction of the patches hidden from teacher and student (0.75: a quarter shown)")
    # Distillation's own options.
    warmup_ratio: float = option(0.05, ge=0, lt=1, doc="fraction of the steps spent warming the learning rate up")
    token_weight: float = option(1.0, ge=0, doc="weight of the per-token feature loss")
    pooled_weight: float = option(1.0, ge=0, doc="weight of the pooled feature loss")
    hidden_weight: float = option(0.0, ge=0, doc="> 0: also match every kept block's output to its teacher block")

    @property
    def warmup(self) -> int:
        return int(self.warmup_ratio * self.steps)

    def check(self) -> None:
        super().check()
        if not (self.token_weight or self.pooled_weight or self.hidden_weight):
            raise ConfigError("token_weight, pooled_weight and hidden_weight are all 0: nothing to learn; give one of them > 0",
                              option=("token_weight", "pooled_weight", "hidden_weight"))


def default_teacher(encoder):
    """The dense source named in the student's manifest, loaded afresh."""
    from mimc.models.resolve import load_model

    source = _source_id(encoder)
    if not source:
        raise ConfigError("the model's manifest names no source to distill from: give teacher (e.g. ref)", option="teacher")
    return load_model(source)


def _source_id(encoder) -> str | None:
    return (getattr(getattr(encoder, "manifest", None), "source", None) or {}).get("id")


def _teacher_label(teacher) -> str:
    """An explicit teacher's source, and the stages that made it when it is not that source itself."""
    stages = [s.name for s in getattr(getattr(teacher, "manifest", None), "stages", None) or []]
    source = _source_id(teacher) or "explicit"
    return f"{source} after {'+'.join(stages)}" if stages else source


def check_teacher(student, teacher) -> None:
    for key in _MUST_MATCH:
        a, b = getattr(student.config, key), getattr(teacher.config, key)
        if a != b:
            raise ConfigError(f"teacher and student differ in {key} ({b} vs {a}): distill from the model this one was compressed from")


def reapply_zeros(model, zeros: dict[str, torch.Tensor]) -> None:
    """Zero the masked weights of ``model`` (the student being trained) again after an optimizer step,
    so the N:M pattern survives training."""
    with torch.no_grad():
        for name, lin in block_linears(model):
            keep = zeros[name]
            if keep.device != lin.weight.device or type(keep) is not type(lin.weight.data):
                keep = zeros[name] = shard_like(keep, lin.weight.data)  # on the student's device, cut as it is (FSDP)
            lin.weight.mul_(keep)


@register(DistillConfig)
def distill(encoder, config: DistillConfig, calibration_batches=None, run: TrainRun | None = None) -> tuple[Any, dict[str, Any]]:
    from mimc.evaluation import fidelity

    images = as_indexed(calibration_batches)
    if not len(images):
        raise DataError("distill needs unlabeled images: give data (a folder, .npz/.npy or 'builtin')", option="data")
    teacher = run.teacher if run is not None else None
    # The label recorded in the manifest: where the teacher came from.
    teacher_label = _teacher_label(teacher) if teacher is not None else _source_id(encoder)
    teacher = clone_encoder(teacher) if teacher is not None else default_teacher(encoder)
    teacher.eval()
    check_teacher(encoder, teacher)
    if encoder.config.to_dict() == teacher.config.to_dict() and state_hash(encoder) == state_hash(teacher):
        raise ConfigError("the model is its own teacher (same structure and weights): there is nothing to recover; distill a "
                          "compressed model, or give another teacher", option="teacher")
    eval_pixels = first_batches(images, 256, 32)
    before = fidelity(encoder, teacher, eval_pixels).to_dict()

    student = clone_encoder(encoder).eval().requires_grad_(True)
    zeros = None  # an N:M student's pattern: the mask of the non-zero weights of each block Linear, by name
    if student.config.nm_pattern:
        zeros = {name: lin.weight.detach() != 0 for name, lin in block_linears(student)}
    meta = {
        "stage": config.to_dict(),
        "source_sha256": state_hash(encoder),
        "teacher_sha256": state_hash(teacher),
        "data_sha256": fingerprint(images),
    }
    result = train(student, teacher, images, config, run, meta=meta,
                   loss_weights=FeatureLoss(config.token_weight, config.pooled_weight, config.hidden_weight),
                   project=(lambda model: reapply_zeros(model, zeros)) if zeros is not None else None)
    student.requires_grad_(False).eval()
    if student.config.nm_pattern:
        check_nm(student)
    metrics = {
        "teacher": teacher_label,
        "fidelity_data_before": before,
        "fidelity_data": fidelity(student, teacher, eval_pixels).to_dict(),
        "n_train_images": len(images),
        "mask_ratio": config.mask_ratio,
        **result.metrics(),
    }
    return student, metrics


__all__ = ["DistillConfig", "distill", "default_teacher", "check_teacher"]
