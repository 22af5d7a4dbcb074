"""A Llama-like decoder (Llama, Mistral, Qwen2) as the language model of a backbone: LLaVA's, InstructBLIP's.

The LM has no learned positions: every layer rotates its queries and keys by the slot's position (rotary), so each
layer call gets cos/sin for the slots of its window - a catch-up window starts below the new token and gets the
positions of the slots it covers, padding shifts every row's positions as Hugging Face's `generate` does.
Grouped-query attention, RMSNorm and the families' biases live inside the Hugging Face layers; sliding-window
attention (Mistral, Qwen2 where the config turns it on) is added to our mask per layer.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    apply_rotary_pos_emb,
    rotate_half,
)
from transformers.models.mistral.modeling_mistral import MistralAttention, MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2DecoderLayer

from ..cache_utils import KVView
from .base import Backbone, Context, cache_keyword, plain_layer

LANGUAGE_MODELS = ("llama", "mistral", "qwen2")
# rotary variants whose frequencies depend on the length seen so far: a window's cos/sin would differ from a full pass
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
# Hugging Face's layers (and their attention) whose forward `run_layer_ragged` repeats with the layer's own submodules
PLAIN_LAYERS = {
    LlamaDecoderLayer: LlamaAttention,
    MistralDecoderLayer: MistralAttention,
    Qwen2DecoderLayer: Qwen2Attention,
}


def sliding_window(layer: nn.Module) -> int | None:
    """The window a layer's attention is restricted to (None: full attention). Qwen2 sets it per layer, Mistral
    for the whole model."""
    attn = layer.self_attn
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    return getattr(attn.config, "sliding_window", None)


def _plain_modules(layer: nn.Module) -> tuple[nn.Module, ...]:
    """The attention module, then the layer, if it is one of `PLAIN_LAYERS` with its own attention class as built and
    full attention (no sliding window), else (). Its norms, projections and MLP are called as modules, so any may be
    swapped (a LoRA linear, a quantised one)."""
    attn = getattr(layer, "self_attn", None)
    if PLAIN_LAYERS.get(type(layer)) is not type(attn) or sliding_window(layer) is not None:
        return ()
    return (attn, layer)


def plain_rotary_layer(layer: nn.Module) -> bool:
    """Whether `RotaryDecoder.run_layer_ragged(layer, ...)` is exactly `layer(...)` now."""
    return plain_layer(layer, _plain_modules)


class RotaryDecoder(Backbone):
    """The LM pieces of a backbone whose language model is a Llama-like decoder; the image path (`image_prompt_embeds`)
    comes from the model's own class (LLaVA's, or BLIP-2's Q-Former path for InstructBLIP)."""

    def __init__(self, model: nn.Module, lm: nn.Module | None = None):
        super().__init__(model, lm)
        self.text = self.lm.get_decoder()  # the decoder without head: embeddings, layers, norm, rotary
        self.layers = self.text.layers
        self.family = self.text.config.model_type
        attention = self.text.config._attn_implementation
        if attention != "sdpa":  # eager would add our boolean masks to the scores, flash attention cannot take them
            raise ValueError(
                f"freevlm runs {self.family}'s layers with boolean attention masks, which the 'sdpa' "
                f"attention implementation reads; this model uses {attention!r}: load it with "
                "attn_implementation='sdpa'"
            )
        rope_type = getattr(self.text.rotary_emb, "rope_type", "default")
        rope_types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]  # Gemma 3: one per layer type
        for rope_type in rope_types:
            if rope_type in LENGTH_DEPENDENT_ROPE:
                raise NotImplementedError(
                    f"rotary scaling '{rope_type}' depends on the sequence length seen so far; "
                    f"freevlm supports the others (default, linear, llama3, yarn...)"
                )

    @property
    def hidden_size(self) -> int:
        return self.text.config.hidden_size

    def embed_prompt(self, ctx):
        return ctx.prompt_embeds

    def embed(self, ctx, token_ids, rows, start):
        return self.text.embed_tokens(token_ids)

    # --- layers -------------------------------------------------------------------------------------------------
    @property
    def graph_safe(self) -> bool:
        """A static engine's layer call reads its window's positions through the window's slot tensor
        (`StaticView.slots`), so a CUDA graph captured at one window start replays at any; sliding windows are
        still cut by the start on the host (`_windowed`)."""
        return all(sliding_window(layer) is None for layer in self.layers)

    def run_layer(self, layer, hidden, ctx, cache: KVView | None, mask, rows):
        start = 0 if cache is None else cache.start
        rope = self._rotary(ctx, rows, start, hidden, layer, getattr(cache, "slots", None))
        mask = self.prompt_mask(ctx, mask, rows, start, hidden.shape[1])
        window = sliding_window(layer)
        if window is not None:
            mask = self._windowed(ctx, mask, start, hidden.shape[1], cache, window)
        return layer(hidden, attention_mask=mask, position_embeddings=rope, **{cache_keyword(type(layer)): cache})

    def _rotary(
        self, ctx: Context, rows, start: int, hidden: torch.Tensor, layer: nn.Module, slots=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the window's slots for `rows`: the same for every layer call over one window (of one
        `rotary_kind`), so made once. `slots` (the static engine's window, a device tensor) picks the positions on
        the device; padded slots past the last position take it (their K/V are never read)."""
        key = (rows, slots, start, hidden.shape[1], hidden.dtype)
        memos = ctx.extra.setdefault("rotary", {})
        kind = self.rotary_kind(layer)
        memo = memos.get(kind)
        if memo is not None and memo[0][0] is rows and memo[0][1] is slots and memo[0][2:] == key[2:]:
            return memo[1]
        positions = ctx.extra["positions"] if rows is None else ctx.extra["positions"][rows]
        if slots is None:
            positions = positions[:, start : start + hidden.shape[1]]
        else:
            positions = positions.index_select(1, slots.clamp(max=positions.shape[1] - 1))
        rope = self.rotary_embedding(hidden, positions, layer)
        memos[kind] = (key, rope)
        return rope

    def ragged_layers(self) -> bool:
        """Hugging Face's Llama, Mistral and Qwen2 layers with full attention (`plain_rotary_layer`); not Gemma 3's
        or Qwen-VL's, whose layers (norms per head, multimodal rotary) are their own classes."""
        return all(plain_rotary_layer(layer) for layer in self.layers)

    def run_layer_ragged(self, layer, hidden, ctx, cache, keep):
        """The layer's forward (Hugging Face's, step by step) over packed slots `[m, H]`, each rotated by its own
        position (`window_context`'s, one per slot), attention the cache's (`RaggedView`)."""
        attn, slots = layer.self_attn, hidden.shape[0]
        residual = hidden
        hidden = layer.input_layernorm(hidden)
        shape = (slots, -1, attn.head_dim)
        query, key, value = (proj(hidden).view(shape) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        cos, sin = self._rotary(ctx, None, 0, hidden[:, None], layer)  # [m, 1, head_dim]: one position per slot
        query, key = apply_rotary_pos_emb(query, key, cos[:, 0], sin[:, 0])  # as the layer's attention rotates
        cache.write(key, value)
        out = cache.attend(query, attn.scaling).reshape(slots, -1)
        if keep is not None:
            out, residual = out[keep], residual[keep]
        hidden = residual + attn.o_proj(out)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def rotary_kind(self, layer: nn.Module) -> str | None:
        """Which rotary table `layer` reads: one for all layers here; Gemma 3 has one per layer type."""
        return None

    def rotary_embedding(self, hidden: torch.Tensor, positions: torch.Tensor, layer: nn.Module):
        """cos/sin at `positions` `[n, q]` for `layer` (Hugging Face's rotary module of the decoder)."""
        return self.text.rotary_emb(hidden, positions)

    def prompt_mask(self, ctx: Context, mask, rows, start: int, length: int) -> torch.Tensor | None:
        """The window's mask before any sliding window: causal over real tokens here; Gemma 3 lets a prompt's
        image tokens see each other both ways."""
        return mask

    @staticmethod
    def _windowed(ctx: Context, mask, start: int, length: int, cache, window: int) -> torch.Tensor | None:
        """`mask` with keys `window` or more slots behind the query hidden (slots, as Hugging Face counts them). A
        window of rows at their own slots (`window_context`) has each query's slot in `ctx.extra["slots"]`."""
        slots = ctx.extra.get("slots")
        if slots is not None:
            keys = torch.arange(mask.shape[-1], device=slots.device)
            return mask & (keys[None, None, :] > slots[:, :, None] - window)[:, None]
        key_length = mask.shape[-1] if mask is not None else getattr(cache, "key_length", start + length)
        if start + length <= window:  # no query is that far from any key
            return mask
        query = torch.arange(start, start + length, device=ctx.key_mask.device)[:, None]
        keys = torch.arange(key_length, device=ctx.key_mask.device)[None, :]
        near = keys > query - window
        if mask is None:  # one new slot, no padding: every key so far is visible
            return near[None, None]
        return mask & near

    def kv_projection(self, layer, hidden, ctx, rows, start):
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)
        shape = (*hidden.shape[:-1], -1, attn.head_dim)
        keys = attn.k_proj(normed).view(shape).transpose(1, 2)
        values = attn.v_proj(normed).view(shape).transpose(1, 2)
        if hasattr(attn, "k_norm"):  # Gemma 3, Qwen3: keys normalised per head before the rotation
            keys = attn.k_norm(keys)
        cos, sin = self._rotary(ctx, rows, start, hidden, layer)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return keys * cos + rotate_half(keys) * sin, values

    def kv_parameters(self, layer) -> int:
        attn = layer.self_attn
        modules = [attn.k_proj, attn.v_proj, layer.input_layernorm, getattr(attn, "k_norm", None)]
        return sum(p.numel() for m in modules if m is not None for p in m.parameters())

    def final_norm(self, hidden):
        return self.text.norm(hidden)

    def final_norm_modules(self):
        return list(self.text.norm.parameters())

    def new_layer(self) -> nn.Module:
        return type(self.layers[0])(self.text.config, layer_idx=0)
