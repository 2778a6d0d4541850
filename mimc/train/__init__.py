"""The one training loop behind every learning stage (distillation recovery, MaskLLM masks).

A stage builds a student (the compressed encoder, with only what it learns left trainable) and
hands it with its teacher (the dense source) and unlabeled images (an :class:`IndexedImages`: each
step loads only the images it needs) to :func:`train`, with its
options (a :class:`TrainConfig`) and the run's runtime options (a :class:`TrainRun`: where to
checkpoint, resuming, progress, an explicit teacher), which its caller passes in explicitly.
"""
from mimc.train.config import TrainConfig, TrainRun
from mimc.train.engine import FeatureLoss, FeatureModel, TrainResult, train
from mimc.train.images import IndexedImages, TensorImages, as_indexed, first_batches, fingerprint

__all__ = ["FeatureLoss", "FeatureModel", "IndexedImages", "TensorImages", "TrainConfig", "TrainResult", "TrainRun", "as_indexed",
           "first_batches", "fingerprint", "train"]
