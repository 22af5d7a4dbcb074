"""InternVL (`InternVLForConditionalGeneration`): an InternViT tower, pixel shuffle and an MLP projector in front of a
Qwen2 or Llama decoder (`rotary.py`).

Hugging Face's InternVL is LLaVA's layout under other names: `image_seq_length` image tokens (`image_token_id`,
<IMG_CONTEXT>, between <img> and </img>) per image tile take its features in order, and the LM is a plain causal
decoder. So the adapter is LLaVA's with InternVL's prompt layout. One tile per image (each prompt row one
`pixel_values` row): square images, or the processor's `crop_to_patches=False`.
"""

from __future__ import annotations

from .llava import LlavaBackbone, LlavaLayout


class InternVLBackbone(LlavaBackbone):
    """An `InternVLForConditionalGeneration` whose language model is a Qwen2 or Llama decoder."""

    @staticmethod
    def prompt_layout(config) -> LlavaLayout:
        return LlavaLayout(config, config.image_seq_length, image_token_index=config.image_token_id)
