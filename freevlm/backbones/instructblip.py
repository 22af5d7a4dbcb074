"""InstructBLIP: BLIP-2 whose Q-Former also reads the instruction, with an OPT, a T5 or a Llama-like (Vicuna)
language model.

Only the image path differs from BLIP-2 (the Q-Former attends over its query tokens *and* the instruction, given in
the Q-Former's own vocabulary), so these adapters are the BLIP-2 ones with another `image_features` (and, for
Vicuna, BLIP-2's prompt layout in front of the rotary decoder of `rotary.py`). The instruction is not part of
the language model's prompt: `generate` takes it as Hugging Face's does (`ee.generate(**processor_output)`), a
training batch carries it (`qformer_input_ids`), and any other request reads it inside `backbone.instruction(...)`:

    with ee.backbone.instruction(inputs["qformer_input_ids"], inputs["qformer_attention_mask"]):
        out = ee.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"])
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

from .base import Blip2Backbone
from .blip2_opt import Blip2OPTBackbone
from .blip2_t5 import Blip2T5Backbone
from .rotary import RotaryDecoder


class InstructBlipImagePath:
    """The Q-Former conditioned on the instruction (mixed in before a BLIP-2 adapter)."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._instruction: tuple[torch.Tensor, torch.Tensor] | None = None

    @contextmanager
    def instruction(
        self, qformer_input_ids: torch.Tensor, qformer_attention_mask: torch.Tensor | None = None
    ) -> Iterator[None]:
        """The Q-Former instruction (from the model's processor) of every request started inside the block, one
        row per image."""
        if qformer_attention_mask is None:
            qformer_attention_mask = torch.ones_like(qformer_input_ids)
        previous, self._instruction = self._instruction, (qformer_input_ids, qformer_attention_mask)
        try:
            yield
        finally:
            self._instruction = previous

    def conditioned(self, inputs: dict) -> AbstractContextManager:
        """The instruction of a batch that carries one (a training batch, a processor's output)."""
        if inputs.get("qformer_input_ids") is None:
            return nullcontext()
        return self.instruction(inputs["qformer_input_ids"], inputs.get("qformer_attention_mask"))

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Follows Hugging Face's `InstructBlipModel.get_image_features`. Rows repeated per image (beam search
        expands its inputs) take their image's instruction."""
        if self._instruction is None:
            raise ValueError(
                "InstructBLIP's Q-Former reads the instruction: start requests inside "
                "`with ee.backbone.instruction(qformer_input_ids, qformer_attention_mask):` "
                "(both from the model's processor)"
            )
        ids, mask = self._instruction
        batch = pixel_values.shape[0]
        if batch % ids.shape[0]:
            raise ValueError(f"the instruction has {ids.shape[0]} rows for {batch} images: give one per image")
        ids, mask = (t.repeat_interleave(batch // ids.shape[0], dim=0).to(pixel_values.device) for t in (ids, mask))
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
