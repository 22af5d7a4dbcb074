"""BLIP-2 with a T5 / FlanT5 (encoder-decoder) language model.

The image tokens and the prompt go through the encoder once; exits sit on the *decoder* blocks. Decoder
self-attention uses T5's relative position bias, which only block 0 owns: we compute it from block 0 once per window
of slots, for every layer call (exit blocks included), instead of threading it from layer to layer. Cross-attention
K/V of each decoder block (and exit block) are projected once from the encoder output and reused at every step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.t5.modeling_t5 import (
    T5Attention,
    T5Block,
    T5DenseActDense,
    T5DenseGatedActDense,
    T5LayerCrossAttention,
    T5LayerFF,
    T5LayerNorm,
    T5LayerSelfAttention,
)

from ..cache_utils import KVView
from .base import Blip2Backbone, Context, cache_keyword, plain_layer
from .kv_stack import KVInput

try:  # Hugging Face's superposition of T5's position bias and a bool mask, as its SDPA attention makes it per call
    from transformers.integrations.sdpa_attention import create_position_bias_mask
except ImportError:  # a release without it: every layer goes through Hugging Face's own call
    create_position_bias_mask = None


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
    encoder_decoder = True

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.decoder = self.lm.decoder
        self.layers = self.decoder.block

    @property
    def hidden_size(self) -> int:
        return self.lm.config.d_model

    def start(
        self, pixel_values, input_ids, attention_mask, max_new_tokens, decoder_input_ids=None, **inputs
    ) -> Context:
        input_ids, embeds, attention_mask = self.image_prompt_embeds(pixel_values, input_ids, attention_mask, **inputs)
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

    @staticmethod
    def _project_cross(layer: T5Block, enc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attn = layer.layer[1].EncDecAttention
        shape = (*enc.shape[:-1], attn.n_heads, attn.key_value_proj_dim)
        return attn.k(enc).view(shape).transpose(1, 2), attn.v(enc).view(shape).transpose(1, 2)

    def _cross_kv(self, layer: T5Block, ctx: Context, rows):
        """Cross-attention K/V of `layer` over the encoder output, projected once per request."""
        store = ctx.extra["cross_kv"]
        key = id(layer)
        if key not in store:  # a rows context keeps every row's, a window of it uses its first rows
            store[key] = (layer, *self._project_cross(layer, ctx.extra.get("encoder_rows", ctx.extra["encoder_out"])))
        _, keys, values = store[key]
        if "rows_used" in ctx.extra:  # a window of a rows context: its rows'
            keys, values = keys[ctx.extra["rows_used"]], values[ctx.extra["rows_used"]]
        return (keys, values) if rows is None else (keys[rows], values[rows])

    # --- rows at their own slots: each row its own encoder output, its own decoder positions -------------------
    def rows_context(self, rows: int, slots: int, prompt_slots: int) -> Context:
        """Every row's encoder output (`prompt_slots` of them: image tokens + prompt) and mask, the cross K/V
        projected from them, and T5's position bias between every pair of decoder slots (a window's rows look up
        their own queries' rows of it)."""
        ctx = super().rows_context(rows, slots, prompt_slots)
        encoder_mask = torch.zeros(rows, 1, 1, prompt_slots, dtype=torch.bool, device=self.device)
        encoder_mask[..., 0] = True  # an empty row attends to something: no NaN
        bias = self.layers[0].layer[0].SelfAttention.compute_bias(slots, slots, device=self.device)
        encoder_out = torch.zeros(rows, prompt_slots, self.hidden_size, dtype=self.dtype, device=self.device)
        ctx.extra.update(
            encoder_rows=encoder_out, encoder_mask=encoder_mask, cross_kv={}, bias_table=bias[0].to(self.dtype)
        )
        return ctx

    def window_context(self, rows_ctx: Context, positions: torch.Tensor, rows: torch.Tensor | None = None) -> Context:
        """The window's rows' encoder outputs, masks and cross K/V (`rows`, or the first `len(positions)`)."""
        ctx = super().window_context(rows_ctx, positions, rows)
        pick = slice(0, positions.shape[0]) if rows is None else rows
        ctx.extra.update(
            encoder_out=rows_ctx.extra["encoder_rows"][pick],
            encoder_mask=rows_ctx.extra["encoder_mask"][pick],
            rows_used=pick,
        )
        return ctx

    def join_row(self, rows_ctx: Context, row: int, ctx: Context) -> None:
        enc, length = ctx.extra["encoder_out"][0], ctx.extra["encoder_out"].shape[1]
        room = rows_ctx.extra["encoder_rows"].shape[1]
        if length > room:
            raise ValueError(f"an encoder input of {length} slots exceeds the rows' {room}")
        rows_ctx.extra["encoder_rows"][row].zero_()[:length] = enc
        rows_ctx.extra["encoder_mask"][row, 0, 0] = False
        rows_ctx.extra["encoder_mask"][row, 0, 0, :length] = ctx.extra["encoder_mask"][0, 0, 0]
        for layer, keys, values in rows_ctx.extra["cross_kv"].values():
            new_keys, new_values = self._project_cross(layer, enc[None])
            keys[row].zero_()[:, :length] = new_keys[0]
            values[row].zero_()[:, :length] = new_values[0]

    def run_layer(self, layer, hidden, ctx, cache: KVView | None, mask, rows):
        start = 0 if cache is None else cache.start
        window = self._window_constants(ctx, rows, start, hidden, cache, mask)
        if window.self_mask is not None and plain_t5_block(layer):
            cross_kv = self._cross_kv(layer, ctx, rows)
            return t5_block_forward(layer, hidden, cache, window.self_mask, cross_kv, window.cross_mask)
        view = None
        if cache is not None:  # cross K/V come from the view, projected once per request
            view = _T5CacheView(cache, *self._cross_kv(layer, ctx, rows))
        hidden, _, _ = layer(
            hidden,
            attention_mask=mask,
            position_bias=window.bias,
            encoder_hidden_states=ctx.extra["encoder_out"],
            encoder_attention_mask=window.encoder_mask,
            encoder_decoder_position_bias=window.cross_bias,
            **{cache_keyword(type(layer)): view},
        )
        return hidden

    def _window_constants(self, ctx: Context, rows, start: int, hidden: torch.Tensor, cache, mask) -> _Window:
        """What every layer call over one window shares, made once per window instead of once per layer."""
        query_len = hidden.shape[1]
        key_len = getattr(cache, "key_length", start + query_len)  # a static cache shows every slot
        key = (start, query_len, key_len, hidden.dtype)
        memo = ctx.extra.get("window")
        if memo is not None and memo[0] is rows and memo[1] is mask and memo[2] == key:
            return memo[3]
        bias_module = self.layers[0].layer[0].SelfAttention
        positions = ctx.extra.get("positions")
        if positions is not None:  # rows at their own slots (`window_context`): each query's row of the table
            bias = ctx.extra["bias_table"][:, positions, :key_len].permute(1, 0, 2, 3).to(hidden.dtype)
        else:
            bias = bias_module.compute_bias(query_len, key_len, device=hidden.device, past_seen_tokens=start)
            bias = bias.to(hidden.dtype)
        encoder_mask = ctx.extra["encoder_mask"] if rows is None else ctx.extra["encoder_mask"][rows]
        cross_bias = hidden.new_zeros(1, bias_module.n_heads, query_len, encoder_mask.shape[-1])
        self_mask = cross_mask = None  # for the block path, which runs only with a cache (decoding)
        # as Hugging Face's SDPA attention superposes them: a bool mask, or none for a single query (not causal)
        bool_or_single = mask.dtype == torch.bool if mask is not None else query_len == 1
        if cache is not None and create_position_bias_mask is not None and bool_or_single:
            self_mask = create_position_bias_mask(bias, mask, False, hidden, hidden)
            cross_mask = create_position_bias_mask(cross_bias, encoder_mask, False, hidden, hidden)
        window = _Window(bias, cross_bias, encoder_mask, self_mask, cross_mask)
        ctx.extra["window"] = (rows, mask, key, window)
        return window

    def kv_inputs(self, layer: T5Block) -> KVInput:
        attn, norm = layer.layer[0].SelfAttention, layer.layer[0].layer_norm
        return KVInput(
            "rms", norm.variance_epsilon, norm.weight, None, attn.k, attn.v, attn.n_heads, attn.key_value_proj_dim
        )

    def final_norm(self, hidden):
        hidden = self.decoder.final_layer_norm(hidden)
        if getattr(self.lm.config, "scale_decoder_outputs", self.lm.config.tie_word_embeddings):
            hidden = hidden * (self.lm.config.d_model**-0.5)
        return hidden

    def final_norm_modules(self):
        return list(self.decoder.final_layer_norm.parameters())

    def new_layer(self) -> nn.Module:
        return T5Block(self.decoder.config, has_relative_attention_bias=False, layer_idx=0)


