"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's tiles at several resolutions, with a
SigLIP tower and a Qwen2 decoder as released, and prompt rows that may hold several images.

What differs from LLaVA-NeXT (`llava_next.py`) is all inside Hugging Face's `get_image_features`, which the adapter
calls with the arguments the model's own forward gives it: `vision_aspect_ratio` ("anyres_max_9": an image whose
unpadded features exceed that many tiles' worth is shrunk to it) and the processor's `batch_num_images` (images per
prompt row: a row of several images gets one tile per image, its base view, plus a newline feature). The features
replace the image tokens in order; the LM is LLaVA's.
"""

from __future__ import annotations

import torch

from .llava_next import LlavaNextBackbone


class LlavaOnevisionBackbone(LlavaNextBackbone):
    """A `LlavaOnevisionForConditionalGeneration` (images only: video inputs are refused by name); its requests take
    the processor's `image_sizes` and, optionally, `batch_num_images` (without it: one image per row, as for Hugging
    Face)."""

    name = "LLaVA-OneVision"
    input_names = ("image_sizes", "batch_num_images")

    def images_per_row(self, input_ids: torch.Tensor, batch_num_images: torch.Tensor | None = None, **inputs):
        """`batch_num_images`, checked: an integer tensor with a count per prompt row."""
        rows = input_ids.shape[0]
        if batch_num_images is None:
            return [1] * rows
        counts = batch_num_images
        if not isinstance(counts, torch.Tensor) or counts.is_floating_point() or tuple(counts.shape) != (rows,):
            got = tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__
            raise ValueError(
                f"batch_num_images must be an integer tensor of ({rows},), the images of each prompt row (from the "
                f"processor), got {got}"
            )
        if bool((counts < 0).any()):
            raise ValueError(f"batch_num_images must not be negative, got {counts.tolist()[:8]}")
        return counts.tolist()

    def image_prompt_embeds(self, pixel_values, input_ids, attention_mask, image_sizes=None, batch_num_images=None):
        """Each row's image tokens take its images' features in order; a row whose image-token count is not its
        images' feature count is refused (Hugging Face checks only the batch's total, and would move features across
        rows)."""
        cfg = self.config
        features = self.model.model.get_image_features(
            pixel_values,
            image_sizes,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            vision_aspect_ratio=cfg.vision_aspect_ratio,
            batch_num_images=batch_num_images,
        ).pooler_output
        per_row = self.images_per_row(input_ids, batch_num_images)
        is_image = input_ids == cfg.image_token_index
        counts = is_image.sum(dim=1).tolist()
        first = 0
        for b, (images, count) in enumerate(zip(per_row, counts, strict=True)):
            given = sum(len(f) for f in features[first : first + images])
            if count != given:
                raise ValueError(
                    f"prompt row {b} holds {count} image token(s) (id {cfg.image_token_index}) but its {images} "
                    f"image(s) give {given} features (image_sizes {image_sizes[first : first + images].tolist()}): "
                    "build prompts with the model's processor"
                )
            first += images
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.text.embed_tokens(input_ids)
        features = torch.cat(list(features)).to(embeds.device, embeds.dtype)
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), features)
        return input_ids, embeds, attention_mask
