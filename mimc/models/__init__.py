"""Canonical encoder and converters into it."""
from mimc.models.vit import Encoder, EncoderConfig, EncoderOutput, build_encoder

__all__ = ["Encoder", "EncoderConfig", "EncoderOutput", "build_encoder"]
