"""InternVL (`InternVLForConditionalGeneration`): an InternViT tower, pixel shuffle and an MLP projector in front of a
Qwen2 or Llama decoder (`rotary.py`).

Hugging Face's InternVL is LLaVA's layout under other names: `image_seq_length` image tokens (`image_token_id`,
<IMG_CONTEXT>, between <img> and </img>) per image tile take its features in order, and the LM is a plain causal
decoder. So the adapter is LLaVA's with InternVL's prompt layout, and a prompt row may read several `pixel_values`
rows (`ImageGroups`): the tiles its processor cuts an image into (`crop_to_patches`), or several images.
"""

from __future__ import annotations

from .llava import ImageGroups, LlavaBackbone, LlavaLayout


class InternVLBackbone(ImageGroups, LlavaBackbone):
    """An `InternVLForConditionalGeneration` whose language model is a Qwen2 or Llama decoder."""

    @staticmethod
    def prompt_layout(config) -> LlavaLayout:
        return LlavaLayout(config, config.image_seq_length, image_token_index=config.image_token_id)
