"""Tile encoders: the registry of pathology foundation-model families and their ViT implementations."""

from wsitk.shared.models.encoders.checkpoints import CheckpointError, read_checkpoint
from wsitk.shared.models.encoders.families import ENCODERS, EncoderSpec, build_encoder

__all__ = ["ENCODERS", "CheckpointError", "EncoderSpec", "build_encoder", "read_checkpoint"]
