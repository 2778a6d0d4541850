"""``ref``: mimc's own small reference MAE, shipped inside the package.

A 12-block ViT (32 px, 4 px patches, dim 128, 4 heads) pretrained as a masked autoencoder (75 %
masking, pixel-normalised loss) by ``scripts/train_ref.py`` on photographs that ship inside PyPI
packages (scikit-image's sample data, scikit-learn's sample images and part of its digits). The
decoder lived only in the training script; what ships is the canonical encoder. Its held-out,
labelled evaluation set is ``mimc/models/ref/builtin.npz`` (read by ``load_images('builtin', ...)``).
See docs/ref.md for the training command, time and k-NN accuracy.

References:
  He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022.
  https://github.com/facebookresearch/mae
"""
from __future__ import annotations

from pathlib import Path

from mimc.errors import MimcError
from mimc.models.convert.common import encoder_with_weights
from mimc.models.vit import Encoder, EncoderConfig

REF_DIR = Path(__file__).parent / "ref"
REF_WEIGHTS = REF_DIR / "ref.safetensors"
REF_LOG = REF_DIR / "train_log.json"

REF_CONFIG = EncoderConfig(
    image_size=32,
    patch_size=4,
    dim=128,
    depth=12,
    num_heads=4,
    mlp_dim=512,
    cls_token=True,
    pooling="mean",
    family="ref",
)


def reference_config() -> EncoderConfig:
    """A fresh copy of ``REF_CONFIG`` (configs are mutable dataclasses; never share the constant)."""
    return EncoderConfig.from_dict(REF_CONFIG.to_dict())


def load_reference() -> Encoder:
    """The reference encoder in eval mode, fp32 (the weights ship as fp16 to keep the wheel small)."""
    from safetensors.torch import load_file

    if not REF_WEIGHTS.is_file():
        raise MimcError(f"reference weights missing at {REF_WEIGHTS}: reinstall mimc or run scripts/train_ref.py --out {REF_DIR}")
    try:
        encoder, (missing, unexpected) = encoder_with_weights(reference_config(), load_file(str(REF_WEIGHTS)), copy=False, strict=False)
    except RuntimeError as exc:  # shape mismatch: weights from another REF_CONFIG
        raise MimcError(f"reference weights at {REF_WEIGHTS} do not fit REF_CONFIG: retrain with scripts/train_ref.py") from exc
    if missing or unexpected:
        raise MimcError(
            f"reference weights at {REF_WEIGHTS} do not match REF_CONFIG (missing {missing[:3]}, unexpected {unexpected[:3]}): "
            "retrain with scripts/train_ref.py"
        )
    return encoder


__all__ = ["REF_DIR", "REF_WEIGHTS", "REF_LOG", "REF_CONFIG", "reference_config", "load_reference"]
