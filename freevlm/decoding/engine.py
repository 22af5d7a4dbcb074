"""The early-exit forward pass: run a token up the LM only as far as it needs, keeping every cache correct.

One call of `GeneralEngine.step` takes the new tokens of some rows (the whole prompt at prefill, one token per
row afterwards) up the layer stack. At each live exit the policy decides per row; rows that leave are compacted out
and the layers above them do not run for them at this step.

A token that left at depth e has no K/V in layers e..N-1. With `kv="recompute"` (exact) its hidden state h_e is
kept in `pending`; when a later token of the same row goes deeper, the pending tokens join it at the depth where
they stopped and run the skipped layers together with it - one call per layer, batched along the sequence axis -
so every cache ends up as the full model would have built it. The running window of a layer call therefore covers
slots [lo, end): for each row the slots at or above its fill level are real work; slots below it (only present
because another row needed them) are computed but neither written to the cache nor used. Exit layers keep caches
of their own, filled the same way.

With `kv="propagate"` (CALM-style, approximate) a leaving token's K/V in the deeper layers are projected from h_e
right away, so nothing is ever pending.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backbones.base import Backbone, Context, causal_padding_mask
from ..cache_utils import KVView, LayerKV
from .policies import ExitPolicy

KV_MODES = ("recompute", "propagate")
BATCH_POLICIES = ("auto", "per_row", "ride_along", "slowest")
# "auto": one row decides alone; up to this many rows ride along (gated), more compact (see `resolve_batch_policy`).
# Compaction pays only where a layer's time grows with its rows. An H200 in bf16 reads a weight in the time of ~200
# rows' math (4.8 TB/s against ~990 TFLOP/s); on our CPU at OPT-350m size compaction was 0.85x, 0.80x, 0.63x and
# 0.58x of the full model at 8, 16, 32 and 64 rows where riding along was 0.96-1.08x (`bench_batch.py --crossover`).
COMPACT_FROM_ROWS = 256


def resolve_batch_policy(batch_policy: str, batch_size: int) -> str:
    """What "auto" means for a batch of this size.

    At small batches a layer costs what it costs for one row (it is bound by reading its weights), so taking rows
    out of a layer saves nothing: rows that left ride along (their deeper K/V get filled exactly, no catch-up later)
    behind a gate that stops consulting exits while they do not pay. Only large batches compact.
    """
    if batch_policy != "auto":
        return batch_policy
    if batch_size == 1:
        return "per_row"
    return "ride_along" if batch_size < COMPACT_FROM_ROWS else "per_row"


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


def propagated_kv(
    backbone: Backbone,
    exits: dict[int, nn.Module],
    cached_exits: list[int],
    depth: int,
    x: torch.Tensor,
    ctx: Context,
    rows: torch.Tensor | None,
    start: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """K/V of LM layers `depth..N-1`, then of the exit layers above `depth` (`cached_exits`: the exits with a cache,
    in layer order), projected from the state `x` that left at `depth` (propagate mode, CALM-style)."""
    out = backbone.kv_projections(list(backbone.layers), depth, x, ctx, rows, start)
    deeper = [i for i in cached_exits if i > depth]
    if deeper:
        exit_layers = [exits[i].layer for i in cached_exits]
        out += backbone.kv_projections(exit_layers, len(exit_layers) - len(deeper), x, ctx, rows, start)
    return out


class GeneralEngine:
    """Caches and pending states of one batch; `step` runs new tokens up the stack."""

    def __init__(
        self,
        backbone: Backbone,
        exits: dict[int, nn.Module],
        policy: ExitPolicy,
        kv_mode: str,
        ctx: Context,
        capacity: int,
        batch_policy: str = "per_row",
    ):
        if kv_mode not in KV_MODES:
            raise ValueError(f"kv must be one of {KV_MODES}, got {kv_mode!r}")
        if batch_policy not in BATCH_POLICIES:
            raise ValueError(f"batch_policy must be one of {BATCH_POLICIES}, got {batch_policy!r}")
        self.backbone, self.exits, self.policy, self.kv_mode, self.ctx = backbone, exits, policy, kv_mode, ctx
        self.num_layers = backbone.num_layers
        self.batch_size = ctx.prompt_ids.shape[0]
        self.batch_policy = resolve_batch_policy(batch_policy, self.batch_size)
        self.capacity = capacity
        self.live = sorted(policy.live_exits(sorted(exits)))
        self.live_set = set(self.live)
        self.kv = [LayerKV(self.batch_size, capacity) for _ in range(self.num_layers)]
        self.exit_kv = {i: LayerKV(self.batch_size, capacity) for i in self.live if exits[i].needs_cache}
        self.pending: torch.Tensor | None = None  # [B, capacity, H] hidden state of each not-yet-caught-up slot
        self.unpadded = bool(ctx.key_mask.all())
        self.work = WorkCounter()
        self.costs = ParamCosts.of(backbone, exits, self.live)
        gated = batch_policy == "auto" and self.batch_policy == "ride_along"
        self.gate = ExitGate(self.costs.full_step) if gated else None
        # inputs of exit layers skipped while the gate was closed, so their caches can catch up when it reopens
        self.exit_inputs: dict[int, torch.Tensor] = {}
        self._mask_memo: tuple | None = None

    # --- helpers ----------------------------------------------------------------------------------------------
    def attention_mask(self, rows: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
        """Bool `[n, 1, q, k]` (None where plain full attention is the same: one new slot, no padding).

        Built once per (rows, window): the layers of a step share it."""
        if end - start == 1 and self.unpadded:
            return None
        memo = self._mask_memo
        if memo is not None and memo[0] is rows and memo[1] == start and memo[2] == end:
            return memo[3]
        key_ok = self.ctx.key_mask if rows is None else self.ctx.key_mask[rows]
        mask = causal_padding_mask(key_ok, start, end)
        self._mask_memo = (rows, start, end, mask)
        return mask

    @staticmethod
    def _valid(fill: list[int], start: int, end: int, device) -> torch.Tensor | None:
        """Bool `[n, q]`: slot is real work for the row (at or above its fill level); None when all are."""
        if all(f <= start for f in fill):
            return None
        slots = torch.arange(start, end)[None, :]
        return (slots >= torch.tensor(fill)[:, None]).to(device)

    def _rows_arg(self, rows: torch.Tensor) -> torch.Tensor | None:
        return None if len(rows) == self.batch_size else rows

    def _run(self, layer, kv: LayerKV, x, rows, ids, start, end, fill) -> torch.Tensor:
        valid = self._valid(fill, start, end, x.device)
        rows_arg = self._rows_arg(rows)
        view = KVView(kv, rows_arg, start, valid)
        out = self.backbone.run_layer(layer, x, self.ctx, view, self.attention_mask(rows_arg, start, end), rows_arg)
        for b in ids:
            kv.filled[b] = end
        return out

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        self.work.head_calls += 1
        self.work.params_touched += self.costs.head
        return self.backbone.head(hidden)

    # --- the step ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> None:
        """Run prompt slots `[0, q)` of every row through every layer and every live exit; predict nothing.

        The prompt is encoded by the whole model (as an encoder would be); only new tokens may leave early.
        """
        rows, ids = torch.arange(self.batch_size, device=x.device), list(range(self.batch_size))
        for depth in range(self.num_layers):
            if depth in self.exit_kv:  # exits with a cache of their own see the prompt too
                exit_kv = self.exit_kv[depth]
                self._run(self.exits[depth].layer, exit_kv, x, rows, ids, 0, x.shape[1], exit_kv.filled)
            kv = self.kv[depth]
            x = self._run(self.backbone.layers[depth], kv, x, rows, ids, 0, x.shape[1], kv.filled)

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> StepResult:
        """The prompt and the first new token. With live exits, all but the last prompt slot first go through every
        layer (`encode`) and only the last slot's prediction may leave early; without, one pass does it all."""
        rows = torch.arange(self.batch_size, device=prompt.device)
        if self.live and prompt.shape[1] > 1:
            self.encode(prompt[:, :-1])
            return self.step(rows, prompt[:, -1:], prompt.shape[1] - 1, step=0)
        return self.step(rows, prompt, 0, step=0)

    @torch.no_grad()
    def step(self, rows: torch.Tensor, x: torch.Tensor, new_start: int, step: int, verify: bool = False) -> StepResult:
        """Run new slots `[new_start, new_start + q)` of `rows` up the stack.

        With `verify`, rows that reach the final layer also get its greedy choice at every slot of the window that
        was caught up with them (speculative mode: that catch-up is the verification pass).
        """
        n, end = len(rows), new_start + x.shape[1]
        device = x.device
        ids = rows.tolist()  # host copy of the row ids: fill levels are looked up without a sync per layer
        self.work.steps += 1
        touched_before = self.work.params_touched
        consult = self.gate is None or self.gate.open(step)
        tokens = torch.empty(n, dtype=torch.long, device=device)
        exit_at = torch.full((n,), self.num_layers, dtype=torch.long, device=device)
        all_logits: torch.Tensor | None = None
        out_idx = torch.arange(n, device=device)  # where each active row's results go
        # ride along: rows whose token is out but who still run the layers a deeper row needs (device and host)
        emitted, emitted_ids = torch.zeros(n, dtype=torch.bool, device=device), [False] * n
        lo = new_start
        prev_fill: list[int] | None = None

        def done(result: StepResult) -> StepResult:
            if self.gate is not None and consult:
                self.gate.record(self.work.params_touched - touched_before)
            return result

        for depth in range(self.num_layers):
            fill = [self.kv[depth].filled[b] for b in ids]
            x, lo = self._join_pending(x, rows, fill, prev_fill, lo, end)
            if depth in self.live_set and not consult:
                self._skip_exit(depth, x, rows, ids, lo, end, fill)
            elif depth in self.live_set:
                leave, leaves, logits = self._exit(depth, x, rows, ids, lo, end, step, emitted)
                if leave is not None:
                    all_logits = self._emit(all_logits, logits, out_idx[leave], tokens, exit_at, depth)
                    if self.batch_policy == "ride_along":
                        emitted, emitted_ids = emitted | leave, [a or b for a, b in zip(emitted_ids, leaves)]
                        if all(emitted_ids):  # every row's token is out: nobody needs the layers above
                            self._park(x, rows, ids, depth, lo, end)
                            return done(StepResult(tokens, exit_at, all_logits))
                    else:
                        self._park(x[leave], rows[leave], [b for b, out in zip(ids, leaves) if out], depth, lo, end)
                        keep = ~leave
                        rows, x, out_idx, emitted = rows[keep], x[keep], out_idx[keep], emitted[keep]
                        ids = [b for b, out in zip(ids, leaves) if not out]
                        fill = [f for f, out in zip(fill, leaves) if not out]
                        if len(rows) == 0:
                            return done(StepResult(tokens, exit_at, all_logits))
                        if min(fill) > lo:  # the rows that left needed the lowest slots; the others do not
                            x, lo = x[:, min(fill) - lo :], min(fill)
            x = self._run(self.backbone.layers[depth], self.kv[depth], x, rows, ids, lo, end, fill)
            self.work.layer_calls += 1
            self.work.params_touched += self.costs.layers[depth]
            self.work.catchup_slots += new_start - lo
            prev_fill = fill
        last, where = (x[:, -1], out_idx) if not any(emitted_ids) else (x[~emitted, -1], out_idx[~emitted])
        if not verify:
            all_logits = self._emit(all_logits, self._head(last), where, tokens, exit_at, self.num_layers)
            return done(StepResult(tokens, exit_at, all_logits))
        window_logits = self._head(x)
        all_logits = self._emit(all_logits, window_logits[:, -1], out_idx, tokens, exit_at, self.num_layers)
        return done(StepResult(tokens, exit_at, all_logits, out_idx, lo, window_logits.argmax(dim=-1)))

    def _join_pending(self, x, rows, fill, prev_fill, lo, end):
        """Bring in the pending tokens whose hidden state stopped at this depth (fill <= slot < previous fill)."""
        start = min(fill)
        if prev_fill is None or fill == prev_fill:
            return x, lo
        pending = self.pending if len(rows) == self.batch_size else self.pending[rows]
        joiners_are_prefix = len(set(fill)) == 1 and set(prev_fill) == {lo}
        if start < lo:
            x = torch.cat([pending[:, start:lo], x], dim=1)
            lo = start
        if not joiners_are_prefix:
            slots = torch.arange(lo, end)[None, :]
            joins = (slots >= torch.tensor(fill)[:, None]) & (slots < torch.tensor(prev_fill)[:, None])
            x = torch.where(joins.to(x.device)[..., None], pending[:, lo:end], x)
        return x, lo

    def _exit(self, depth, x, rows, ids, lo, end, step, emitted):
        """Run exit `depth` (an exit layer over the slots its cache lacks, or nothing); ask the policy which rows
        leave (rows in `emitted` already did, at a lower exit).

        Returns (leave mask or None, the same as a host list, logits of the rows that leave)."""
        exit_module = self.exits[depth]
        y = x
        if exit_module.needs_cache:
            kv = self.exit_kv[depth]
            exit_fill = [kv.filled[b] for b in ids]
            start = min(exit_fill)
            if start < lo:  # the gate skipped this exit for some slots: their inputs were kept
                rows_arg = self._rows_arg(rows)
                kept = self.exit_inputs[depth] if rows_arg is None else self.exit_inputs[depth][rows_arg]
                x = torch.cat([kept[:, start:lo], x], dim=1)
                lo = start
            y = self._run(exit_module.layer, kv, x[:, start - lo :], rows, ids, start, end, exit_fill)
            self.work.exit_calls += 1
        self.work.params_touched += self.costs.exit_layers[depth]
        logits = self._exit_logits(depth, y[:, -1]) if self.policy.needs_logits(depth) else None
        leave = self.policy.decide(depth, logits, step, rows, x[:, -1]) & ~emitted
        if self.batch_policy == "slowest":  # the step waits for its slowest row: all leave or none
            leave = leave & leave.all()
        leaves = leave.tolist()  # the one host sync per exit reached: leaving or not is a branch
        if not any(leaves):
            return None, None, None
        logits = self._exit_logits(depth, y[leave, -1]) if logits is None else logits[leave]
        return leave, leaves, logits

    def _skip_exit(self, depth, x, rows, ids, lo, end, fill) -> None:
        """The gate is closed: keep the exit layer's inputs for the slots its cache will need when it reopens."""
        if not self.exits[depth].needs_cache:
            return
        if depth not in self.exit_inputs:
            self.exit_inputs[depth] = x.new_zeros(self.batch_size, self.capacity, x.shape[-1])
        self._keep(self.exit_inputs[depth], x, rows, lo, end, fill)

    def _keep(self, store: torch.Tensor, x, rows, lo, end, fill) -> None:
        """`store[rows, lo:end] = x` where the slot is real work for the row (at or above its fill level)."""
        valid = self._valid(fill, lo, end, x.device)
        window = store[rows, lo:end]
        store[rows, lo:end] = x if valid is None else torch.where(valid[..., None], x, window)

    def _exit_logits(self, depth: int, features: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits at an exit: the frozen head (FREE, MuE) or the exit's own classifier."""
        self.work.head_calls += 1
        self.work.params_touched += self.costs.exit_logits[depth]
        return self.exits[depth].logits(self.backbone, features)

    def _emit(self, all_logits, logits, where, tokens, exit_at, depth):
        tokens[where] = logits.argmax(dim=-1)
        exit_at[where] = depth
        if all_logits is None:
            all_logits = logits.new_empty(len(tokens), logits.shape[-1])
        all_logits[where] = logits
        return all_logits

    def _park(self, x, rows, ids, depth, lo, end):
        """Tokens of rows that left at `depth`: keep their state (recompute) or fill deeper K/V now (propagate)."""
        if self.kv_mode == "recompute":
            if self.pending is None:
                self.pending = x.new_zeros(self.batch_size, self.capacity, x.shape[-1])
            self._keep(self.pending, x, rows, lo, end, [self.kv[depth].filled[b] for b in ids])
            return
        # propagate: every cache is full below `lo`, so the new slots are the whole window
        rows_arg = self._rows_arg(rows)
        caches = [*self.kv[depth:], *(kv for i, kv in self.exit_kv.items() if i > depth)]
        projected = propagated_kv(self.backbone, self.exits, list(self.exit_kv), depth, x, self.ctx, rows_arg, lo)
        for cache, kv in zip(caches, projected):
            cache.write(rows_arg, lo, *kv, None)
            for b in ids:
                cache.filled[b] = end
        self.work.kv_projections += len(caches)
        self.work.params_touched += self.costs.propagated(depth)

    def crop_row(self, row: int, length: int) -> None:
        """Forget slots at or after `length` of one row in every cache (a rejected speculative draft)."""
        for kv in [*self.kv, *self.exit_kv.values()]:
            kv.filled[row] = min(kv.filled[row], length)

    def reorder(self, index: torch.Tensor) -> None:
        """Rows follow `index` (beam search): caches and pending states of row index[i] move to row i."""
        for kv in [*self.kv, *self.exit_kv.values()]:
            kv.reorder(index)
        if self.pending is not None:
            self.pending = self.pending.index_select(0, index)
