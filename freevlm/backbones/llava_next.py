"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): LLaVA with each image cut into patches at the resolution of the
grid that fits it best (`image_grid_pinpoints`), plus a downscaled view, before a Llama, Mistral or Qwen2 decoder.

`pixel_values` is `[images, patches, channels, height, width]` (padded to the batch's most patches) and
`image_sizes` `[images, 2]` gives each image's size, which decides how many patches are real and how many features
the image gives (Hugging Face's `get_image_features` unpads and adds a newline feature per row of patches). The
features replace the image tokens in order, as Hugging Face's placeholder scatter does; the LM is LLaVA's.
"""

from __future__ import annotations

import torch

from .llava import LlavaBackbone


class LlavaNextBackbone(LlavaBackbone):
    """A `LlavaNextForConditionalGeneration`, one image per prompt row; its requests take the processor's
    `image_sizes`."""

    name = "LLaVA-NeXT"
    input_names = ("image_sizes",)
    pixel_layout = "tiles"

    def stage1_parts(self) -> dict[str, list]:
        """LLaVA's, the newline feature with the projector (both map the tower's features into the LM)."""
        parts = super().stage1_parts()
        parts["projection"].append(self.model.model.image_newline)
        return parts

    def check_inputs(self, pixel_values, input_ids, attention_mask, inputs: dict) -> None:
        """`image_sizes`: present, one (height, width) per image."""
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise ValueError(
                f"{self.name} needs image_sizes (each image's height and width, from its processor): they decide "
                "which patches are real and how many features each image gives"
            )
        if not isinstance(sizes, torch.Tensor) or tuple(sizes.shape) != (pixel_values.shape[0], 2):
            got = tuple(sizes.shape) if isinstance(sizes, torch.Tensor) else type(sizes).__name__
            raise ValueError(f"image_sizes must be [images, 2] ({pixel_values.shape[0]}, 2), got {got}")

    def image_prompt_embeds(self, pixel_values, input_ids, attention_mask, image_sizes=None):
        """The image tokens take the images' features in order; a total that is not the features' is refused
        (Hugging Face checks the same)."""
        cfg = self.config
        features = self.model.model.get_image_features(
            pixel_values,
            image_sizes,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        ).pooler_output
        features = torch.cat(features) if isinstance(features, (list, tuple)) else features
        is_image = input_ids == cfg.image_token_index
        if int(is_image.sum()) != len(features):
            raise ValueError(
                f"input_ids hold {int(is_image.sum())} image token(s) (id {cfg.image_token_index}; per row: "
                f"{is_image.sum(dim=1).tolist()[:8]}) but the images give {len(features)} features (image_sizes "
                f"{image_sizes.tolist()[:8]}): build prompts with the model's processor"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.text.embed_tokens(input_ids)
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.device, embeds.dtype))
        return input_ids, embeds, attention_mask
