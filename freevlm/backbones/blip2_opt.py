"""BLIP-2 with an OPT (decoder-only) language model.

The prompt (image tokens + text, left-padded) is the start of the decoder's own sequence. OPT adds learned
position embeddings at the input, computed from the attention mask as Hugging Face does, so a slot's position is
the number of real tokens before it.

This is the adapter to read when adding a family: each method is the family's version of a `Backbone` piece.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.opt.modeling_opt import OPTDecoderLayer

from ..cache_utils import KVView
from .base import Blip2Backbone, Context, cache_keyword
from .kv_stack import KVInput


class Blip2OPTBackbone(Blip2Backbone):
    family = "opt"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.decoder = self.lm.model.decoder
        self.layers = self.decoder.layers

    @property
    def hidden_size(self) -> int:
        return self.lm.config.hidden_size

    def _add_positions(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.decoder.project_in is not None:
            embeds = self.decoder.project_in(embeds)
        return embeds + self.decoder.embed_positions(None, 0, position_ids=positions)

    def embed_prompt(self, ctx: Context) -> torch.Tensor:
        length = ctx.prompt_embeds.shape[1]
        return self._add_positions(ctx.prompt_embeds, ctx.extra["positions"][:, :length])

    def embed(self, ctx, token_ids, rows, start):
        # every slot's position embedding, looked up once per request (a copy of the table's rows: the same
        # values the lookup per step gave), so a step adds a slice
        table = ctx.extra.get("position_embeds")
        if table is None:
            positions = ctx.extra["positions"]
            table = ctx.extra["position_embeds"] = self.decoder.embed_positions(None, 0, position_ids=positions)
        table = table if rows is None else table[rows]
        embeds = self.decoder.embed_tokens(token_ids)
        if self.decoder.project_in is not None:
            embeds = self.decoder.project_in(embeds)
        return embeds + table[:, start : start + token_ids.shape[1]]

    def run_layer(self, layer, hidden, ctx, cache: KVView, mask, rows):
        return layer(hidden, attention_mask=mask, **{cache_keyword(type(layer)): cache})

    def kv_inputs(self, layer: OPTDecoderLayer) -> KVInput:
        attn, norm = layer.self_attn, layer.self_attn_layer_norm
        if not layer.do_layer_norm_before:  # OPT-350m: the norm comes after attention, K/V read the raw state
            return KVInput(None, 0.0, None, None, attn.k_proj, attn.v_proj, attn.num_heads, attn.head_dim)
        return KVInput("layer", norm.eps, norm.weight, norm.bias, attn.k_proj, attn.v_proj, attn.num_heads, attn.head_dim)

    def final_norm(self, hidden):
        if self.decoder.final_layer_norm is not None:
            hidden = self.decoder.final_layer_norm(hidden)
        if self.decoder.project_out is not None:
            hidden = self.decoder.project_out(hidden)
        return hidden

    def final_norm_modules(self):
        modules = [m for m in (self.decoder.final_layer_norm, self.decoder.project_out) if m is not None]
        return [p for m in modules for p in m.parameters()]

    def new_layer(self) -> nn.Module:
        return OPTDecoderLayer(self.lm.config, layer_idx=0)
