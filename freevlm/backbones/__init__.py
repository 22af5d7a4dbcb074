"""Backbone adapters, one per model and language-model family."""

from __future__ import annotations

from torch import nn

from .base import Backbone, Blip2Backbone, Context, sharing_features  # noqa: F401  (public)
from .blip2_opt import Blip2OPTBackbone
from .blip2_t5 import Blip2T5Backbone
from .gemma3 import Gemma3Backbone
from .idefics3 import Idefics3Backbone
from .instructblip import InstructBlipOPTBackbone, InstructBlipRotaryBackbone, InstructBlipT5Backbone
from .internvl import InternVLBackbone
from .llava import LlavaBackbone
from .llava_next import LlavaNextBackbone
from .llava_onevision import LlavaOnevisionBackbone
from .qwen_vl import QwenVLBackbone
from .rotary import LANGUAGE_MODELS as ROTARY_LANGUAGE_MODELS

T5_TYPES = ("t5", "mt5", "umt5")
SUPPORTED = (
    "Blip2ForConditionalGeneration (OPT, T5/FlanT5), "
    f"InstructBlipForConditionalGeneration (OPT, T5/FlanT5, {', '.join(ROTARY_LANGUAGE_MODELS)}), "
    f"LlavaForConditionalGeneration ({', '.join(ROTARY_LANGUAGE_MODELS)}), "
    f"LlavaNextForConditionalGeneration ({', '.join(ROTARY_LANGUAGE_MODELS)}), "
    f"LlavaOnevisionForConditionalGeneration ({', '.join(ROTARY_LANGUAGE_MODELS)}), "
    "Gemma3ForConditionalGeneration, "
    f"InternVLForConditionalGeneration ({', '.join(ROTARY_LANGUAGE_MODELS)}), "
    f"SmolVLMForConditionalGeneration and Idefics3ForConditionalGeneration ({', '.join(ROTARY_LANGUAGE_MODELS)}), "
    "Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration"
)


def load_backbone(model: nn.Module) -> Backbone:
    """The adapter for a supported Hugging Face model; a clear error naming what is supported for anything else."""
    from transformers import (
        Blip2ForConditionalGeneration,
        Gemma3ForConditionalGeneration,
        Idefics3ForConditionalGeneration,
        InstructBlipForConditionalGeneration,
        InternVLForConditionalGeneration,
        LlavaForConditionalGeneration,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
        Qwen3VLForConditionalGeneration,
        SmolVLMForConditionalGeneration,
    )

    if isinstance(
        model, (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration)
    ):
        return QwenVLBackbone(model)

    if isinstance(model, Gemma3ForConditionalGeneration):
        return Gemma3Backbone(model)
    if isinstance(model, InternVLForConditionalGeneration):
        language_model = model.config.text_config.model_type
        if language_model not in ROTARY_LANGUAGE_MODELS:
            raise TypeError(f"unsupported InternVL language model '{language_model}': freevlm supports {SUPPORTED}")
        return InternVLBackbone(model)
    tiled = {
        LlavaNextForConditionalGeneration: ("LLaVA-NeXT", LlavaNextBackbone),
        LlavaOnevisionForConditionalGeneration: ("LLaVA-OneVision", LlavaOnevisionBackbone),
    }
    for cls, (name, adapter) in tiled.items():
        if isinstance(model, cls):
            language_model = model.config.text_config.model_type
            if language_model not in ROTARY_LANGUAGE_MODELS:
                raise TypeError(f"unsupported {name} language model '{language_model}': freevlm supports {SUPPORTED}")
            return adapter(model)
    if isinstance(model, (SmolVLMForConditionalGeneration, Idefics3ForConditionalGeneration)):
        language_model = model.config.text_config.model_type
        if language_model not in ROTARY_LANGUAGE_MODELS:
            raise TypeError(
                f"unsupported {type(model).__name__} language model '{language_model}': freevlm supports {SUPPORTED}"
            )
        return Idefics3Backbone(model)

    blip = {
        Blip2ForConditionalGeneration: (Blip2OPTBackbone, Blip2T5Backbone),
        InstructBlipForConditionalGeneration: (InstructBlipOPTBackbone, InstructBlipT5Backbone),
    }
    if not isinstance(model, (*blip, LlavaForConditionalGeneration)):
        raise TypeError(
            f"freevlm does not support {type(model).__name__}: it supports {SUPPORTED}. Load one with its "
            "from_pretrained(local_path)."
        )
    model_type = model.config.text_config.model_type
    if isinstance(model, LlavaForConditionalGeneration):
        if model_type not in ROTARY_LANGUAGE_MODELS:
            raise TypeError(f"unsupported LLaVA language model '{model_type}': freevlm supports {SUPPORTED}")
        return LlavaBackbone(model)
    opt, t5 = next(adapters for cls, adapters in blip.items() if isinstance(model, cls))
    if model_type == "opt":
        return opt(model)
    if model_type in T5_TYPES:
        return t5(model)
    if isinstance(model, InstructBlipForConditionalGeneration) and model_type in ROTARY_LANGUAGE_MODELS:
        return InstructBlipRotaryBackbone(model)
    raise TypeError(f"unsupported {type(model).__name__} language model '{model_type}': freevlm supports {SUPPORTED}")


__all__ = ["Backbone", "Blip2Backbone", "Context", "load_backbone"]
