"""Canonical encoder and converters into it."""
from .vit import Encoder, EncoderConfig, EncoderOutput, build_encoder

__all__ = ["Encoder", "EncoderConfig", "EncoderOutput", "build_encoder"]