class _Window(NamedTuple):
    """What the layer calls over one window of slots share."""

    bias: torch.Tensor  # self-attention position bias (block 0 owns it)
    cross_bias: torch.Tensor  # cross-attention bias: zeros, as Hugging Face passes from block 0 on
    encoder_mask: torch.Tensor  # bool, the encoder slots of the window's rows
    self_mask: torch.Tensor | None  # SDPA's float mask: the bias where the bool mask lets a query see, else -inf
    cross_mask: torch.Tensor | None  # the same for cross-attention


# --- the block call of a decode step ---------------------------------------------------------------------------
# Hugging Face's T5 SDPA attention superposes the position bias and the mask in every layer call (the bias differs
# per layer in general, but T5 shares block 0's), besides three norms, two attention calls and a feed-forward as
# nested module calls. `t5_block_forward` issues the very same operations on the block's own weights with the masks
# superposed once per window, so its output is bitwise the block's (tests/test_t5_block.py); it is used only where
# that holds: an unmodified decoder block in eval mode, with SDPA attention, no hooks, not float16 (whose clamps it
# leaves out).


def _plain_modules(block: nn.Module) -> tuple[nn.Module, ...]:
    """The self-attention module first, then the block and its other submodules, if it is Hugging Face's T5
    decoder block as built, else ()."""
    if type(block) is not T5Block or not block.is_decoder or len(block.layer) != 3:
        return ()
    sublayers = (T5LayerSelfAttention, T5LayerCrossAttention, T5LayerFF)
    if any(type(sub) is not kind for sub, kind in zip(block.layer, sublayers)):
        return ()
    self_attn, cross_attn, ff = block.layer[0].SelfAttention, block.layer[1].EncDecAttention, block.layer[2]
    dense = ff.DenseReluDense
    if type(self_attn) is not T5Attention or type(cross_attn) is not T5Attention:
        return ()
    if type(dense) not in (T5DenseActDense, T5DenseGatedActDense):
        return ()
    linears = [getattr(a, name) for a in (self_attn, cross_attn) for name in "qkvo"]
    linears += [getattr(dense, name) for name in ("wi", "wi_0", "wi_1", "wo") if hasattr(dense, name)]
    norms = [sub.layer_norm for sub in block.layer]
    if any(type(m) is not nn.Linear or m.bias is not None for m in linears) or any(
        type(m) is not T5LayerNorm for m in norms
    ):
        return ()
    return (self_attn, block, *block.layer, cross_attn, dense, dense.act, *linears, *norms)


