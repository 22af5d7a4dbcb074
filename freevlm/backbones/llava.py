"""LLaVA: a vision tower + projector in front of a Llama-like decoder (Llama, Mistral, Qwen2; see `rotary.py`).

The image features replace the prompt's image tokens (the processor expands `<image>` into one token per feature,
so a prompt must hold exactly that many).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Context, Start
from .rotary import RotaryDecoder


class LlavaLayout:
    """The LLaVA config as the rest of freevlm reads it: BLIP-2's prompt layout (`num_query_tokens` image tokens of
    id `image_token_index` per image) on top of the Hugging Face config, whose every other attribute shows through."""

    def __init__(self, config, num_query_tokens: int | None, image_token_index: int | None = None):
        self._config = config
        self.num_query_tokens = num_query_tokens
        if image_token_index is not None:  # where the model's config calls it otherwise (InternVL: image_token_id)
            self.image_token_index = image_token_index

    def __getattr__(self, name: str):
        if name == "_config":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self._config, name)


def image_tokens_per_image(config) -> int:
    """Features one image gives, hence image tokens a prompt holds per image: one per patch (and the CLS token under
    the "full" feature strategy)."""
    vision = config.vision_config
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if not isinstance(size, int) or not isinstance(patch, int):
        raise TypeError(
            f"unsupported LLaVA vision tower '{vision.model_type}': freevlm needs a ViT-style config "
            "with image_size and patch_size (CLIP, SigLIP)"
        )
    return (size // patch) ** 2 + (config.vision_feature_select_strategy == "full")


def llava_image_features(model: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """Each image's projected features, `[num_query_tokens, H]`, from Hugging Face's own `get_image_features`
    (feature layer and strategy as the config says): an output object in current releases, a tensor before."""
    output = model.model.get_image_features(pixel_values=pixel_values)
    return list(getattr(output, "pooler_output", output))


class LlavaBackbone(RotaryDecoder):
    """A `LlavaForConditionalGeneration` whose language model is a Llama, Mistral or Qwen2 decoder."""

    def __init__(self, model: nn.Module):
        super().__init__(model, lm=model)  # the whole model owns the head and the generation config
        self.config = self.prompt_layout(model.config)

    @staticmethod
    def prompt_layout(config) -> LlavaLayout:
        return LlavaLayout(config, image_tokens_per_image(config))

    def stage1_parts(self) -> dict[str, list[nn.Module]]:
        """LLaVA's parts: no Q-Former; its projector is what LLaVA's own stage 1 trains."""
        m = self.model
        return {
            "vision": [m.model.vision_tower],
            "projection": [m.model.multi_modal_projector],
            "lm": [m.model.language_model, m.lm_head],
        }

    # --- the image path and the prompt ------------------------------------------------------------------------
    def start_many(self, requests: list[Start]) -> list[Context]:
        """LLaVA's images of one size go through the vision tower and the projector together (the families built
        on it with their own image path start one request at a time)."""
        if type(self).image_prompt_embeds is not LlavaBackbone.image_prompt_embeds:
            return super().start_many(requests)
        return self._start_stacked(requests, lambda pixels: torch.stack(llava_image_features(self.model, pixels)))

    def image_prompt_embeds(self, pixel_values, input_ids, attention_mask, image_features=None):
        """Follows Hugging Face's `LlavaModel.forward`: each row's image tokens take its image's features in order
        (`image_features [B, num_query_tokens, H]`, computed here unless given: `start_many`). A row whose
        image-token count is not the image's feature count is refused (Hugging Face would misplace features across
        rows or fail)."""
        cfg = self.config
        features = image_features
        if features is None:
            features = torch.stack(llava_image_features(self.model, pixel_values))
        counts = (input_ids == cfg.image_token_index).sum(dim=1).tolist()
        wrong = [b for b, n in enumerate(counts) if n != features.shape[1]]
        if wrong:
            b = wrong[0]
            raise ValueError(
                f"prompt row {b} holds {counts[b]} image token(s) (id {cfg.image_token_index}) in input_ids but its "
                f"image gives {features.shape[1]} features: build prompts with the model's processor, which expands "
                f"<image> into {features.shape[1]} tokens"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.text.embed_tokens(input_ids)
        slots = (input_ids == cfg.image_token_index).unsqueeze(-1)
        embeds = embeds.masked_scatter(slots, features.to(embeds.device, embeds.dtype))
        return input_ids, embeds, attention_mask


class ImageGroups:
    """Prompt rows that hold any number of images (Gemma 3: several images, pan-and-scan crops; InternVL: an image's
    tiles): `pixel_values` has one row per image, in prompt order, and the image tokens take their features in
    order, as Hugging Face's placeholder scatter does (mixed in before a `RotaryDecoder`, with a `LlavaLayout`)."""

    def images_per_row(self, input_ids: torch.Tensor, **inputs) -> list[int]:
        """Image tokens per row over tokens per image, rounded up (a partial image is refused by its count)."""
        counts = (input_ids == self.config.image_token_index).sum(dim=1)
        return (-(-counts // self.config.num_query_tokens)).tolist()

    def image_prompt_embeds(self, pixel_values, input_ids, attention_mask):
        """The image tokens of all rows take the images' features in order; an image token outside the vocabulary
        embeds as id 0 (Gemma 3). A row whose image-token count is not a whole number of images, or a total that is
        not the images', is refused."""
        cfg = self.config
        features = torch.cat(llava_image_features(self.model, pixel_values))  # [images * per image, H]
        is_image = input_ids == cfg.image_token_index
        counts = is_image.sum(dim=1).tolist()
        per_image = cfg.num_query_tokens
        wrong = [b for b, n in enumerate(counts) if n % per_image]
        if wrong or sum(counts) != len(features):
            b = wrong[0] if wrong else 0
            raise ValueError(
                f"input_ids hold {sum(counts)} image token(s) (id {cfg.image_token_index}; row {b}: {counts[b]}) "
                f"for {pixel_values.shape[0]} image(s) of {per_image} features each: build prompts with the "
                f"model's processor, which expands each image into {per_image} tokens"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ids = input_ids.masked_fill(is_image, 0) if cfg.image_token_index >= self.text.vocab_size else input_ids
        embeds = self.text.embed_tokens(ids)
        embeds = embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.device, embeds.dtype))
        return input_ids, embeds, attention_mask
