"""SmolVLM and Idefics3 (`SmolVLMForConditionalGeneration`, `Idefics3ForConditionalGeneration`): a SigLIP-style
tower, a pixel-shuffle connector and a Llama-like decoder (`rotary.py`; SmolLM2 and Llama 3 are Llamas).

The processor cuts each image into tiles (plus a downscaled global view), so `pixel_values` is
`[batch, tiles, channels, height, width]`: one prompt row per batch row, its tiles padded with all-zero tiles to the
batch's most, and `pixel_attention_mask` `[batch, tiles, height, width]` marks the pixels of each tile that are not
padding. Hugging Face's `get_image_features` drops the zero tiles and gives each row's features (`image_seq_len` per
tile); they replace the row's image tokens in order, as its `inputs_merger` does. The LM is a plain causal decoder,
so the adapter owns only that image path and the prompt layout.
"""

from __future__ import annotations

import torch
from torch import nn

from .llava import LlavaLayout
from .rotary import RotaryDecoder


class Idefics3Backbone(RotaryDecoder):
    """An Idefics3 or SmolVLM whose language model is a Llama, Mistral or Qwen2 decoder; its requests take the
    processor's `pixel_attention_mask` (optional, as for Hugging Face's `generate`: without it every pixel counts)."""

    input_names = ("pixel_attention_mask",)
    pixel_layout = "tiles"

    def __init__(self, model: nn.Module):
        super().__init__(model, lm=model)  # the whole model owns the head and the generation config
        per_tile = model.model.image_seq_len
        self.config = LlavaLayout(model.config, per_tile, image_token_index=model.config.image_token_id)

    def stage1_parts(self) -> dict[str, list[nn.Module]]:
        m = self.model
        return {
            "vision": [m.model.vision_model],
            "projection": [m.model.connector],
            "lm": [m.model.text_model, m.lm_head],
        }

    def check_inputs(self, pixel_values, input_ids, attention_mask, inputs: dict) -> None:
        """`pixel_attention_mask`, where given, is `[batch, tiles, height, width]` like `pixel_values`."""
        mask = inputs.get("pixel_attention_mask")
        expected = (*pixel_values.shape[:2], *pixel_values.shape[-2:])
        if mask is not None and (not isinstance(mask, torch.Tensor) or tuple(mask.shape) != expected):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                f"pixel_attention_mask must be [batch, tiles, height, width] {expected} for pixel_values of shape "
                f"{tuple(pixel_values.shape)}, got {got}"
            )

    def image_prompt_embeds(self, pixel_values, input_ids, attention_mask, pixel_attention_mask=None):
        """Each row's image tokens take the features of its real (not all-zero) tiles in order (shapes are checked
        by `check_inputs` and `inputs.py` before a request starts); a row whose image-token count is not its tiles'
        feature count is refused (Hugging Face checks only the batch's total, and would move features across rows)."""
        features = self.model.model.get_image_features(pixel_values, pixel_attention_mask).pooler_output
        if isinstance(features, torch.Tensor):  # transformers 5.17: every real tile's features, not split by row
            real_tiles = pixel_values.flatten(2).ne(0).any(dim=2).sum(dim=1)
            features = [f.reshape(-1, f.shape[-1]) for f in features.split(real_tiles.tolist())]
        features = list(features)
        image = self.config.image_token_index
        counts = (input_ids == image).sum(dim=1).tolist()
        wrong = [b for b, (n, f) in enumerate(zip(counts, features, strict=True)) if n != len(f)]
        if wrong:
            b = wrong[0]
            raise ValueError(
                f"prompt row {b} holds {counts[b]} image token(s) (id {image}) but its tiles give {len(features[b])} "
                f"features ({self.config.num_query_tokens} per tile): build prompts with the model's processor"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.text.embed_tokens(input_ids)
        slots = (input_ids == image).unsqueeze(-1)
        embeds = embeds.masked_scatter(slots, torch.cat(features).to(embeds.device, embeds.dtype))
        return input_ids, embeds, attention_mask
