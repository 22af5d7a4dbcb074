"""Greedy and sampled generation on top of the early-exit engine, with Hugging Face's stopping rules and honest
stats. Each token comes from the logits of the layer its row left at, chosen by a `TokenChooser` (`sampling.py`).

`Request` is the set-up and the clock that greedy, beam and speculative search share."""

from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..backbones.base import Backbone, Context
from .config import DecodeConfig
from .engine import Engine, EngineSetup, WorkCounter, resolve_batch_policy, rows_move_together
from .general import GeneralEngine
from .policies import Copies, ExitPolicy
from .sampling import TokenChooser, make_generator
from .static import EnginePool, StaticEngine


@dataclass
class DecodeStats:
    """How a `generate` call went: where tokens left, what ran, how long it took."""

    num_layers: int
    tokens: int  # generated tokens (EOS included, padding after it excluded)
    steps: int  # forward passes (the prefill counts as the first)
    exit_histogram: dict[int, int]  # LM layer -> tokens that left there (num_layers = final layer)
    mean_layers_per_token: float  # LM layers each token ran at its own step
    analytic_speedup: float  # the paper's: N / mean(i + 1 for a token leaving at exit i, N at the final layer)
    ideal_speedup: float  # parameters touched per step by the full model over those touched by this run
    work: WorkCounter = field(default_factory=WorkCounter)
    seconds_total: float = 0.0
    seconds_prefill: float = 0.0  # image encoding + prompt (always through every layer) + first token
    seconds_decode: float = 0.0  # every later token
    speculative: dict | None = None  # drafted / accepted_drafts / verifications / acceptance_rate

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "work"}
        out["work"] = dict(self.work.__dict__)
        return out


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # [B, prompt + T] like Hugging Face's generate (T5: decoder start + T)
    exit_layers: torch.Tensor  # [B, T] LM layer each generated token left at (N = final; -1 after EOS)
    stats: DecodeStats
    engine: Engine | None = field(default=None, repr=False)  # caches, only with `return_engine=True`

    @property
    def decoder(self) -> Engine | None:
        """The old name of `engine`, kept for code written against it."""
        warnings.warn("GenerateOutput.decoder is deprecated: use .engine", DeprecationWarning, stacklevel=2)
        return self.engine


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Call:
    """One `generate` call as a search receives it: the model's parts, its options (EOS a list, pad an int) and its
    inputs (`inputs`: the model's others, `Backbone.input_names`); `engines`: the model's kept ones, or None."""

    backbone: Backbone
    exits: dict[int, nn.Module]
    policy: ExitPolicy
    config: DecodeConfig
    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    inputs: dict
    engines: EnginePool | None = None


@dataclass
class Request:
    """What every search sets up alike: the backbone's context, the engine over it, the EOS ids, and a clock
    that syncs the device before each reading (so the seconds count finished work, not queued kernels)."""

    backbone: Backbone
    ctx: Context
    engine: Engine
    eos: torch.Tensor  # EOS token ids on the device
    t0: float
    t_prefill: float | None = None

    @classmethod
    def start(cls, call: Call, slots: int | None = None) -> Request:
        """Start the clock, encode image, prompt and the model's other inputs with room for `slots` new tokens
        (default `max_new_tokens`), build the engine."""
        backbone, config = call.backbone, call.config
        _sync(backbone.device)
        t0 = time.perf_counter()
        ctx = backbone.start(
            call.pixel_values, call.input_ids, call.attention_mask, slots or config.max_new_tokens, **call.inputs
        )
        if isinstance(call.policy, Copies):
            ctx, engine = _copies(call, ctx)
        else:
            engine = build_engine(call, ctx)
        eos = torch.tensor(config.eos_token_id, dtype=torch.long, device=backbone.device)
        return cls(backbone, ctx, engine, eos, t0)

    def prefilled(self) -> None:
        """The first token is out: what ran so far (image, prompt, first token) is the prefill. Only the first
        call counts, so a search may call it on every iteration."""
        if self.t_prefill is None:
            _sync(self.backbone.device)
            self.t_prefill = time.perf_counter()

    def finish(self, exit_layers: torch.Tensor) -> DecodeStats:
        """Stop the clock; the stats of the generated tokens (`exit_layers`, -1 where none)."""
        _sync(self.backbone.device)
        t_end = time.perf_counter()
        stats = summarize(self.backbone, self.engine, exit_layers)
        stats.seconds_total, stats.seconds_prefill = t_end - self.t0, self.t_prefill - self.t0
        stats.seconds_decode = t_end - self.t_prefill
        return stats


