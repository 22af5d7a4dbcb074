"""BLIP-2 with a T5 / FlanT5 (encoder-decoder) language model.

The image tokens and the prompt go through the encoder once; exits sit on the *decoder* blocks. Decoder
self-attention uses T5's relative position bias, which only block 0 owns: we compute it from block 0 for every
layer call (exit blocks included) instead of threading it from layer to layer. Cross-attention K/V of each
decoder block (and exit block) are projected once from the encoder output and reused at every step.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.t5.modeling_t5 import T5Block

from ..cache_utils import KVView
from .base import Blip2Backbone, Context, cache_keyword
from .kv_stack import KVInput


class _Always:
    """Answers every index or key with the same thing (HF looks caches up by the module's own layer_idx)."""

    def __init__(self, value):
        self.value = value

    def __getitem__(self, index):
        return self.value

    def get(self, index, default=None):
        return self.value


class _CrossKV:
    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values


class _T5CacheView(EncoderDecoderCache):
    """Self-attention K/V go to our `LayerKV`; cross-attention K/V are the precomputed ones."""

    def __init__(self, self_view: KVView, cross_keys: torch.Tensor, cross_values: torch.Tensor):  # no super(): a view
        self.self_attention_cache = self_view
        self.cross_attention_cache = _CrossKV(cross_keys, cross_values)
        self.cross_attention_cache.layers = _Always(self.cross_attention_cache)
        self.is_updated = _Always(True)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.self_attention_cache.start


class Blip2T5Backbone(Blip2Backbone):
    family = "t5"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.decoder = self.lm.decoder
        self.layers = self.decoder.block

    @property
    def hidden_size(self) -> int:
        return self.lm.config.d_model

    def start(self, pixel_values, input_ids, attention_mask, max_new_tokens, decoder_input_ids=None) -> Context:
        input_ids, embeds, attention_mask = self.image_prompt_embeds(pixel_values, input_ids, attention_mask)
        encoder_out = self.lm.get_encoder()(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        batch = input_ids.shape[0]
        if decoder_input_ids is None:
            start_id = self.lm.generation_config.decoder_start_token_id
            if start_id is None:
                start_id = self.lm.config.decoder_start_token_id
            decoder_input_ids = torch.full((batch, 1), start_id, dtype=torch.long, device=embeds.device)
        capacity = decoder_input_ids.shape[1] + max_new_tokens
        key_mask = torch.ones(batch, capacity, dtype=torch.bool, device=embeds.device)
        extra = {
            "encoder_out": encoder_out,
            "encoder_mask": attention_mask.bool()[:, None, None, :],
            "cross_kv": {},
        }
        prompt_embeds = self.decoder.embed_tokens(decoder_input_ids)
        return Context(decoder_input_ids, prompt_embeds, key_mask, extra)

    def embed_prompt(self, ctx):
        return ctx.prompt_embeds

    def embed(self, ctx, token_ids, rows, start):
        return self.decoder.embed_tokens(token_ids)

    def _cross_kv(self, layer: T5Block, ctx: Context, rows):
        """Cross-attention K/V of `layer` over the encoder output, projected once per request."""
        store = ctx.extra["cross_kv"]
        key = id(layer)
        if key not in store:
            attn = layer.layer[1].EncDecAttention
            enc = ctx.extra["encoder_out"]
            shape = (*enc.shape[:-1], attn.n_heads, attn.key_value_proj_dim)
            store[key] = (attn.k(enc).view(shape).transpose(1, 2), attn.v(enc).view(shape).transpose(1, 2))
        keys, values = store[key]
        return (keys, values) if rows is None else (keys[rows], values[rows])

    def run_layer(self, layer, hidden, ctx, cache: KVView | None, mask, rows):
        start = 0 if cache is None else cache.start
        bias, cross_bias, encoder_mask = self._window_constants(ctx, rows, start, hidden, cache)
        view = None
        if cache is not None:  # cross K/V come from the view, projected once per request
            view = _T5CacheView(cache, *self._cross_kv(layer, ctx, rows))
        hidden, _, _ = layer(
            hidden,
            attention_mask=mask,
            position_bias=bias,
            encoder_hidden_states=ctx.extra["encoder_out"],
            encoder_attention_mask=encoder_mask,
            encoder_decoder_position_bias=cross_bias,
            **{cache_keyword(type(layer)): view},
        )
        return hidden

    def _window_constants(self, ctx: Context, rows, start: int, hidden: torch.Tensor, cache):
        """Self-attention position bias (block 0 owns it), the cross-attention bias (zeros, as Hugging Face passes
        from block 0 on) and the encoder mask of `rows`: the same for every layer call over one window, so they are
        made once per window, not once per layer."""
        query_len = hidden.shape[1]
        key_len = getattr(cache, "key_length", start + query_len)  # a static cache shows every slot
        key = (rows, start, query_len, key_len, hidden.dtype)
        memo = ctx.extra.get("window")
        if memo is not None and memo[0][0] is rows and memo[0][1:] == key[1:]:
            return memo[1]
        bias_module = self.layers[0].layer[0].SelfAttention
        bias = bias_module.compute_bias(query_len, key_len, device=hidden.device, past_seen_tokens=start)
        encoder_mask = ctx.extra["encoder_mask"] if rows is None else ctx.extra["encoder_mask"][rows]
        cross_bias = hidden.new_zeros(1, bias_module.n_heads, query_len, encoder_mask.shape[-1])
        ctx.extra["window"] = (key, (bias.to(hidden.dtype), cross_bias, encoder_mask))
        return ctx.extra["window"][1]

    def kv_inputs(self, layer: T5Block) -> KVInput:
        attn, norm = layer.layer[0].SelfAttention, layer.layer[0].layer_norm
        return KVInput("rms", norm.variance_epsilon, norm.weight, None, attn.k, attn.v, attn.n_heads,
                       attn.key_value_proj_dim)  # fmt: skip

    def final_norm(self, hidden):
        hidden = self.decoder.final_layer_norm(hidden)
        if getattr(self.lm.config, "scale_decoder_outputs", self.lm.config.tie_word_embeddings):
            hidden = hidden * (self.lm.config.d_model**-0.5)
        return hidden

    def final_norm_modules(self):
        return list(self.decoder.final_layer_norm.parameters())

    def new_layer(self) -> nn.Module:
        return T5Block(self.decoder.config, has_relative_attention_bias=False, layer_idx=0)
