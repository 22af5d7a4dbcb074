"""The engine interface: what greedy, beam and speculative search (and a batch scheduler) drive, and what both
engines share.

An engine holds the caches and pending states of one batch. `prefill` runs the prompt and yields the first token;
each `step` runs new slots of some rows up the LM only as far as each row needs, and returns the token of each row
with the layer it left at. `crop_row` forgets a rejected draft, `reorder` moves rows (beam search); `work` counts
what really ran and `costs` what each piece costs in parameters touched.

A token that left at depth e has no K/V in layers e..N-1. With `kv="recompute"` (exact) its hidden state h_e is
kept in `pending`; when a later token of the same row goes deeper, the pending tokens join it at the depth where
they stopped and run the skipped layers together with it, so every cache ends up as the full model would have built
it. Exit layers keep caches of their own, filled the same way. With `kv="propagate"` (CALM-style, approximate) a
leaving token's K/V in the deeper layers are projected from h_e right away, so nothing is ever pending.

Two engines implement it: `GeneralEngine` (`general.py`: a fill level per row, rows compacted out as they leave)
and `StaticEngine` (`static.py`: rows move together, fixed shapes, CUDA graphs).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..backbones.base import Backbone, Context
from ..cache_utils import LayerCache
from .policies import ExitPolicy

KV_MODES = ("recompute", "propagate")
BATCH_POLICIES = ("auto", "per_row", "ride_along", "slowest")
# "auto": one row decides alone; up to this many rows ride along (gated), more compact (see `resolve_batch_policy`).
# Compaction pays only where a layer's time grows with its rows. An H200 in bf16 reads a weight in the time of ~200
# rows' math (4.8 TB/s against ~990 TFLOP/s); on our CPU at OPT-350m size compaction was 0.85x, 0.80x, 0.63x and
# 0.58x of the full model at 8, 16, 32 and 64 rows where riding along was 0.96-1.08x (`bench_batch.py --crossover`).
COMPACT_FROM_ROWS = 256


def resolve_batch_policy(batch_policy: str, batch_size: int, speculative: bool = False) -> str:
    """What "auto" means for a batch of this size (the one place it is decided).

    At small batches a layer costs what it costs for one row (it is bound by reading its weights), so taking rows
    out of a layer saves nothing: rows that left ride along (their deeper K/V get filled exactly, no catch-up later)
    behind a gate that stops consulting exits while they do not pay. Only large batches compact. Speculative rows
    sit at their own slots: there is no shared step to ride along in.
    """
    if batch_policy != "auto":
        return batch_policy
    if batch_size == 1 or speculative:
        return "per_row"
    return "ride_along" if batch_size < COMPACT_FROM_ROWS else "per_row"


def rows_move_together(batch_policy: str, batch_size: int) -> bool:
    """Whether every row runs the same layers at every step under this batch policy (the static engine's case)."""
    return batch_size == 1 or resolve_batch_policy(batch_policy, batch_size) in ("ride_along", "slowest")


@dataclass
class StepResult:
    """What one step produced for its rows (in the order they were given)."""

    tokens: torch.Tensor  # [n] greedy token of the last new slot, from the layer each row left at
    exit_at: torch.Tensor  # [n] that layer (num_layers = final)
    logits: torch.Tensor  # [n, V] the logits it came from
    # speculative verification: for rows that reached the final layer, its greedy choice at every window slot
    verified_rows: torch.Tensor | None = None  # [m] indices into the step's rows
    window_start: int = 0  # first slot of the window
    verified_tokens: torch.Tensor | None = None  # [m, window] final-layer argmax at slots window_start..


class ExitGate:
    """Rows riding along save layers only at a step where every row leaves at one exit; at small batches that is
    rare, and each exit consulted costs its layer and a vocabulary head. The gate keeps the parameters saved over the
    steps that consulted exits (negative when nothing was saved: the exits' own cost) and stops consulting while that
    total is not positive, probing again every `probe_every` steps. Parameters, not seconds: deterministic."""

    def __init__(self, full_step_params: int, probe_every: int = 16):
        self.full_step_params, self.probe_every = full_step_params, probe_every
        self.saved = 0
        self.consulted = 0

    def open(self, step: int) -> bool:
        return self.consulted == 0 or self.saved > 0 or step % self.probe_every == 0

    def record(self, params_touched: int) -> None:
        self.consulted += 1
        self.saved += self.full_step_params - params_touched


@dataclass
class ParamCosts:
    """Parameters each piece of a step touches: what `WorkCounter.params_touched` adds up (a weight-bound step
    costs what it reads)."""

    layers: list[int]  # per LM layer
    exit_layers: dict[int, int]  # per live exit: its own layer (0 for exits without one)
    exit_logits: dict[int, int]  # per live exit: what turns its features into logits
    head: int  # final norm + vocabulary head
    kv_layers: list[int]  # per LM layer: its K/V projection (propagate)
    kv_exits: dict[int, int]  # per live exit with a layer: its K/V projection

    @classmethod
    def of(cls, backbone: Backbone, exits: dict[int, nn.Module], live: list[int]) -> ParamCosts:
        count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        return cls(
            layers=[count(layer) for layer in backbone.layers],
            exit_layers={i: count(exits[i].layer) if exits[i].needs_cache else 0 for i in live},
            exit_logits={i: exits[i].logit_parameters(backbone) for i in live},
            head=backbone.head_parameters(),
            kv_layers=[backbone.kv_parameters(layer) for layer in backbone.layers],
            kv_exits={i: backbone.kv_parameters(exits[i].layer) for i in live if exits[i].needs_cache},
        )

    def propagated(self, depth: int) -> int:
        """Parameters of the K/V projections that fill every layer and exit layer above `depth`."""
        return sum(self.kv_layers[depth:]) + sum(n for i, n in self.kv_exits.items() if i > depth)

    @property
    def full_step(self) -> int:
        return sum(self.layers) + self.head


@dataclass
class WorkCounter:
    """What the engine actually ran, for speed accounting (parameters touched, not assumed)."""

    steps: int = 0  # engine steps (one per generated token in plain decoding; the prompt's last slot counts)
    layer_calls: int = 0  # backbone layer calls (any number of rows/slots each)
    exit_calls: int = 0  # exit layer calls
    head_calls: int = 0  # vocabulary head evaluations (one batched call each)
    kv_projections: int = 0  # propagate-mode K/V projections of skipped layers
    catchup_slots: int = 0  # slot-layers run for tokens caught up from an earlier step
    params_touched: int = 0


@dataclass(frozen=True)
class EngineSetup:
    """What an engine is built from besides its batch's context: the one parameter list of every engine and of
    the pool that keeps static ones (`kv_mode` and `batch_policy` as `DecodeConfig` checked them)."""

    backbone: Backbone
    exits: dict[int, nn.Module]
    policy: ExitPolicy
    kv_mode: str
    batch_policy: str


class Engine(ABC):
    """Caches and pending states of one batch; `step` runs new tokens up the stack.

    Subclasses give their cache kind (`cache_class`), `encode` and `step`; the set-up, `prefill`, the gate, the exit
    decision, state propagation, `crop_row` and `reorder` are here.
    """

    cache_class: type[LayerCache]

    def __init__(self, setup: EngineSetup, ctx: Context, slots: int | None = None):
        """`slots`: cache size (default the context's)."""
        slots = slots or ctx.capacity
        backbone, exits, policy, batch_policy = setup.backbone, setup.exits, setup.policy, setup.batch_policy
        self.backbone, self.exits, self.policy, self.kv_mode, self.ctx = backbone, exits, policy, setup.kv_mode, ctx
        self.num_layers = backbone.num_layers
        self.batch_size = ctx.prompt_ids.shape[0]
        self.batch_policy = resolve_batch_policy(batch_policy, self.batch_size)
        self.live = sorted(policy.live_exits(sorted(exits)))
        self.kv = [self.cache_class(self.batch_size, slots) for _ in range(self.num_layers)]
        self.exit_kv = {i: self.cache_class(self.batch_size, slots) for i in self.live if exits[i].needs_cache}
        self.pending: torch.Tensor | None = None  # [B, slots, H] hidden state of each not-yet-caught-up slot
        self.exit_inputs: dict[int, torch.Tensor] = {}  # exit layer inputs kept while the gate is closed
        self.costs = ParamCosts.of(backbone, exits, self.live)
        self._gated = batch_policy == "auto" and self.batch_policy == "ride_along"
        self.work = WorkCounter()
        self.gate = ExitGate(self.costs.full_step) if self._gated else None
        self._verify: torch.Tensor | None = None  # [B] bool: rows of this step that must reach the final layer
        self._all_verify = False
        self.prompt_encoded = False  # `take_prefix` filled the caches with the prompt but its last slot

    # --- the interface ------------------------------------------------------------------------------------------
    @abstractmethod
    def encode(self, x: torch.Tensor) -> None:
        """Run prompt slots `[0, q)` of every row through every layer and every live exit layer; predict nothing.

        The prompt is encoded by the whole model (as an encoder would be); only new tokens may leave early."""

    @abstractmethod
    def step(
        self, rows: torch.Tensor, x: torch.Tensor, new_start: int, step: int, verify: list[bool] | None = None
    ) -> StepResult:
        """Run new slots `[new_start, new_start + q)` of `rows` up the stack (`step`: the generation step, which
        policies and the gate read).

        `verify` (speculative search, one flag per row): the flagged rows may not leave at an exit, and every row
        that reaches the final layer also gets its greedy choice at every slot of the window caught up with it (that
        catch-up is the verification pass)."""

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> StepResult:
        """The prompt and the first new token. With live exits, all but the last prompt slot first go through every
        layer (`encode`) and only the last slot's prediction may leave early; without, one pass does it all."""
        rows = torch.arange(self.batch_size, device=prompt.device)
        if self.live and prompt.shape[1] > 1:
            if not self.prompt_encoded:
                self.encode(prompt[:, :-1])
            return self.step(rows, prompt[:, -1:], prompt.shape[1] - 1, step=0)
        return self.step(rows, prompt, 0, step=0)

    def take_prefix(self, other: Engine, index: torch.Tensor) -> None:
        """Start from `other`'s `encode` of the prompt (another batch, the same live exits): row i takes `other`'s
        row index[i], so copies of one batch encode their prompt once; `prefill` then runs only the last slot."""
        for mine, theirs in zip(self._caches(), other._caches(), strict=True):
            mine.take_rows(theirs, index)
        self.work = replace(other.work)
        self.prompt_encoded = True

    def crop_row(self, row: int, length: int) -> None:
        """Forget slots at or after `length` of `row` in every cache (a rejected speculative draft; the static
        engine's rows move together, so there every row)."""
        for kv in self._caches():
            kv.crop(row, length)

    def reorder(self, index: torch.Tensor) -> None:
        """Rows follow `index` (beam search): caches and kept states of row index[i] move to row i, in place."""
        for kv in self._caches():
            kv.reorder(index)
        for kept in [self.pending, *self.exit_inputs.values()]:
            if kept is not None:
                kept.copy_(kept.index_select(0, index))

    # --- shared pieces of a step --------------------------------------------------------------------------------
    def _caches(self) -> list[LayerCache]:
        return [*self.kv, *self.exit_kv.values()]

    def _begin(self, step: int, rows: torch.Tensor, verify: list[bool] | None) -> bool:
        """Count the step, note what the search asked to verify; whether exits are consulted (the gate)."""
        self.work.steps += 1
        self._touched_before = self.work.params_touched
        self._consult = self.gate is None or self.gate.open(step)
        self._all_verify = verify is not None and all(verify)
        self._verify = None
        if verify is not None and any(verify):
            self._verify = torch.zeros(self.batch_size, dtype=torch.bool, device=rows.device)
            self._verify[rows] = torch.tensor(verify, device=rows.device)
        return self._consult

    def _done(self, result: StepResult) -> StepResult:
        """The step is over: the gate learns what consulting exits cost or saved."""
        if self.gate is not None and self._consult:
            self.gate.record(self.work.params_touched - self._touched_before)
        return result

    def _needs_logits(self, depth: int) -> bool:
        """Whether the exit's decision reads its logits (none is made when every row must verify)."""
        return not self._all_verify and self.policy.needs_logits(depth)

    def _decide(self, depth, logits, step, rows, hidden, out: torch.Tensor | None) -> torch.Tensor:
        """Bool `[n]`: which of `rows` leave at exit `depth` (rows in `out` left already; rows that must verify
        stay); under "slowest" all leave or none."""
        if self._all_verify:
            return torch.zeros(len(rows), dtype=torch.bool, device=rows.device)
        leave = self.policy.decide(depth, logits, step, rows, hidden)
        if self._verify is not None:
            leave = leave & ~self._verify[rows]
        if out is not None:
            leave = leave & ~out
        if self.batch_policy == "slowest":  # the step waits for its slowest row
            leave = leave & leave.all()
        return leave

    def _count_layers(self, first: int, last: int) -> None:
        self.work.layer_calls += last - first
        self.work.params_touched += sum(self.costs.layers[first:last])

    def _count_exit(self, depth: int) -> None:
        """Exit `depth` was consulted: its layer ran (where it has one)."""
        self.work.exit_calls += depth in self.exit_kv
        self.work.params_touched += self.costs.exit_layers[depth]

    def _count_head(self, depth: int | None) -> None:
        """A vocabulary head ran: the final one (None) or exit `depth`'s."""
        self.work.head_calls += 1
        self.work.params_touched += self.costs.head if depth is None else self.costs.exit_logits[depth]

    def _new_pending(self, x: torch.Tensor) -> torch.Tensor:
        if self.pending is None:
            self.pending = x.new_zeros(self.batch_size, self.kv[0].slots, x.shape[-1])
        return self.pending

    def _kept_inputs(self, depth: int, x: torch.Tensor) -> torch.Tensor:
        """Where exit `depth`'s layer inputs are kept while the gate skips it, so its cache can catch up."""
        if depth not in self.exit_inputs:
            self.exit_inputs[depth] = x.new_zeros(self.batch_size, self.kv[0].slots, x.shape[-1])
        return self.exit_inputs[depth]

    def _propagate(self, x, depth: int, rows: torch.Tensor | None, ids: list[int], lo: int) -> None:
        """Tokens of `rows` left at `depth`: fill the K/V of every deeper layer and exit layer from their state now
        (propagate mode; every cache is full below `lo`, so the new slots are the whole window)."""
        caches = [*self.kv[depth:], *(kv for i, kv in self.exit_kv.items() if i > depth)]
        exit_layers = {i: self.exits[i].layer for i in self.exit_kv}
        out = self.backbone.propagated_kv(depth, exit_layers, x, self.ctx, rows, lo)
        for cache, (keys, values) in zip(caches, out):
            cache.store(rows, ids, lo, keys, values)
        self.work.kv_projections += len(caches)
        self.work.params_touched += self.costs.propagated(depth)
