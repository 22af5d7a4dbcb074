"""Backbone adapters, one per language-model family."""

from __future__ import annotations

from torch import nn

from .base import Blip2Backbone, Context
from .blip2_opt import Blip2OPTBackbone
from .blip2_t5 import Blip2T5Backbone

def load_backbone(model: nn.Module) -> Blip2Backbone:
    """The adapter for a Hugging Face `Blip2ForConditionalGeneration`; a clear error for anything else."""
    from transformers import Blip2ForConditionalGeneration

    if not isinstance(model, Blip2ForConditionalGeneration):
        raise TypeError(
            f"freevlm needs a Hugging Face Blip2ForConditionalGeneration, got {type(model).__name__}. "
            "Load one with Blip2ForConditionalGeneration.from_pretrained(local_path)."
        )
    model_type = model.config.text_config.model_type
    if model_type in ("opt",):
        return Blip2OPTBackbone(model)
    if model_type in ("t5", "mt5", "umt5"):
        return Blip2T5Backbone(model)
    raise TypeError(f"unsupported BLIP-2 language model '{model_type}': freevlm supports OPT and T5/FlanT5")


__all__ = ["Blip2Backbone", "Context", "load_backbone"]
