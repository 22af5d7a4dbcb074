"""What every backbone adapter provides (`Backbone`), and what every BLIP-2 shares: the image path (ViT -> Q-Former
-> projection) and the prompt layout (`Blip2Backbone`).

A backbone adapter exposes a frozen Hugging Face vision-language model as the pieces the early-exit engine and the
trainers need: start a request (image + prompt), embed a token, run LM layer i with a cache of ours, apply the frozen
head, and build an exit layer of the LM's own class. One subclass per model and language-model family
(`blip2_opt.py`, `blip2_t5.py`, `instructblip.py`, `llava.py`).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import json
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from ..cache_utils import KVView
from .kv_stack import KVInput, KVStacks


def causal_padding_mask(key_ok: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Bool `[n, 1, q, k]` for queries at slots [start, end) over keys [0, end): causal, padding keys hidden.

    Every query may always see itself, so a padding slot's query never attends to nothing (no NaN).
    """
    device = key_ok.device
    q_pos = torch.arange(start, end, device=device)[:, None]
    k_pos = torch.arange(end, device=device)[None, :]
    mask = ((k_pos <= q_pos)[None] & key_ok[:, None, :end]) | (k_pos == q_pos)[None]
    return mask[:, None]


_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> (its modules or (), where they sit)


def plain_layer(layer: nn.Module, modules_of) -> bool:
    """Whether a family's tensor-operation version of `layer` (e.g. `opt_layer_forward`) is exactly `layer(...)`
    now. `modules_of(layer)` gives the layer's modules, its (self-)attention module first, if it is Hugging Face's layer
    as built (no subclass, no swapped submodule), else (); it is remembered per layer and asked again when a module
    it gave was replaced since. Checked at every call: eval mode, SDPA attention, no hooks."""
    memo = _PLAIN.get(layer)
    if memo is None or not all(children.get(name) is module for children, name, module in memo[1]):
        modules = modules_of(layer)
        memo = _PLAIN[layer] = (modules, _places(layer, modules))
    modules = memo[0]
    if not modules or layer.training or modules[0].config._attn_implementation != "sdpa":
        return False
    return unhooked(modules)


def _places(layer: nn.Module, modules) -> tuple:
    """(its parent's children, its name, the module) of each of `modules` below `layer`: where a swap shows."""
    parent_of = {
        id(child): (parent._modules, name)
        for parent in layer.modules()
        for name, child in parent._modules.items()
        if child is not None
    }
    return tuple((*parent_of[id(m)], m) for m in modules if m is not layer)


def unhooked(modules) -> bool:
    """No forward hook (global or on a module) and no replaced `forward` that a module call would run."""
    if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in modules)


