"""Gemma 3: a SigLIP tower + pooling projector in front of Gemma 3's decoder (`Gemma3ForConditionalGeneration`).

What differs from LLaVA's Llama-like decoder lives inside Hugging Face's layer (Gemma's RMSNorm scales by
1 + weight, extra norms around the MLP, per-head query/key norms, `query_pre_attn_scalar`, attention soft-capping
where the config has it) or its embedding (scaled by sqrt(hidden) in the embedding's dtype), which we call as they
are. What the engine must do itself:

- two kinds of layers: sliding-window ("sliding_attention", its own rotary base) and global ("full_attention");
  each layer gets the cos/sin of its kind (`rotary_kind`) and sliding layers the window (`rotary.py`);
- the prompt's image tokens see every token of their own image, later ones included (Hugging Face's
  `token_type_ids` blocks, `create_masks_for_vision_model`): `prompt_mask` adds that to any window holding image
  slots, before the sliding window is applied (sliding layers: window AND (causal OR same image)). Generated tokens
  are text: causal. Only prompt windows hold image slots, and a prompt must not end with one (the processor closes
  every image with <end_of_image>), so the engine's split of the prompt (all but the last slot first) never cuts
  an image in two.

The logits are `lm_head(norm(h))`: `Gemma3ForConditionalGeneration` applies no `final_logit_softcapping` (only the
text-only `Gemma3ForCausalLM` does), and exits use the same head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

from .base import Context, check_token_types
from .llava import ImageGroups, LlavaBackbone, LlavaLayout
from .rotary import RotaryDecoder


class Gemma3Backbone(ImageGroups, RotaryDecoder):
    """A `Gemma3ForConditionalGeneration`; its requests take the processor's `token_type_ids` (1 at image tokens).
    The image path is Hugging Face's (`ImageGroups`: any number of images per prompt row)."""

    input_names = ("token_type_ids",)
    graph_safe = False  # the image overlay (`prompt_mask`) and sliding windows are cut by the window start on the host

    def __init__(self, model: nn.Module):
        super().__init__(model, lm=model)  # the whole model owns the head and the generation config
        if self.text.config.use_bidirectional_attention:
            raise ValueError(
                "this Gemma 3 has use_bidirectional_attention=True (an encoder, as EmbeddingGemma): "
                "freevlm decodes causal language models"
            )
        self.config = LlavaLayout(model.config, model.config.mm_tokens_per_image)

    stage1_parts = LlavaBackbone.stage1_parts  # LLaVA's parts, as named: the tower, the projector, the LM

    def new_layer(self) -> nn.Module:
        """A global-attention layer where the model has one: an exit sees the whole prompt, as the final layer."""
        types = self.text.config.layer_types
        index = types.index("full_attention") if "full_attention" in types else 0
        return type(self.layers[0])(self.text.config, layer_idx=index)

    # --- the prompt ----------------------------------------------------------------------------------------------
    def start(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        decoder_input_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> Context:
        """As for every decoder-only LM, plus each slot's image block (`image_blocks`: the image's index in its
        row, -1 for text, padding and new tokens) and the slots any row holds an image token at (`image_slots`)."""
        self._check_token_types(input_ids, attention_mask, token_type_ids)
        ctx = super().start(pixel_values, input_ids, attention_mask, max_new_tokens)
        blocks = get_block_sequence_ids_for_mask(token_type_ids.to(ctx.key_mask.device))
        blocks = F.pad(blocks, (0, max_new_tokens), value=-1)
        slots = (blocks >= 0).any(dim=0).nonzero().flatten().tolist()
        ctx.extra.update(image_blocks=blocks, image_slots=(slots[0], slots[-1] + 1) if slots else None)
        return ctx

    def _check_token_types(self, input_ids, attention_mask, token_type_ids) -> None:
        """The processor's `token_type_ids`: present and right (`check_token_types`); and no prompt that ends inside
        an image (its tokens would not all see each other before the first new token)."""
        image = self.config.image_token_index
        if token_type_ids is None:
            raise ValueError(
                "Gemma 3 needs token_type_ids (1 at image tokens, from its processor): its image tokens attend to "
                "each other both ways, which Hugging Face's generate reads from them"
            )
        check_token_types("token_type_ids", token_type_ids, input_ids, attention_mask, image)
        ends = (input_ids[:, -1] == image).nonzero().flatten().tolist()
        if ends:
            raise ValueError(
                f"the prompt of row {ends[0]} ends with an image token: Gemma 3's image tokens see their whole "
                "image, so the image must be closed (the processor ends it with <end_of_image>)"
            )

    # --- rows at their own slots (continuous batching) ---------------------------------------------------------------
    def rows_context(self, rows, slots, prompt_slots):
        """No image slot in any window of rows: they cover new tokens and the last prompt slot, which is text."""
        ctx = super().rows_context(rows, slots, prompt_slots)
        ctx.extra["image_slots"] = None
        return ctx

    def prompt_in_rows(self, ctx):
        """Only a prompt without images: an image's tokens see each other both ways, which a window of rows (always
        causal) does not let them."""
        return ctx.extra["image_slots"] is None

    def prefill_cut(self, ctx, end):
        """After the image that slot `end - 1` is in, if `end` is in it too: its tokens are encoded together."""
        blocks = ctx.extra["image_blocks"][0]
        block = int(blocks[end - 1])
        if block < 0 or int(blocks[end]) != block:
            return end
        return int((blocks == block).nonzero()[-1]) + 1

    # --- layers -------------------------------------------------------------------------------------------------
    def rotary_kind(self, layer):
        return layer.self_attn.layer_type

    def rotary_embedding(self, hidden, positions, layer):
        return self.text.rotary_emb(hidden, positions, layer.self_attn.layer_type)

    def prompt_mask(self, ctx, mask, rows, start, length):
        """`mask` OR same-image (Hugging Face's `blockwise_overlay`) where the window holds image slots. A window
        without a mask is one new slot with no padding, never an image slot."""
        span = ctx.extra["image_slots"]
        if mask is None or span is None or start >= span[1] or start + length <= span[0]:
            return mask
        memo = ctx.extra.get("image_mask")
        if memo is not None and memo[0] is rows and memo[1] is mask and memo[2] == (start, length):
            return memo[3]
        blocks = ctx.extra["image_blocks"] if rows is None else ctx.extra["image_blocks"][rows]
        keys = mask.shape[-1]
        key_blocks = F.pad(blocks, (0, max(keys - blocks.shape[1], 0)), value=-1)[:, :keys]
        query_blocks = blocks[:, start : start + length, None]
        same = (query_blocks == key_blocks[:, None, :]) & (query_blocks >= 0)
        result = mask | same[:, None]
        ctx.extra["image_mask"] = (rows, mask, (start, length), result)
        return result
