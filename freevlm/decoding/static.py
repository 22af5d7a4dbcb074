"""The static engine: every row of the batch runs the same layers at a step, so a step is a few fixed-shape calls.

Where rows ride along (batch 1, `batch_policy` "ride_along", "slowest", or "auto" below the compaction size),
every layer is filled to the same slot for every row: a layer's fill level is one number, the K/V buffers are
allocated once per request and written at a slot tensor (`index_copy_`), attention reads the whole buffer under one
bool mask built once per step, and no row is ever gathered out of a cache.

A step runs *segments*: the layers between two live exits, then the exit layer and the vocabulary head at its end.
Pending tokens (recompute) join at the start of the segment above the exit they stopped at, so the window of slots a
segment runs is the same for all its layers. Between segments the host reads one thing: which rows leave (one sync
per exit reached). On CUDA each (segment, window bucket) is captured once as a CUDA graph and replayed; windows are
padded up to a bucket of 1, 2, 4, 8, 16, 32 or 64 slots (a padded slot sits after the real ones: its K/V land in slots
no query can see yet and are overwritten when those slots are computed). On the CPU the same functions run eagerly
on exact windows.

Per-row compaction (large batches) and speculative decoding of rows at different slots stay with the general
engine in `general.py`, which keeps a fill level per row.
"""

from __future__ import annotations

import itertools
import warnings

import torch

from ..backbones.base import Context
from ..cache_utils import StaticKV, StaticView
from .engine import Engine, EngineSetup, ExitGate, StepResult, WorkCounter
from .policies import ExitPolicy

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def window_bucket(size: int) -> int | None:
    """The padded window a graph is captured for; None above the largest bucket (run eagerly)."""
    return next((b for b in BUCKETS if b >= size), None)