def _copies(call: Call, ctx: Context) -> tuple[Context, Engine]:
    """The context and engine of `policy.copies` copies of the batch of `ctx`, whose image and prompt are encoded
    once: the context's rows repeated (before any layer ran, so it holds no per-window memo), and the prompt but its
    last slot run once through every layer and live exit, its caches then copied to every copy's rows."""
    batch = ctx.prompt_ids.shape[0]
    call.policy.rows_per_copy = batch
    index = torch.arange(batch, device=ctx.key_mask.device).repeat(len(call.policy.policies))
    copies = _repeat_rows(ctx, batch, index)
    engine = build_engine(call, copies)
    if engine.live and ctx.prompt_embeds.shape[1] > 1:  # else `prefill` is one pass over the whole prompt
        prefix = build_engine(replace(call, engines=None), ctx)
        prefix.encode(call.backbone.embed_prompt(ctx)[:, :-1])
        engine.take_prefix(prefix, index)
    return copies, engine


def _repeat_rows(ctx: Context, batch: int, index: torch.Tensor) -> Context:
    """`ctx` with rows `index`: every per-row tensor has its rows on dim 0 (the engines index them so, `[rows]`)."""

    def take(value):
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch:
            return value.index_select(0, index.to(value.device))
        if isinstance(value, dict):
            return {k: take(v) for k, v in value.items()}
        if isinstance(value, list):
            return [take(v) for v in value]
        return value

    return Context(take(ctx.prompt_ids), take(ctx.prompt_embeds), take(ctx.key_mask), take(ctx.extra))


def build_engine(call: Call, ctx: Context) -> Engine:
    """The one place an engine is built: the static engine wherever rows move together (on CUDA, where the adapter
    allows it, with its segments captured as graphs and kept in `call.engines`), the general one where rows are
    compacted (large batches) or speculative rows sit at different slots."""
    backbone, config = call.backbone, call.config
    batch, batch_policy = ctx.prompt_ids.shape[0], config.batch_policy
    speculative = config.mode == "speculative"
    if speculative:  # "auto" is resolved by the engine (which gates riding along), except where rows never ride
        batch_policy = resolve_batch_policy(batch_policy, batch, speculative)
    together = rows_move_together(batch_policy, batch) and (not speculative or batch == 1)
    if config.static and not together:
        raise ValueError(
            f"static=True needs rows that move together: batch_policy={config.batch_policy!r} with "
            f"{batch} rows compacts them (use 'ride_along' or 'slowest')"
        )
    setup = EngineSetup(backbone, call.exits, call.policy, config.kv, batch_policy)
    if not together or config.static is False:
        return GeneralEngine(setup, ctx)
    if call.engines is not None and backbone.replays_graphs:
        return call.engines.get(setup, ctx)
    return StaticEngine(setup, ctx)