@functools.cache
def cache_keyword(layer_class: type) -> str:
    """The keyword a Hugging Face layer takes its cache by: `cache` in current releases, `past_key_values` in
    older ones (there deprecated; passing the old name warns on every call and breaks when it is removed)."""
    params = inspect.signature(layer_class.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def decoder_positions(key_mask: torch.Tensor) -> torch.Tensor:
    """Position of every slot of a left-padded decoder-only sequence: the number of real tokens before it, as
    Hugging Face's `generate` derives it from the attention mask (padding slots get -1; no real token sees them)."""
    counts = key_mask.long()
    return torch.cumsum(counts, dim=1) * counts - 1


def prompt_key_mask(attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Which slots hold a real key, `[B, prompt + max_new_tokens]`: the prompt's (its attention mask), then every
    new token's."""
    batch, prompt_len = attention_mask.shape
    key_mask = torch.ones(batch, prompt_len + max_new_tokens, dtype=torch.bool, device=attention_mask.device)
    key_mask[:, :prompt_len] = attention_mask.bool()
    return key_mask


def check_token_types(
    key: str, types: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_token: int
) -> None:
    """A processor's per-token types (`key`: Gemma 3's `token_type_ids`, Qwen-VL's `mm_token_type_ids`) must have
    the prompt's shape, mark no video token (2) and be 1 exactly at its real image tokens: a `ValueError` naming
    `key` otherwise (the model reads its image blocks or positions from them, not from the tokens)."""
    if not isinstance(types, torch.Tensor) or types.shape != input_ids.shape:
        shape = tuple(types.shape) if isinstance(types, torch.Tensor) else type(types).__name__
        raise ValueError(f"{key} must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}")
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if bool(((types == 2) & real).any()):
        raise ValueError(f"{key} mark video tokens (2): freevlm runs vision-language models on images")
    wrong = ((types == 1) != (input_ids == image_token)) & real
    if bool(wrong.any()):
        b, slot = wrong.nonzero()[0].tolist()
        raise ValueError(
            f"{key} disagree with input_ids at row {b}, slot {slot} (type {int(types[b, slot])}, token "
            f"{int(input_ids[b, slot])}; image token id {image_token}): pass the processor's {key} with its input_ids"
        )


# frozen Hugging Face model -> {digest of a batch's inputs: Backbone.features of that batch}, only inside
# `sharing_features(model)`: the block owns its entry
_SHARED_FEATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextmanager
def sharing_features(model: nn.Module) -> Iterator[None]:
    """Within the block, `Backbone.features` runs `model` once per distinct batch: every adapter over it (each
    `EarlyExitVLM` has its own) reuses the first pass's hidden states. Exit sets trained in turn on the same batches
    then share one backbone pass per batch (the demo's six exit runs: ~0.2 s of a 0.2-0.6 s step each). Keeps every
    batch's states in memory until the block ends. Only for a frozen model: trained weights would make them stale."""
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("sharing_features needs a frozen model: some of its parameters require gradients")
    _SHARED_FEATURES[model] = {}
    try:
        yield
    finally:
        del _SHARED_FEATURES[model]


def _inputs_digest(*tensors: torch.Tensor | None) -> str:
    digest = hashlib.blake2b(str(torch.is_autocast_enabled()).encode())
    for t in tensors:
        if t is not None:
            digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Context:
    """Per-request state that does not change while decoding (image features, masks, encoder output)."""

    prompt_ids: torch.Tensor  # [B, L0] tokens the decoder starts from (returned at the front of `sequences`)
    prompt_embeds: torch.Tensor  # [B, L0, H] their input embeddings (image features scattered in)
    key_mask: torch.Tensor  # [B, capacity] bool: slot holds a real token (False for left padding)
    extra: dict = field(default_factory=dict)  # family-specific (positions, encoder output, cross K/V)

    @property
    def capacity(self) -> int:
        return self.key_mask.shape[1]


class Start(NamedTuple):
    """One request for `Backbone.start_many`: what `start` takes for it (one prompt row, no padding)."""

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    max_new_tokens: int
    inputs: dict  # the family's other model inputs (`input_names`)


class Backbone:
    """What the engine, the exits and the trainers use of a frozen model; one subclass per model and LM family.

    `model` is the user's Hugging Face model, `lm` the part that owns the vocabulary head and the generation config,
    `config` the model's config as the rest of freevlm reads it (BLIP-2's names for the prompt layout:
    `num_query_tokens` image tokens of id `image_token_index` per image, and `text_config`).
    """

    family: str = ""  # the LM family: exits are saved with it (what the engine may do is said by the flags below)
    encoder_decoder: bool = False  # the prompt goes through an encoder, the text through the decoder (T5)
    # inputs beyond image and prompt that the model's own `generate` reads (Gemma 3's `token_type_ids`, InstructBLIP's
    # Q-Former instruction): `generate` and `features` take them by name and pass them to `start` with the request
    input_names: tuple[str, ...] = ()
    # whether a layer call's work is the same for every window start, so a captured CUDA graph may replay it (T5's
    # position bias depends on the window's start slot, which a graph would freeze)
    graph_safe: bool = False
    # "images": `pixel_values` is [images, channels, height, width], checked as such before a request starts
    # (`inputs.py`); "tiles": [batch, tiles, channels, height, width], each prompt row's tiles (SmolVLM), checked as
    # images; "patches": the family's own layout (Qwen-VL's flattened patches), checked by `check_inputs`
    pixel_layout: str = "images"

    @property
    def replays_graphs(self) -> bool:
        """Whether the engines capture and replay CUDA graphs here: on CUDA, where a layer call is `graph_safe`."""
        return self.device.type == "cuda" and self.graph_safe

    def __init__(self, model: nn.Module, lm: nn.Module | None = None):
        self.model = model
        self.lm = model.language_model if lm is None else lm
        self.config = model.config

    # --- sizes -------------------------------------------------------------------------------------------------
    layers: nn.ModuleList  # the LM (decoder) layers that exits hang off

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.get_output_embeddings().weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm.get_output_embeddings().weight.device

    # --- family-specific pieces (see blip2_opt.py for an example) -----------------------------------------------
    def image_prompt_embeds(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **inputs: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embeddings of the prompt with image features in place of its image tokens.

        Returns (input_ids, inputs_embeds, attention_mask), all with the image tokens included: `inputs_embeds`
        is what the model's own `generate` feeds its language model.
        """
        raise NotImplementedError

    def images_per_row(self, input_ids: torch.Tensor, **inputs) -> list[int]:
        """How many `pixel_values` rows each prompt row reads, in order: one here (beam search repeats each row's
        images with it; Gemma 3 and InternVL count them from the image tokens, `llava.ImageGroups`; LLaVA-OneVision
        reads its `batch_num_images` among the request's `inputs`)."""
        return [1] * input_ids.shape[0]

    def check_inputs(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor | None, attention_mask, inputs: dict
    ) -> None:
        """Refuse, with a `ValueError` naming the input, a family's inputs (`input_names`) that are missing or
        disagree with the image and prompt; run before any layer does. Nothing to check here."""

    def beam_inputs(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, inputs: dict, k: int
    ) -> tuple[torch.Tensor, dict]:
        """Each prompt row's images and other inputs once per beam, as Hugging Face's `generate` expands them:
        [A, B] -> [A, B, A, B] for a row holding two images (it encodes images before expanding; repeating image
        by image would give [A, A, B, B])."""
        per_row = self.images_per_row(input_ids, **inputs)
        starts = [0, *itertools.accumulate(per_row)]
        index = [i for b in range(len(per_row)) for _ in range(k) for i in range(starts[b], starts[b + 1])]
        pixel_values = pixel_values.index_select(0, torch.tensor(index, device=pixel_values.device))
        return pixel_values, {name: value.repeat_interleave(k, dim=0) for name, value in inputs.items()}

    def start(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        max_new_tokens: int,
        decoder_input_ids: torch.Tensor | None = None,
        **inputs: torch.Tensor,
    ) -> Context:
        """Encode image + prompt (and the request's other `inputs`, `input_names`); the context's slots hold the
        prompt and up to `max_new_tokens` new tokens.

        As here for decoder-only LMs (the prompt starts the decoder's own sequence; positions count real tokens);
        encoder-decoder families override it."""
        input_ids, embeds, attention_mask = self.image_prompt_embeds(pixel_values, input_ids, attention_mask, **inputs)
        key_mask = prompt_key_mask(attention_mask.to(embeds.device), max_new_tokens)
        return Context(input_ids, embeds, key_mask, {"positions": decoder_positions(key_mask)})

    def start_many(self, requests: list[Start]) -> list[Context]:
        """The contexts of several requests, each what `start` gives it alone (batch 1): one `start` each here;
        BLIP-2 and LLaVA encode the images of the requests that can share a call in one (`_start_stacked`)."""
        return [self.start(r.pixel_values, r.input_ids, None, r.max_new_tokens, **r.inputs) for r in requests]

    def _start_stacked(self, requests: list[Start], encode) -> list[Context]:
        """`start_many` where `encode(pixel_values)` gives stacked images' features `[images, tokens, H]`, each image's
        what it gives alone, and `start` takes a request's as `image_features`: the requests with one image of the
        first one's size and no other inputs share one call, the others start alone."""
        shape = requests[0].pixel_values.shape
        shared = [i for i, r in enumerate(requests) if r.pixel_values.shape == shape and shape[0] == 1 and not r.inputs]
        if len(shared) < 2:
            return Backbone.start_many(self, requests)
        features = dict(zip(shared, encode(torch.cat([requests[i].pixel_values for i in shared]))))
        contexts = []
        for i, r in enumerate(requests):
            given = {"image_features": features[i][None]} if i in features else {}
            contexts.append(self.start(r.pixel_values, r.input_ids, None, r.max_new_tokens, **r.inputs, **given))
        return contexts

    # --- rows at their own slots (continuous batching: freevlm/serving) -------------------------------------------
    def rows_context(self, rows: int, slots: int, prompt_slots: int) -> Context:
        """What a batch of `rows` independent requests keeps per row besides K/V (`slots` per row, prompts of up to
        `prompt_slots`): nothing for decoder-only LMs, whose rows need only their K/V and positions."""
        device = self.device
        empty = torch.zeros(rows, 0, dtype=torch.long, device=device)
        key_mask = torch.ones(rows, slots, dtype=torch.bool, device=device)
        return Context(empty, empty[..., None].to(self.dtype), key_mask, {})

    def join_row(self, rows_ctx: Context, row: int, ctx: Context) -> None:
        """Row `row` of a `rows_context` takes over the per-row state of request `ctx` (batch 1)."""

    def prompt_in_rows(self, ctx: Context) -> bool:
        """Whether request `ctx`'s prompt slots may run in a window of rows (`window_context`: several requests'
        prompts in one layer call) exactly as in its own context: where a slot's position is its slot and the mask
        causal, as in decoder-only LMs. Gemma 3's images see themselves both ways, Qwen-VL's positions are not
        slots, T5's prompt is the encoder's: they run in their own."""
        return not self.encoder_decoder

    def prefill_cut(self, ctx: Context, end: int) -> int:
        """Where a chunk of request `ctx`'s prompt, encoded before the rest (continuous batching), may end, at or
        after slot `end`: anywhere here (Gemma 3: never inside an image, whose tokens see each other both ways)."""
        return end

    def window_context(self, rows_ctx: Context, positions: torch.Tensor, rows: torch.Tensor | None = None) -> Context:
        """The context of one window of a `rows_context` whose rows sit at their own slots: `positions [B, q]` is
        each query's slot (= its position: rows hold no padding; kept as `slots` too, for sliding windows), of the
        rows `rows [B]` of the rows context (None: its first B). Layers run over it with a cache whose `start` is 0
        and `rows=None`; a fresh one per window, since adapters memoise per-window constants in it."""
        extra = {**rows_ctx.extra, "positions": positions, "slots": positions}
        return Context(rows_ctx.prompt_ids, rows_ctx.prompt_embeds, rows_ctx.key_mask, extra)

    def embed_prompt(self, ctx: Context) -> torch.Tensor:
        """Hidden states entering layer 0 for every prompt slot, `[B, L0, H]`."""
        raise NotImplementedError

    def embed(self, ctx: Context, token_ids: torch.Tensor, rows: torch.Tensor | None, start: int) -> torch.Tensor:
        """Hidden states entering layer 0 for new tokens `[n, q]` at slots `[start, start + q)` of `rows`."""
        raise NotImplementedError

    def run_layer(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        ctx: Context,
        cache: KVView | None,
        mask: torch.Tensor | None,
        rows: torch.Tensor | None,
    ) -> torch.Tensor:
        """One LM (or exit) layer over slots `[cache.start, cache.start + q)`; `mask` is bool `[n, 1, q, k]`.

        Without a cache the layer sees just `hidden` (slots from 0), as in training.
        """
        raise NotImplementedError

    def run_layer_at(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        ctx: Context,
        cache: KVView,
        mask: torch.Tensor,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        """`run_layer(layer, hidden, ctx, cache, mask, None)[keep]`: every query row's K/V written, the output read
        at rows `keep` only (a decode step's new slots, where caught-up slots need only their K/V: at an exit layer,
        at the last layer). Here by running the layer; a family that can skip the others' attention and MLP does."""
        return self.run_layer(layer, hidden, ctx, cache, mask, None)[keep]

    def ragged_layers(self) -> bool:
        """Whether `run_layer_ragged` runs every LM layer now, exactly as `run_layer` would (continuous batching then
        packs a decode step's slots and joining prompts' chunks into one call per layer); here never."""
        return False

    def run_layer_ragged(
        self, layer: nn.Module, hidden: torch.Tensor, ctx: Context, cache, keep: torch.Tensor | None
    ) -> torch.Tensor:
        """One LM layer over the packed query slots of several rows, `hidden [m, H]`, each at its own (row, slot):
        every per-slot operation (norms, linears, MLP) once over all `m`, `cache.write(keys, values)` with
        `[m, heads, head_dim]`, attention by `cache.attend(queries, scale)` (per group of slots, over views of their
        rows' buffers: `serving.row_kv.RaggedView`). With `keep`, the output `[len(keep), H]` only at those slots."""
        raise NotImplementedError

    def fill_kv(self, layer: nn.Module, hidden: torch.Tensor, ctx: Context, cache: KVView, mask: torch.Tensor) -> None:
        """Write into `cache` only what `run_layer(layer, hidden, ctx, cache, mask, None)` writes there, where no one
        reads the layer's output (an exit layer's prompt slots: later queries read only their K/V). Here by running
        the layer; a family that can project just the K/V, bitwise as its layer does, skips attention and MLP."""
        self.run_layer(layer, hidden, ctx, cache, mask, None)

    def features(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        **inputs: torch.Tensor,
    ) -> tuple[list[torch.Tensor], Context, torch.Tensor]:
        """Hidden states h_0..h_N (before the final norm) of the whole sequence in one pass, for training.

        Decoder-only: `input_ids` is prompt + target (teacher forcing). Encoder-decoder: `input_ids` is the prompt
        and `decoder_input_ids` the shifted target; `inputs` are the family's others (`input_names`). Returns
        (hidden states, context, attention mask) so exit layers can be run over `hidden[i]` with
        `run_layer(exit, hidden[i], ctx, None, mask, None)`.
        """
        shared = _SHARED_FEATURES.get(self.model)
        key = ""
        if shared is not None:
            key = _inputs_digest(
                pixel_values, input_ids, attention_mask, decoder_input_ids, *(inputs[k] for k in sorted(inputs))
            )
        if shared is not None and key in shared:
            return shared[key]
        ctx = self.start(pixel_values, input_ids, attention_mask, 0, decoder_input_ids, **inputs)
        hidden = self.embed_prompt(ctx)
        mask = causal_padding_mask(ctx.key_mask, 0, hidden.shape[1])
        states = [hidden]
        for layer in self.layers:
            hidden = self.run_layer(layer, hidden, ctx, None, mask, None)
            states.append(hidden)
        if shared is not None:
            shared[key] = (states, ctx, mask)
        return states, ctx, mask

    def kv_inputs(self, layer: nn.Module) -> KVInput | None:
        """What `layer`'s self-attention K/V read, where that is an affine of a normalisation every layer shares
        (then propagate stacks all layers into one matmul); None where it is not (rotary keys): override
        `kv_projection` and `kv_parameters` then."""
        return None

    def kv_projection(
        self, layer: nn.Module, hidden: torch.Tensor, ctx: Context, rows: torch.Tensor | None, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Only the self-attention K/V a layer would cache for `hidden` at slots `[start, start + q)` of `rows`
        (CALM-style state propagation; the slots matter where keys carry their position, as with rotary ones)."""
        if self.kv_inputs(layer) is None:
            raise NotImplementedError(f"{type(self).__name__} needs kv_inputs or kv_projection")
        return self.kv_projections([layer], 0, hidden, ctx, rows, start)[0]

    @functools.cached_property
    def _kv_stacks(self) -> KVStacks:
        return KVStacks()

    def kv_projections(
        self,
        layers: list[nn.Module],
        first: int,
        hidden: torch.Tensor,
        ctx: Context,
        rows: torch.Tensor | None,
        start: int,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """K/V of `layers[first:]` for one hidden state (propagate fills every layer above an exit): one stacked
        matmul where every layer's `kv_inputs` is known (`kv_stack.py`; the stack is shared by every `first`),
        else layer by layer."""
        stack = self._kv_stacks.get(layers, self.kv_inputs)
        if stack is None:
            return [self.kv_projection(layer, hidden, ctx, rows, start) for layer in layers[first:]]
        return stack.project(hidden, first)

    def propagated_kv(
        self,
        depth: int,
        exit_layers: dict[int, nn.Module],
        hidden: torch.Tensor,
        ctx: Context,
        rows: torch.Tensor | None,
        start: int,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """What kv="propagate" fills when tokens leave at exit `depth`, all projected from their state `hidden`
        there: the K/V of every LM layer from `depth` up, then of every exit layer deeper than `depth`
        (`exit_layers`: the exits with caches, depth -> layer, in depth order), in that order."""
        out = self.kv_projections(list(self.layers), depth, hidden, ctx, rows, start)
        layers = list(exit_layers.values())
        deeper = sum(1 for i in exit_layers if i > depth)
        if deeper:
            out += self.kv_projections(layers, len(layers) - deeper, hidden, ctx, rows, start)
        return out

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        """The frozen final norm (and anything between it and the head)."""
        raise NotImplementedError

    @property
    def lm_head(self) -> nn.Linear:
        return self.lm.get_output_embeddings()

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits from features taken before the final norm (the classifier C_N of the paper)."""
        return self.lm_head(self.final_norm(hidden))

    def new_layer(self) -> nn.Module:
        """A fresh layer of the LM's own class and config (for exits)."""
        raise NotImplementedError

    def head_parameters(self) -> int:
        """Parameters touched to turn features into logits (norm + head), for speed accounting."""
        return sum(p.numel() for p in self.final_norm_modules()) + self.lm_head.weight.numel()

    def final_norm_modules(self) -> list[nn.Parameter]:
        return []

    def stage1_parts(self) -> dict[str, list[nn.Module | nn.Parameter]]:
        """What stage-1 fine-tuning can train, by part: "vision", "qformer", "projection", "lm" (modules, or bare
        parameters such as BLIP-2's query tokens). A part the family lacks is left out (LLaVA has no Q-Former),
        so the trainer never needs the model's parameter names."""
        raise NotImplementedError

    def kv_parameters(self, layer: nn.Module) -> int:
        """Parameters touched by `kv_projection`."""
        inputs = self.kv_inputs(layer)
        if inputs is None:
            raise NotImplementedError(f"{type(self).__name__} needs kv_inputs or kv_parameters")
        return sum(t.numel() for t in inputs.tensors())

    # --- identity ----------------------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """What exits trained on this backbone depend on: the LM's architecture and a digest of its weights.

        The digest (mean |w| per LM layer and of the head) survives dtype casts and device moves but not a
        different checkpoint.
        """
        text_cfg = self.config.text_config.to_dict()
        ignored = {"transformers_version", "dtype", "torch_dtype"}  # a cast or a save/load round trip changes these
        arch = {k: text_cfg.get(k) for k in sorted(text_cfg) if not k.startswith("_") and k not in ignored}
        arch = {k: v for k, v in arch.items() if isinstance(v, (int, float, str, bool, type(None)))}
        with torch.no_grad():
            digest = [float(p.float().abs().mean()) for p in (self.layers[0].parameters())] + [
                float(self.layers[-1].parameters().__next__().float().abs().mean()),
                float(self.lm_head.weight.float().abs().mean()),
            ]
        arch_hash = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return {
            "family": self.family,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.lm_head.weight.shape[0],
            "architecture_hash": arch_hash,
            "weight_digest": digest,
        }


class Blip2Backbone(Backbone):
    """A `Blip2ForConditionalGeneration`; subclasses fill in the language-model family."""

    def stage1_parts(self) -> dict[str, list[nn.Module | nn.Parameter]]:
        """BLIP-2's (and InstructBLIP's) parts; the LM's includes its head."""
        m = self.model
        return {
            "vision": [m.vision_model],
            "qformer": [m.qformer, m.query_tokens],
            "projection": [m.language_projection],
            "lm": [m.language_model],
        }

    def check_inputs(self, pixel_values, input_ids, attention_mask, inputs: dict) -> None:
        """A prompt that holds image tokens holds `num_query_tokens` of them in every row, as the processor lays
        them out (none at all: they are put in front); another count would misplace the image's features."""
        token, per_image = self.config.image_token_index, self.config.num_query_tokens
        if input_ids is None or token is None:
            return
        counts = (input_ids == token).sum(dim=1).tolist()
        wrong = [b for b, n in enumerate(counts) if n != per_image]
        if any(counts) and wrong:
            b = wrong[0]
            raise ValueError(
                f"prompt row {b} holds {counts[b]} image token(s) (id {token}) in input_ids but its image gives "
                f"{per_image} features: build prompts with the model's processor, or leave the image tokens out "
                "(they are then put in front)"
            )

    def image_features(self, pixel_values: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """The projected Q-Former outputs, `[B, num_query_tokens, H]`: what replaces the image tokens."""
        model = self.model
        image_embeds = model.vision_model(pixel_values, return_dict=True).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        query_tokens = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_output = model.qformer(
            query_embeds=query_tokens,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
            return_dict=True,
        ).last_hidden_state
        return model.language_projection(query_output.to(image_embeds.dtype))

    def start_many(self, requests: list[Start]) -> list[Context]:
        """BLIP-2's images of one size go through the vision model and the Q-Former together (InstructBLIP's
        Q-Former reads each request's instruction: one `start` each)."""
        if type(self).image_features is not Blip2Backbone.image_features:
            return super().start_many(requests)
        return self._start_stacked(requests, self.image_features)

    def image_prompt_embeds(self, pixel_values, input_ids, attention_mask, image_features=None, **inputs):
        """Follows Hugging Face's `Blip2ForConditionalGeneration.generate`: the prompt carries `num_query_tokens`
        image placeholder tokens that are replaced by image features (`image_features`, computed here unless given:
        `start_many`). A prompt without them gets them prepended."""
        cfg = self.config
        if image_features is None:
            image_features = self.image_features(pixel_values, **inputs)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_token = cfg.image_token_index
        has_image_tokens = image_token is not None and bool((input_ids == image_token).any())
        if not has_image_tokens:
            fill = image_token if image_token is not None else 0
            n, q = input_ids.shape[0], cfg.num_query_tokens
            input_ids = torch.cat([input_ids.new_full((n, q), fill), input_ids], dim=1)
            attention_mask = torch.cat([attention_mask.new_ones((n, q)), attention_mask], dim=1)
        inputs_embeds = self.lm.get_input_embeddings()(input_ids)
        image_features = image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        if has_image_tokens:
            slots = (input_ids == image_token).unsqueeze(-1)
            inputs_embeds = inputs_embeds.masked_scatter(slots, image_features)
        else:
            inputs_embeds = torch.cat([image_features, inputs_embeds[:, image_features.shape[1] :]], dim=1)
        return input_ids, inputs_embeds, attention_mask
