"""The one training loop behind every learning stage (distillation recovery, MaskLLM masks).

A stage builds a student (the compressed encoder, with only what it learns left trainable) and
hands it with its teacher (the dense source) and unlabeled images to :func:`train`, with its
options (a :class:`TrainConfig`) and the run's runtime options (a :class:`TrainRun`: where to
checkpoint, resuming, progress, an explicit teacher), which its caller passes in explicitly.
"""
from mimc.train.config import TrainConfig, TrainRun
from mimc.train.engine import FeatureLoss, FeatureModel, TrainResult, train

__all__ = ["FeatureLoss", "FeatureModel", "TrainConfig", "TrainResult", "TrainRun", "train"]
