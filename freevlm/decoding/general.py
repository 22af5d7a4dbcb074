"""The general engine: a fill level per row, so rows leave at their own layers and are compacted out.

One call of `step` takes the new tokens of some rows (the whole prompt at prefill, one token per row afterwards) up
the layer stack. At each live exit the policy decides per row; rows that leave are compacted out (`per_row`) or
ride along in the layers a deeper row needs (`ride_along`), and the layers above them do not run for them.

Pending tokens (recompute, see `engine.py`) join a window at the depth where they stopped, one call per layer,
batched along the sequence axis. The running window of a layer call therefore covers slots [lo, end): for each row
the slots at or above its fill level are real work; slots below it (only present because another row needed them)
are computed but neither written to the cache nor used.
"""

from __future__ import annotations

from functools import cached_property

import torch

from ..backbones.base import causal_padding_mask
from ..cache_utils import KVView, LayerKV
from .engine import Engine, StepResult


class GeneralEngine(Engine):
    """Caches and pending states of one batch, a fill level per row; `step` runs new tokens up the stack."""

    cache_class = LayerKV
    _mask_memo: tuple | None = None  # (rows, start, end, mask) of the last window: a step's layers share it

    @cached_property
    def unpadded(self) -> bool:
        return bool(self.ctx.key_mask.all())

    # --- helpers ----------------------------------------------------------------------------------------------
    def attention_mask(self, rows: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
        """Bool `[n, 1, q, k]` (None where plain full attention is the same: one new slot, no padding).

        Built once per (rows, window)."""
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
        self._count_head(None)
        return self.backbone.head(hidden)

    # --- the step ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> None:
        rows, ids = torch.arange(self.batch_size, device=x.device), list(range(self.batch_size))
        for depth in range(self.num_layers):
            if depth in self.exit_kv:  # exits with a cache of their own see the prompt too
                exit_kv = self.exit_kv[depth]
                self._run(self.exits[depth].layer, exit_kv, x, rows, ids, 0, x.shape[1], exit_kv.filled)
            kv = self.kv[depth]
            x = self._run(self.backbone.layers[depth], kv, x, rows, ids, 0, x.shape[1], kv.filled)

    @torch.no_grad()
    def step(
        self, rows: torch.Tensor, x: torch.Tensor, new_start: int, step: int, verify: list[bool] | None = None
    ) -> StepResult:
        n, end = len(rows), new_start + x.shape[1]
        device = x.device
        ids = rows.tolist()  # host copy of the row ids: fill levels are looked up without a sync per layer
        consult = self._begin(step, rows, verify)
        tokens = torch.empty(n, dtype=torch.long, device=device)
        exit_at = torch.full((n,), self.num_layers, dtype=torch.long, device=device)
        all_logits: torch.Tensor | None = None
        out_idx = torch.arange(n, device=device)  # where each active row's results go
        # ride along: rows whose token is out but who still run the layers a deeper row needs (device and host)
        emitted, emitted_ids = torch.zeros(n, dtype=torch.bool, device=device), [False] * n
        lo = new_start
        prev_fill: list[int] | None = None

        for depth in range(self.num_layers):
            fill = [self.kv[depth].filled[b] for b in ids]
            x, lo = self._join_pending(x, rows, fill, prev_fill, lo, end)
            if depth in self.live and not consult:
                self._skip_exit(depth, x, rows, lo, end, fill)
            elif depth in self.live:
                leave, leaves, logits = self._exit(depth, x, rows, ids, lo, end, step, emitted)
                if leave is not None:
                    all_logits = self._emit(all_logits, logits, out_idx[leave], tokens, exit_at, depth)
                    if self.batch_policy == "ride_along":
                        emitted, emitted_ids = emitted | leave, [a or b for a, b in zip(emitted_ids, leaves)]
                        if all(emitted_ids):  # every row's token is out: nobody needs the layers above
                            self._park(x, rows, ids, depth, lo, end)
                            return self._done(StepResult(tokens, exit_at, all_logits))
                    else:
                        self._park(x[leave], rows[leave], [b for b, out in zip(ids, leaves) if out], depth, lo, end)
                        keep = ~leave
                        rows, x, out_idx, emitted = rows[keep], x[keep], out_idx[keep], emitted[keep]
                        ids = [b for b, out in zip(ids, leaves) if not out]
                        fill = [f for f, out in zip(fill, leaves) if not out]
                        if len(rows) == 0:
                            return self._done(StepResult(tokens, exit_at, all_logits))
                        if min(fill) > lo:  # the rows that left needed the lowest slots; the others do not
                            x, lo = x[:, min(fill) - lo :], min(fill)
            x = self._run(self.backbone.layers[depth], self.kv[depth], x, rows, ids, lo, end, fill)
            self._count_layers(depth, depth + 1)
            self.work.catchup_slots += new_start - lo
            prev_fill = fill
        last, where = (x[:, -1], out_idx) if not any(emitted_ids) else (x[~emitted, -1], out_idx[~emitted])
        if verify is None:
            all_logits = self._emit(all_logits, self._head(last), where, tokens, exit_at, self.num_layers)
            return self._done(StepResult(tokens, exit_at, all_logits))
        window_logits = self._head(x)
        all_logits = self._emit(all_logits, window_logits[:, -1], out_idx, tokens, exit_at, self.num_layers)
        return self._done(StepResult(tokens, exit_at, all_logits, out_idx, lo, window_logits.argmax(dim=-1)))

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
        self._count_exit(depth)
        logits = self._exit_logits(depth, y[:, -1]) if self._needs_logits(depth) else None
        leave = self._decide(depth, logits, step, rows, x[:, -1], emitted)
        leaves = leave.tolist()  # the one host sync per exit reached: leaving or not is a branch
        if not any(leaves):
            return None, None, None
        logits = self._exit_logits(depth, y[leave, -1]) if logits is None else logits[leave]
        return leave, leaves, logits

    def _skip_exit(self, depth, x, rows, lo, end, fill) -> None:
        """The gate is closed: keep the exit layer's inputs for the slots its cache will need when it reopens."""
        if not self.exits[depth].needs_cache:
            return
        self._keep(self._kept_inputs(depth, x), x, rows, lo, end, fill)

    def _keep(self, store: torch.Tensor, x, rows, lo, end, fill) -> None:
        """`store[rows, lo:end] = x` where the slot is real work for the row (at or above its fill level)."""
        valid = self._valid(fill, lo, end, x.device)
        window = store[rows, lo:end]
        store[rows, lo:end] = x if valid is None else torch.where(valid[..., None], x, window)

    def _exit_logits(self, depth: int, features: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits at an exit: the frozen head (FREE, MuE) or the exit's own classifier."""
        self._count_head(depth)
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
        if self.kv_mode == "propagate":
            return self._propagate(x, depth, self._rows_arg(rows), ids, lo)
        self._keep(self._new_pending(x), x, rows, lo, end, [self.kv[depth].filled[b] for b in ids])
