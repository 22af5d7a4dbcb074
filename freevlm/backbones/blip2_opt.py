"""BLIP-2 with an OPT (decoder-only) language model.

The prompt (image tokens + text, left-padded) is the start of the decoder's own sequence. OPT adds learned
position embeddings at the input, computed from the attention mask as Hugging Face does, so a slot's position is
the number of real tokens before it.

This is the adapter to read when adding a family: each method is the family's version of a `Backbone` piece.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.opt.modeling_opt import OPTAttention, OPTDecoderLayer

from ..cache_utils import KVView
from .base import Blip2Backbone, Context, cache_keyword, plain_layer, unhooked
from .kv_stack import KVInput


class Blip2OPTBackbone(Blip2Backbone):
    family = "opt"
    graph_safe = True  # learned positions, looked up per request: a layer call is the same at every window start

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
        if cache is not None and (mask is not None or hidden.shape[1] == 1) and plain_opt_layer(layer):
            return opt_layer_forward(layer, hidden, cache, mask)
        return layer(hidden, attention_mask=mask, **{cache_keyword(type(layer)): cache})

    def run_layer_at(self, layer, hidden, ctx, cache, mask, keep):
        if mask is not None and plain_opt_layer(layer):
            return opt_layer_forward(layer, hidden, cache, mask, keep)
        return super().run_layer_at(layer, hidden, ctx, cache, mask, keep)

    def ragged_layers(self) -> bool:
        return all(plain_opt_layer(layer) for layer in self.layers)

    def run_layer_ragged(self, layer, hidden, ctx, cache, keep):
        return opt_layer_ragged(layer, hidden, cache, keep)

    def fill_kv(self, layer, hidden, ctx, cache, mask):
        if plain_opt_layer(layer):
            opt_layer_kv(layer, hidden, cache)
        else:
            super().fill_kv(layer, hidden, ctx, cache, mask)

    def kv_inputs(self, layer: OPTDecoderLayer) -> KVInput:
        attn, norm = layer.self_attn, layer.self_attn_layer_norm
        if not layer.do_layer_norm_before:  # OPT-350m: the norm comes after attention, K/V read the raw state
            return KVInput(None, 0.0, None, None, attn.k_proj, attn.v_proj, attn.num_heads, attn.head_dim)
        return KVInput(
            "layer", norm.eps, norm.weight, norm.bias, attn.k_proj, attn.v_proj, attn.num_heads, attn.head_dim
        )

    def head(self, hidden):
        """`lm_head(final_norm(hidden))`; as its two tensor operations where the modules are plain (no hooks)."""
        norm, lm_head = self.decoder.final_layer_norm, getattr(self.lm, "lm_head", None)
        if (
            self.decoder.project_out is None
            and type(lm_head) is nn.Linear
            and type(norm) is nn.LayerNorm
            and unhooked((norm, lm_head))
        ):
            hidden = F.layer_norm(hidden, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            return F.linear(hidden, lm_head.weight, lm_head.bias)
        return super().head(hidden)

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


# --- the layer call of a decode step ---------------------------------------------------------------------------
# At the demo's size (256 wide) Hugging Face's layer call spends about a sixth of a layer's time on the CPU outside
# its tensor operations (module calls, keyword handling, the attention-function lookup). `opt_layer_forward` issues
# the very same operations on the layer's own weights, in the same order and shapes, so its output is bitwise the
# layer's (tests/test_opt_layer.py); it is used only where that holds: an unmodified OPT layer in eval mode, with
# SDPA attention, no hooks, and a mask (or one query, where Hugging Face passes none to SDPA either).


def _plain_modules(layer: nn.Module) -> tuple[nn.Module, ...]:
    """The attention module first, then the layer and its other submodules, if it is Hugging Face's OPT layer as
    built (no subclass, no swapped linear or activation, no grouped-query attention), else ()."""
    if type(layer) is not OPTDecoderLayer or type(layer.self_attn) is not OPTAttention:
        return ()
    attn = layer.self_attn
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, layer.fc1, layer.fc2)
    norms = (layer.self_attn_layer_norm, layer.final_layer_norm)
    if any(type(m) is not nn.Linear for m in linears) or any(type(m) is not nn.LayerNorm for m in norms):
        return ()
    if type(layer.activation_fn) is not nn.ReLU or hasattr(attn, "num_key_value_groups"):
        return ()
    return (attn, layer, *linears, *norms, layer.activation_fn)


def plain_opt_layer(layer: nn.Module) -> bool:
    """Whether `opt_layer_forward(layer, ...)` is exactly `layer(...)` now."""
    return plain_layer(layer, _plain_modules)


def opt_layer_kv(layer: OPTDecoderLayer, hidden: torch.Tensor, cache) -> None:
    """What `opt_layer_forward` writes into `cache`, and nothing else: the same operations up to `cache.update`."""
    attn, norm1 = layer.self_attn, layer.self_attn_layer_norm
    batch = hidden.shape[0]
    if layer.do_layer_norm_before:
        hidden = F.layer_norm(hidden, norm1.normalized_shape, norm1.weight, norm1.bias, norm1.eps)
    key = F.linear(hidden, attn.k_proj.weight, attn.k_proj.bias).view(batch, -1, attn.num_heads, attn.head_dim)
    value = F.linear(hidden, attn.v_proj.weight, attn.v_proj.bias).view(batch, -1, attn.num_heads, attn.head_dim)
    cache.update(key.transpose(1, 2), value.transpose(1, 2), attn.layer_idx)


def opt_layer_forward(
    layer: OPTDecoderLayer, hidden: torch.Tensor, cache, mask: torch.Tensor | None, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """`OPTDecoderLayer.forward` (eval mode, SDPA, bool or no mask) as its tensor operations alone; with `keep`,
    every row's K/V are written but the rest (query, attention, MLP) runs for rows `keep` only, and so does the
    output."""
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    norm1 = layer.self_attn_layer_norm
    residual = hidden
    if layer.do_layer_norm_before:
        hidden = F.layer_norm(hidden, norm1.normalized_shape, norm1.weight, norm1.bias, norm1.eps)
    key = F.linear(hidden, attn.k_proj.weight, attn.k_proj.bias).view(batch, -1, heads, head_dim).transpose(1, 2)
    value = F.linear(hidden, attn.v_proj.weight, attn.v_proj.bias).view(batch, -1, heads, head_dim).transpose(1, 2)
    key, value = cache.update(key, value, attn.layer_idx)
    if keep is not None:
        hidden, residual, key, value, mask = (t[keep] for t in (hidden, residual, key, value, mask))
        batch = len(keep)
    query = F.linear(hidden, attn.q_proj.weight, attn.q_proj.bias) * attn.scaling
    query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, scale=1.0, is_causal=False)
    out = out.transpose(1, 2).contiguous().reshape(batch, length, -1).contiguous()
    return _opt_after_attention(layer, out, residual)


def opt_layer_ragged(
    layer: OPTDecoderLayer, hidden: torch.Tensor, cache, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """`opt_layer_forward` over packed slots of several rows, `hidden [m, H]` (`Backbone.run_layer_ragged`): the
    same operations, but attention is the cache's, per group of slots over its rows' buffers."""
    attn = layer.self_attn
    slots, heads, head_dim = hidden.shape[0], attn.num_heads, attn.head_dim
    norm1 = layer.self_attn_layer_norm
    residual = hidden
    if layer.do_layer_norm_before:
        hidden = F.layer_norm(hidden, norm1.normalized_shape, norm1.weight, norm1.bias, norm1.eps)
    key = F.linear(hidden, attn.k_proj.weight, attn.k_proj.bias).view(slots, heads, head_dim)
    value = F.linear(hidden, attn.v_proj.weight, attn.v_proj.bias).view(slots, heads, head_dim)
    cache.write(key, value)
    query = F.linear(hidden, attn.q_proj.weight, attn.q_proj.bias) * attn.scaling
    out = cache.attend(query.view(slots, heads, head_dim), 1.0).reshape(slots, -1)
    if keep is not None:
        out, residual = out[keep], residual[keep]
    return _opt_after_attention(layer, out, residual)


def _opt_after_attention(layer: OPTDecoderLayer, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The rest of an OPT layer from its attention's output (heads joined): output projection, MLP, norms."""
    attn, norm1, norm2 = layer.self_attn, layer.self_attn_layer_norm, layer.final_layer_norm
    width = residual.shape[-1]
    hidden = residual + F.linear(out, attn.out_proj.weight, attn.out_proj.bias)
    if not layer.do_layer_norm_before:
        hidden = F.layer_norm(hidden, norm1.normalized_shape, norm1.weight, norm1.bias, norm1.eps)
    shape = hidden.shape
    hidden = hidden.reshape(-1, width)
    residual = hidden
    if layer.do_layer_norm_before:
        hidden = F.layer_norm(hidden, norm2.normalized_shape, norm2.weight, norm2.bias, norm2.eps)
    hidden = F.linear(torch.relu(F.linear(hidden, layer.fc1.weight, layer.fc1.bias)), layer.fc2.weight, layer.fc2.bias)
    hidden = (residual + hidden).view(shape)
    if not layer.do_layer_norm_before:
        hidden = F.layer_norm(hidden, norm2.normalized_shape, norm2.weight, norm2.bias, norm2.eps)
    return hidden
