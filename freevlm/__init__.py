"""freevlm: early exits for vision-language models, trained adversarially (FREE), that really skip layers."""

from .decoding.generate import DecodeStats, GenerateOutput
from .exits import ExitConfig, ExitLayer, FeatureDiscriminator
from .model import CheckpointMismatchError, EarlyExitVLM

__version__ = "0.1.0"
__all__ = [
    "CheckpointMismatchError",
    "DecodeStats",
    "EarlyExitVLM",
    "ExitConfig",
    "ExitLayer",
    "FeatureDiscriminator",
    "GenerateOutput",
]