class SegmentRunner:
    """Runs a segment function; on CUDA captures it once per key as a CUDA graph and replays it.

    The first replay of every graph is checked against an eager run of the same inputs (the writes are the same
    values at the same slots, so running both is harmless); a mismatch or a capture error switches graphs off for
    this engine with a warning instead of decoding wrong tokens.
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None

    def __call__(self, key: tuple, fn, *inputs: torch.Tensor):
        if not self.enabled:
            return fn(*inputs)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(fn, inputs)
            except Exception as err:
                warnings.warn(f"freevlm: CUDA graph capture failed ({err}); decoding eagerly", stacklevel=2)
                self.enabled = False
                return fn(*inputs)
            expected = fn(*inputs)
            graph, static_inputs, static_out = self.graphs[key]
            graph.replay()
            if not all(
                torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-2) for a, b in zip(expected, static_out)
            ):
                warnings.warn(
                    "freevlm: a CUDA graph replay disagreed with eager execution; decoding eagerly", stacklevel=2
                )
                self.enabled = False
            return expected
        graph, static_inputs, static_out = self.graphs[key]
        for buf, value in zip(static_inputs, inputs):
            buf.copy_(value)
        graph.replay()
        return static_out

    def _capture(self, fn, inputs):
        static_inputs = [t.clone() for t in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(*static_inputs)  # warm-up: lazy allocations and library handles happen outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = fn(*static_inputs)
        return graph, static_inputs, static_out


class StaticEngine(Engine):
    """Caches and pending states of a batch whose rows move together; `step` runs a new token up the stack."""

    cache_class = StaticKV

    def __init__(self, setup: EngineSetup, ctx: Context, capacity: int | None = None, graphs: bool = False):
        slots = (capacity or ctx.capacity) + (BUCKETS[-1] if graphs else 0)  # padded windows may run past the end
        super().__init__(setup, ctx, slots)
        self.key_ok = torch.ones(self.batch_size, slots, dtype=torch.bool, device=ctx.key_mask.device)
        self.runner = SegmentRunner(graphs)
        self._all_rows = torch.arange(self.batch_size, device=ctx.key_mask.device)
        self.restart(ctx, setup.policy)

    def restart(self, ctx: Context, policy: ExitPolicy) -> None:
        """A new request on the same buffers (and the same captured graphs): nothing is filled yet."""
        self.ctx, self.policy = ctx, policy
        self.key_ok[:, : ctx.capacity].copy_(ctx.key_mask)
        self.key_ok[:, ctx.capacity :] = True
        for kv in self._caches():
            kv.fill = 0
        self.work = WorkCounter()
        self.prompt_encoded = False
        self.gate = ExitGate(self.costs.full_step) if self._gated else None
        # every decode window's slot ids and mask are slices of these, made once per request: a step builds none
        device, slots = self.key_ok.device, self.key_ok.shape[1]
        self._slot_ids = torch.arange(slots, device=device)
        self._mask_from = max(ctx.prompt_embeds.shape[1] - 1, 0)  # the first slot a step's window may start at
        self._masks = self._build_mask(self._mask_from, slots - self._mask_from)

    # --- windows ------------------------------------------------------------------------------------------------
    def _build_mask(self, start: int, size: int) -> torch.Tensor:
        """The bool mask `[B, 1, size, slots]` of queries at slots `[start, start + size)`: causal, padding keys
        hidden, a query always sees itself."""
        slots = self._slot_ids[start : start + size]
        keys = self._slot_ids
        visible = (keys[None, :] <= slots[:, None])[None] & self.key_ok[:, None, :]
        return (visible | (keys[None, :] == slots[:, None])[None])[:, None]

    def _window(self, start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot ids `[size]` and the bool mask `[B, 1, size, slots]` of a window, shared by every layer of a
        segment: views into the request's tables, except for the prompt's window (built once, at `encode`)."""
        if start < self._mask_from:
            return self._slot_ids[start : start + size], self._build_mask(start, size)
        row = start - self._mask_from
        return self._slot_ids[start : start + size], self._masks[:, :, row : row + size]

    # --- segments -----------------------------------------------------------------------------------------------
    def _layers(self, first: int, last: int, keep: tuple[int, ...], x, slots, mask, start: int):
        """LM layers `first..last-1` over one window; exit inputs of `keep` (gate closed) are stored on the way."""
        for depth in range(first, last):
            if depth in keep:
                self.exit_inputs[depth].index_copy_(1, slots, x)
            view = StaticView(self.kv[depth], slots, start)
            x = self.backbone.run_layer(self.backbone.layers[depth], x, self.ctx, view, mask, None)
        return x

    def _exit_features(self, depth: int, x, slots, mask, start: int, last: torch.Tensor | None):
        """The exit's output at the last real slot of each row (`last`: its index in a padded window; None: the
        window's last slot). Its layer fills its own cache on the way."""
        exit_module = self.exits[depth]
        if exit_module.needs_cache:
            view = StaticView(self.exit_kv[depth], slots, start)
            x = self.backbone.run_layer(exit_module.layer, x, self.ctx, view, mask, None)
        return x[:, -1] if last is None else x.index_select(1, last).squeeze(1)

    def _segment_fn(
        self, first: int, last: int, exit_depth: int | None, keep: tuple[int, ...], start: int, with_logits: bool
    ):
        def run(x, slots, mask, last_slot):
            x = self._layers(first, last, keep, x, slots, mask, start)
            if exit_depth is None:
                return (x,)
            features = self._exit_features(exit_depth, x, slots, mask, start, last_slot)
            if not with_logits:
                return x, features
            return x, features, self.exits[exit_depth].logits(self.backbone, features)

        return run

    def _run_segment(self, first, last, exit_depth, keep, x, start, with_logits):
        size = x.shape[1]
        fn = self._segment_fn(first, last, exit_depth, keep, start, with_logits)
        bucket = window_bucket(size) if self.runner.enabled else None
        if bucket is None:  # eagerly, on the exact window: the last slot is the last real one
            out = fn(x, *self._window(start, size), None)
        else:
            if bucket > size:
                x = torch.cat([x, x.new_zeros(x.shape[0], bucket - size, x.shape[2])], dim=1)
            slots, mask = self._window(start, bucket)
            last_slot = self._slot_ids[size - 1 : size]
            out = self.runner((first, last, exit_depth, keep, with_logits, bucket), fn, x, slots, mask, last_slot)
            out = (out[0][:, :size], *out[1:])
        self._count_layers(first, last)
        return out

    # --- the request --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> None:
        slots, mask = self._window(0, x.shape[1])
        bounds = [0, *[i for i in self.live if i in self.exit_kv], self.num_layers]
        for first, last_layer in itertools.pairwise(bounds):
            x = self._layers(first, last_layer, (), x, slots, mask, 0)
            if last_layer in self.exit_kv:
                self._exit_features(last_layer, x, slots, mask, 0, None)
        for kv in self._caches():
            kv.fill = x.shape[1]

    @torch.no_grad()
    def step(
        self, rows: torch.Tensor, x: torch.Tensor, new_start: int, step: int, verify: list[bool] | None = None
    ) -> StepResult:
        """Every row runs (shapes stay the same); rows not asked for (finished ones) ride along from the start and
        never hold the batch back. Which rows' tokens are out is known on the host (`out_ids`); the device mask
        (`out_mask`) exists only once some row's is, so a step of one row builds no masks at all."""
        n, end, device = self.batch_size, new_start + x.shape[1], x.device
        asked, every_row = rows, len(rows) == n
        out_ids, out_mask = [False] * n, None
        if not every_row:
            x = x.new_zeros(n, *x.shape[1:]).index_copy_(0, rows, x)
            rows = self._all_rows
            out_ids = [True] * n
            for b in asked.tolist():
                out_ids[b] = False
            out_mask = torch.ones(n, dtype=torch.bool, device=device).index_fill_(0, asked, False)
        consult = self._begin(step, asked, verify)
        keep = () if consult else tuple(i for i in self.live if i in self.exit_kv)
        for i in keep:
            self._kept_inputs(i, x)
        emitted: tuple | None = None  # (tokens, exit_at, logits) of the rows whose token is out
        lo = new_start
        # segments end at the exits consulted and wherever pending tokens join (fill levels differ)
        joins = [i for i in self.live if self.kv[i].fill != self.kv[i - 1].fill]
        bounds = [0, *sorted(set(self.live if consult else ()) | set(joins)), self.num_layers]

        def done(tokens, exit_at, logits, *verified) -> StepResult:
            if every_row:
                return self._done(StepResult(tokens, exit_at, logits, *verified))
            return self._done(StepResult(tokens[asked], exit_at[asked], logits[asked]))

        for first, last in itertools.pairwise(bounds):
            x, lo = self._join_pending(x, first, lo)
            self.work.catchup_slots += (new_start - lo) * (last - first)
            exit_depth = last if last < self.num_layers and consult else None
            if exit_depth is not None:
                self._catch_up_exit(exit_depth, lo)
            with_logits = exit_depth is not None and self._needs_logits(exit_depth)
            out = self._run_segment(first, last, exit_depth, keep, x, lo, with_logits)
            x = out[0]
            for kv in self.kv[first:last]:
                kv.fill = end
            if exit_depth is None:
                continue
            features, logits = out[1], (out[2] if with_logits else None)
            if exit_depth in self.exit_kv:
                self.exit_kv[exit_depth].fill = end
            self._count_exit(exit_depth)
            if logits is not None:
                self._count_head(exit_depth)
            leave = self._decide(exit_depth, logits, step, rows, x[:, -1], out_mask)
            leaves = leave.tolist()  # the one host sync per exit reached
            if not any(leaves):
                continue
            owned = not self.runner.enabled  # a graph's outputs are overwritten by its next replay
            if logits is None:  # every row's (a head costs the same for 1 row as for a few; no mask gather)
                logits, owned = self.exits[exit_depth].logits(self.backbone, features), True
                self._count_head(exit_depth)
            everyone = all(leaves) and out_mask is None  # every row leaves here, none left before
            emitted = self._emit(emitted, logits, None if everyone else leave, exit_depth, owned)
            out_mask = leave if out_mask is None else out_mask | leave
            out_ids = [a or b for a, b in zip(out_ids, leaves)]
            if all(out_ids):  # every row's token is out: nobody needs the layers above
                self._park(x, exit_depth, lo, end)
                return done(*emitted)
        stay = None if out_mask is None else ~out_mask
        self._count_head(None)
        if verify is None:
            return done(*self._emit(emitted, self.backbone.head(x[:, -1]), stay, self.num_layers, True))
        if not every_row:
            raise ValueError("speculative verification in the static engine needs every row at every step")
        window_logits = self.backbone.head(x)
        emitted = self._emit(emitted, window_logits[:, -1], stay, self.num_layers, True)
        if stay is None:
            return done(*emitted, rows, lo, window_logits.argmax(dim=-1))
        return done(*emitted, stay.nonzero().squeeze(1), lo, window_logits[stay].argmax(dim=-1))

    def _join_pending(self, x: torch.Tensor, depth: int, lo: int) -> tuple[torch.Tensor, int]:
        """Pending tokens that stopped below `depth` (slots from the layer's fill level up) join the window."""
        fill = self.kv[depth].fill
        if fill >= lo:
            return x, lo
        return torch.cat([self.pending[:, fill:lo], x], dim=1), fill

    def _catch_up_exit(self, depth: int, lo: int) -> None:
        """An exit skipped while the gate was closed runs over the inputs kept meanwhile, up to the window."""
        kv = self.exit_kv.get(depth)
        if kv is None or kv.fill >= lo:
            return
        kept = self.exit_inputs[depth][:, kv.fill : lo]
        slots, mask = self._window(kv.fill, lo - kv.fill)
        self._exit_features(depth, kept, slots, mask, kv.fill, None)
        self.work.exit_calls += 1
        kv.fill = lo

    def _emit(
        self, emitted: tuple | None, logits: torch.Tensor, where: torch.Tensor | None, depth: int, owned: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens, exit_at, logits) with the rows in `where` (None: every row, and none emitted before) taking
        their token from `logits` (every row's; `owned`: not a buffer a graph replay overwrites). Selects, not
        masked gathers or writes, which would make the host wait for the device."""
        if where is None:
            exit_at = torch.full((self.batch_size,), depth, dtype=torch.long, device=logits.device)
            return logits.argmax(dim=-1), exit_at, logits if owned else logits.clone()
        if emitted is None:
            tokens = torch.zeros(self.batch_size, dtype=torch.long, device=logits.device)
            exit_at = torch.full((self.batch_size,), self.num_layers, dtype=torch.long, device=logits.device)
            emitted = (tokens, exit_at, logits if owned else logits.clone())
        tokens, exit_at, all_logits = emitted
        tokens = torch.where(where, logits.argmax(dim=-1), tokens)
        return tokens, exit_at.masked_fill(where, depth), torch.where(where[:, None], logits, all_logits)

    def _park(self, x: torch.Tensor, depth: int, lo: int, end: int) -> None:
        """Every row left at `depth`: keep the window's states (recompute) or fill the deeper K/V now (propagate)."""
        if self.kv_mode == "propagate":
            return self._propagate(x, depth, None, list(range(self.batch_size)), lo)
        self._new_pending(x)[:, lo:end] = x


class EnginePool:
    """Static engines kept for later requests (their buffers and captured CUDA graphs): capturing costs more than
    a request saves. Each `EarlyExitVLM` owns one (`ee.engines`), so they live as long as the model; `clear()`
    frees them. Engines are kept per shape; the capacity is rounded up to a multiple of 64 slots so that prompts of
    similar length share one."""

    def __init__(self):
        self.engines: dict[tuple, StaticEngine] = {}

    def get(self, setup: EngineSetup, ctx: Context) -> StaticEngine:
        """An engine with CUDA graphs for this request: a kept one restarted, or a new one (then kept)."""
        capacity = -(-ctx.capacity // 64) * 64
        live = tuple(sorted(setup.policy.live_exits(sorted(setup.exits))))
        key = (
            ctx.prompt_ids.shape[0],
            capacity,
            live,
            tuple(id(setup.exits[i]) for i in live),
            setup.kv_mode,
            setup.batch_policy,
            setup.backbone.dtype,
            str(setup.backbone.device),
        )
        engine = self.engines.get(key)
        if engine is not None:
            engine.restart(ctx, setup.policy)
            return engine
        engine = StaticEngine(setup, ctx, capacity, graphs=True)
        self.engines[key] = engine
        return engine

    def clear(self) -> None:
        self.engines.clear()
