"""InstructBLIP: BLIP-2 whose Q-Former also reads the instruction, with an OPT, a T5 or a Llama-like (Vicuna)
language model.

Only the image path differs from BLIP-2 (the Q-Former attends over its query tokens *and* the instruction, given in
the Q-Former's own vocabulary), so these adapters are the BLIP-2 ones with another `image_features` (and, for
Vicuna, BLIP-2's prompt layout in front of the rotary decoder of `rotary.py`). The instruction is not part of
the language model's prompt: it is one of the request's model inputs (`input_names`), taken by `generate` as Hugging
Face's does and carried by a training batch:

    ee.generate(**processor(images=image, text=prompt, return_tensors="pt"))  # qformer_input_ids among them
"""

from __future__ import annotations

import torch

from .base import Blip2Backbone
from .blip2_opt import Blip2OPTBackbone
from .blip2_t5 import Blip2T5Backbone
from .rotary import RotaryDecoder


class InstructBlipImagePath:
    """The Q-Former conditioned on the instruction (mixed in before a BLIP-2 adapter)."""

    input_names = ("qformer_input_ids", "qformer_attention_mask")

    def image_features(
        self,
        pixel_values: torch.Tensor,
        qformer_input_ids: torch.Tensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Follows Hugging Face's `InstructBlipModel.get_image_features`, one instruction row per image."""
        if qformer_input_ids is None:
            raise ValueError(
                "InstructBLIP's Q-Former reads the instruction: pass qformer_input_ids (and qformer_attention_mask), "
                "both from the model's processor"
            )
        ids = qformer_input_ids
        mask = torch.ones_like(ids) if qformer_attention_mask is None else qformer_attention_mask
        batch = pixel_values.shape[0]
        if ids.shape[0] != batch:
            raise ValueError(f"the instruction has {ids.shape[0]} rows for {batch} images: give one per image")
        ids, mask = ids.to(pixel_values.device), mask.to(pixel_values.device)
        model = self.model
        image_embeds = model.vision_model(pixel_values, return_dict=True).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query_tokens = model.query_tokens.expand(batch, -1, -1)
        query_mask = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query_output = model.qformer(
            input_ids=ids,
            attention_mask=torch.cat([query_mask, mask], dim=1),
            query_embeds=query_tokens,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            return_dict=True,
        ).last_hidden_state[:, : query_tokens.shape[1]]
        return model.language_projection(query_output)


class InstructBlipOPTBackbone(InstructBlipImagePath, Blip2OPTBackbone):
    """`InstructBlipForConditionalGeneration` with an OPT language model."""


class InstructBlipT5Backbone(InstructBlipImagePath, Blip2T5Backbone):
    """`InstructBlipForConditionalGeneration` with a T5 / FlanT5 language model."""


class InstructBlipRotaryBackbone(InstructBlipImagePath, RotaryDecoder, Blip2Backbone):
    """`InstructBlipForConditionalGeneration` with a Llama-like language model (Vicuna: Llama)."""