@torch.no_grad()
def greedy_generate(call: Call) -> GenerateOutput:
    req = Request.start(call)
    backbone, config = call.backbone, call.config
    max_new_tokens, pad_token_id = config.max_new_tokens, config.pad_token_id
    ctx, engine, device = req.ctx, req.engine, backbone.device
    batch, prompt_len = ctx.prompt_ids.shape
    generated = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    exit_layers = torch.full((batch, max_new_tokens), -1, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)

    every_row = torch.arange(batch, device=device)
    chooser = None  # greedy without a penalty: the engine's argmax is the token
    if TokenChooser.needed(config):
        chooser = TokenChooser(batch, backbone.lm_head.weight.shape[0], device)
        generator = make_generator(config.seed, device)
        chooser.set(list(range(batch)), config, ctx.prompt_ids, ctx.key_mask[:, :prompt_len], generator)

    def choose(result, rows: torch.Tensor) -> torch.Tensor:
        """The token of each of `rows` from the logits of the layer it left at."""
        if chooser is None:
            return result.tokens
        tokens = chooser.choose(result.logits, rows)
        chooser.observe(rows, tokens)
        return tokens

    result = engine.prefill(backbone.embed_prompt(ctx))
    tokens = choose(result, every_row)
    generated[:, 0], exit_layers[:, 0] = tokens, result.exit_at
    done |= torch.isin(tokens, req.eos)
    req.prefilled()

    length = 1
    while length < max_new_tokens:
        finished = int(done.sum())  # the one host read of the loop
        if finished == batch:
            break
        if finished == 0:  # every row goes on: plain slices, no gathers or scatters
            x = backbone.embed(ctx, generated[:, length - 1 : length], None, prompt_len + length - 1)
            result = engine.step(every_row, x, prompt_len + length - 1, step=length)
            tokens = choose(result, every_row)
            generated[:, length], exit_layers[:, length] = tokens, result.exit_at
            done |= torch.isin(tokens, req.eos)
        else:
            rows = (~done).nonzero().squeeze(1)
            x = backbone.embed(ctx, generated[rows, length - 1 : length], rows, prompt_len + length - 1)
            result = engine.step(rows, x, prompt_len + length - 1, step=length)
            tokens = choose(result, rows)
            generated[rows, length], exit_layers[rows, length] = tokens, result.exit_at
            done[rows] |= torch.isin(tokens, req.eos)
        length += 1

    exit_layers = exit_layers[:, :length]
    stats = req.finish(exit_layers)
    sequences = torch.cat([ctx.prompt_ids, generated[:, :length]], dim=1)
    return GenerateOutput(sequences, exit_layers, stats, engine if config.return_engine else None)


def analytic_speedup(exit_layers: list[int], num_layers: int) -> float:
    """The paper's speedup: total LM layers over the mean layers used per token, an exit counting as one layer."""
    if not exit_layers:
        return 1.0
    used = [num_layers if e >= num_layers else e + 1 for e in exit_layers]
    return num_layers * len(used) / sum(used)


def calls_speedup(exit_layers: list[int], num_layers: int, exits: list[int]) -> float:
    """Layer calls per token with every exit a token consulted counted: N over the LM layers it ran plus each of
    `exits` it passed or left at (FREE's exits are layers). It is what decode costs where a call costs its weights
    (batch 1; a small model on a CPU), so an exit that lets few tokens out costs more than it saves, which the
    paper's speedup does not see; it reads only each token's exit layer, so batched runs can report it."""
    if not exit_layers:
        return 1.0
    used = [min(e, num_layers) + sum(1 for x in exits if x <= e and x < num_layers) for e in exit_layers]
    return num_layers * len(used) / sum(used)


def summarize(backbone: Backbone, engine: Engine, exit_layers: torch.Tensor) -> DecodeStats:
    n, steps = backbone.num_layers, engine.work.steps
    real = [int(e) for e in exit_layers.flatten().tolist() if e >= 0]
    full_step = engine.costs.full_step
    per_step = engine.work.params_touched / max(steps, 1)
    return DecodeStats(
        num_layers=n,
        tokens=len(real),
        steps=steps,
        exit_histogram=dict(sorted(Counter(real).items())),
        mean_layers_per_token=sum(real) / max(len(real), 1),
        analytic_speedup=analytic_speedup(real, n),
        ideal_speedup=full_step / per_step if per_step else 1.0,
        work=engine.work,
    )
