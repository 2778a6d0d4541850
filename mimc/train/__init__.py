"""The one training engine behind every learning stage (distillation recovery, MaskLLM masks).

A stage builds a student (the compressed encoder, with only what it learns left trainable) and
hands it with its teacher (the dense source) and unlabeled images to :func:`train`. Runtime concerns
that are not part of a stage's recorded options — where to checkpoint, resuming, progress, an
explicit teacher — travel in :func:`run_options`.
"""
from mimc.train.engine import FeatureModel, TrainResult, TrainSettings, current_run, run_options, train

__all__ = ["FeatureModel", "TrainResult", "TrainSettings", "current_run", "run_options", "train"]