def plain_t5_block(block: nn.Module) -> bool:
    """Whether `t5_block_forward(block, ...)` is exactly `block(...)` now."""
    return plain_layer(block, _plain_modules) and block.layer[0].layer_norm.weight.dtype != torch.float16


def _norm(norm: T5LayerNorm, hidden: torch.Tensor) -> torch.Tensor:
    variance = hidden.to(torch.float32).pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + norm.variance_epsilon)
    if norm.weight.dtype in (torch.float16, torch.bfloat16):
        hidden = hidden.to(norm.weight.dtype)
    return norm.weight * hidden


def _attend(
    attn: T5Attention, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    batch, length = hidden.shape[:2]
    query = F.linear(hidden, attn.q.weight).view(batch, length, -1, attn.key_value_proj_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, dropout_p=0.0, scale=attn.scaling, is_causal=False
    )
    out = out.transpose(1, 2).contiguous().reshape(batch, length, -1).contiguous()
    return F.linear(out, attn.o.weight)


def t5_block_forward(
    block: T5Block, hidden: torch.Tensor, cache, self_mask: torch.Tensor, cross_kv: tuple, cross_mask: torch.Tensor
) -> torch.Tensor:
    """`T5Block.forward` of a decoder block (eval mode, SDPA, a cache) as its tensor operations alone; the masks
    are SDPA's superposed float masks of the window (`_Window`)."""
    self_attn, cross_attn = block.layer[0].SelfAttention, block.layer[1].EncDecAttention
    batch, length = hidden.shape[:2]
    normed = _norm(block.layer[0].layer_norm, hidden)
    kv_shape = (batch, length, -1, self_attn.key_value_proj_dim)
    keys = F.linear(normed, self_attn.k.weight).view(kv_shape).transpose(1, 2)
    values = F.linear(normed, self_attn.v.weight).view(kv_shape).transpose(1, 2)
    keys, values = cache.update(keys, values, self_attn.layer_idx)
    hidden = hidden + _attend(self_attn, normed, keys, values, self_mask)
    hidden = hidden + _attend(cross_attn, _norm(block.layer[1].layer_norm, hidden), *cross_kv, cross_mask)
    ff = block.layer[2]
    dense, normed = ff.DenseReluDense, _norm(ff.layer_norm, hidden)
    if isinstance(dense, T5DenseGatedActDense):
        inner = dense.act(F.linear(normed, dense.wi_0.weight)) * F.linear(normed, dense.wi_1.weight)
    else:
        inner = dense.act(F.linear(normed, dense.wi.weight))
    if inner.dtype != dense.wo.weight.dtype and dense.wo.weight.dtype != torch.int8:
        inner = inner.to(dense.wo.weight.dtype)
    return hidden + F.linear(inner, dense.wo.weight)
