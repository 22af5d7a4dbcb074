"""Rows at their own positions: the K/V of up to `max_rows` independent requests in buffers allocated once, and
one decode step that takes every row's next token up the stack together.

Each row is one request: its sequence starts at slot 0 of its own row of every buffer (no padding), its new token
sits at its own slot. A layer call covers a window of `w` slots ending at each row's new slot, so its K/V are
written with one scatter at per-row slot indices, and one bool mask per window (`slot <= query slot`, per row) is
all the attention needs; rows never move and are never gathered. Each buffer has one extra slot, the *trash slot*:
writes that must not land (a window slot the row has filled already, a row with no request) go there, and no query
ever sees it.

Every row reads every live exit it reaches and leaves at the first one its own threshold accepts, exactly as
alone; what the step did not run for a token (layers above where it stopped) is caught up exactly at the next step
that goes deeper, as in the engines of `freevlm.decoding` (`kv="recompute"`): the states that stopped are kept
(`pending`) and join the window at the depth where they stopped. A gate that stops consulting exits would change
rows' exit layers, so there is none. What the exit rule decides is only how far a step climbs (`exit_rule`):

- `ride_along`: until every row's token is out; a row that left rides along while a deeper row climbs (its deeper
  K/V are filled on the way). A mixed batch then runs as deep as its deepest row at every step.
- `park` (the default): at each exit where some rows left and others climb on, the step stops when the climbing
  rows would make tokens more slowly per layer call than a new step would (`_climb_on`); their tokens wait at that
  exit (`resume`) and go on at the next step, joining at that depth, so the layers above are run once for the
  rows gathered there instead of at every step. A token waits at most `max_wait` steps.

Either way each row's tokens and exit layers are those of `generate` alone: the rule moves work between steps,
never changes it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from ..backbones.base import Backbone, Context
from ..decoding.policies import max_probability

EXIT_RULES = ("park", "ride_along")


class RowKV:
    """One attention layer's K/V for every row, `[rows, heads, slots + 1, head_dim]` (the last slot: trash)."""

    def __init__(self, rows: int, slots: int):
        self.rows, self.slots = rows, slots
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None


class RowView:
    """What a Hugging Face attention module sees as its cache for one call: writes each row's window at its own
    slots (`index [n, w]`, the trash slot where nothing may land), returns every slot of rows `[first, first + n)`."""

    def __init__(self, kv: RowKV, index: torch.Tensor, first: int = 0, start: int = 0):
        self.kv, self.index, self.first, self.start = kv, index, first, start
        self.key_length = kv.slots + 1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        kv = self.kv
        if kv.keys is None:  # allocated once, at the first write (heads and head size come from the layer)
            shape = (kv.rows, key_states.shape[1], kv.slots + 1, key_states.shape[3])
            kv.keys, kv.values = key_states.new_zeros(shape), value_states.new_zeros(shape)
        rows = slice(self.first, self.first + key_states.shape[0])
        keys, values = kv.keys[rows], kv.values[rows]
        index = self.index[:, None, :, None].expand(-1, key_states.shape[1], -1, key_states.shape[3])
        keys.scatter_(2, index, key_states)
        values.scatter_(2, index, value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start


@dataclass
class StepOutput:
    """What a step produced for rows `[0, n)` (rows without a request hold garbage)."""

    logits: torch.Tensor  # [n, V] logits of the layer each row left at
    exit_at: torch.Tensor  # [n] that layer (num_layers = final)
    exit_at_host: list[int]
    out: list[bool]  # whether each row's token is out (a parked row's is not: it goes on at a later step)


class RowEngine:
    """K/V, pending states and per-row fill levels of a batch of independent rows (see the module docstring).

    A request joins with `join` (its image and prompt encoded by the backbone, batch 1), its prompt but the last
    slot is encoded in chunks by `prefill` (so a long prompt never freezes the other rows for long), and its last
    prompt slot is its first `step`. `leave` frees the row at once: the next request overwrites it.
    """

    def __init__(
        self,
        backbone: Backbone,
        exits: dict[int, nn.Module],
        max_rows: int,
        max_len: int,
        max_prompt: int,
        exit_rule: str = EXIT_RULES[0],
        max_wait: int = 4,
    ):
        if exit_rule not in EXIT_RULES:
            raise ValueError(f"exit_rule must be one of {EXIT_RULES}, got {exit_rule!r}")
        if not isinstance(max_wait, int) or max_wait < 0:
            raise ValueError(f"max_wait must be a non-negative integer, got {max_wait!r}")
        self.backbone, self.exits = backbone, exits
        self.exit_rule, self.max_wait = exit_rule, max_wait
        self.num_layers = backbone.num_layers
        self.max_rows, self.max_len, self.max_prompt = max_rows, max_len, max_prompt
        self.trash = max_len
        self.kv = [RowKV(max_rows, max_len) for _ in range(self.num_layers)]
        self.exit_kv = {i: RowKV(max_rows, max_len) for i in sorted(exits) if exits[i].needs_cache}
        device = backbone.device
        self.pending = torch.zeros(max_rows, max_len + 1, backbone.hidden_size, dtype=backbone.dtype, device=device)
        self.rows_ctx = backbone.rows_context(max_rows, max_len + 1, max_prompt)
        self._key_slots = torch.arange(max_len + 1, device=device)
        # per row, on the host: the slot of its next new token, how far each layer / exit layer is filled
        self.position = [0] * max_rows
        self.fill = [[0] * max_rows for _ in range(self.num_layers)]
        self.exit_fill = {i: [0] * max_rows for i in self.exit_kv}
        self.active = [False] * max_rows  # takes part in steps
        self.may_exit = [False] * max_rows
        self.threshold = torch.ones(max_rows, device=device)
        self.first_input: dict[int, torch.Tensor] = {}  # row -> [H] its last prompt slot's input, for its first step
        self.prompts: dict[int, tuple[Context, torch.Tensor, int]] = {}  # row -> (ctx, prompt embeds, slots encoded)
        self.resume = [0] * max_rows  # the exit a row's token waits at (parked), 0 for a new token
        self.waited = [0] * max_rows  # steps it has waited there
        # layer calls (exit layers included) from the bottom up to each exit, and from each exit to the top
        layered = [i for i in sorted(exits) if exits[i].needs_cache]
        self.calls_to = {i: i + sum(1 for j in layered if j <= i) for i in exits}
        self.calls_above = {i: self.num_layers - i + sum(1 for j in layered if j > i) for i in exits}
        self.first_exit_rate = 0.5  # running share of new tokens that leave at the first exit
        self.steps = self.layer_calls = self.exit_calls = self.parks = 0
        self.catchup_slots = 0  # slot-layers run for tokens that stopped early at an earlier step

    # --- rows joining and leaving ---------------------------------------------------------------------------------
    def join(self, row: int, ctx: Context, threshold: float, may_exit: bool) -> None:
        """Row `row` takes request `ctx` (batch 1, no padding); its prompt is encoded by `prefill`."""
        if self.active[row] or row in self.prompts:
            raise ValueError(f"row {row} is taken")
        self.backbone.join_row(self.rows_ctx, row, ctx)
        self.prompts[row] = (ctx, self.backbone.embed_prompt(ctx), 0)
        self.may_exit[row] = may_exit
        self.threshold[row] = threshold

    def prefill(self, row: int, budget: int) -> int:
        """Encode up to `budget` more prompt slots of a joining row (more where the backbone cannot cut the prompt
        there: `prefill_cut`); returns how many it encoded. Once all but the last are, the row is active: its last
        prompt slot is its first step."""
        ctx, embeds, done = self.prompts[row]
        length = embeds.shape[1]
        count = min(budget, length - 1 - done)
        if count > 0:  # a chunk the backbone may cut there (Gemma 3: an image whole)
            count = min(self.backbone.prefill_cut(ctx, done + count), length - 1) - done
            self._encode(row, ctx, embeds[:, done : done + count], done)
        done += count
        if done < length - 1:
            self.prompts[row] = (ctx, embeds, done)
            return count
        del self.prompts[row]
        self.first_input[row] = embeds[0, -1]
        self.position[row] = length - 1
        for fill in [*self.fill, *self.exit_fill.values()]:
            fill[row] = length - 1
        self.resume[row] = self.waited[row] = 0
        self.active[row] = True
        return count

    def prompt_left(self, row: int) -> int:
        """Prompt slots a joining row has still to encode."""
        _, embeds, done = self.prompts[row]
        return embeds.shape[1] - 1 - done

    def leave(self, row: int) -> None:
        self.active[row] = False
        self.prompts.pop(row, None)
        self.first_input.pop(row, None)

    @property
    def rows_in_use(self) -> int:
        """Rows a step runs: up to the highest active one (a freed row below it runs as garbage)."""
        return max((r + 1 for r in range(self.max_rows) if self.active[r]), default=0)

    @torch.no_grad()
    def _encode(self, row: int, ctx: Context, x: torch.Tensor, start: int) -> None:
        """Prompt slots `[start, start + q)` of one row through every layer (and every exit layer with a cache, if
        the row may leave early), in the row's own context."""
        end = start + x.shape[1]
        index = torch.arange(start, end, device=x.device)[None]
        mask = (self._key_slots[None, :] <= index[0, :, None])[None, None]
        bounds = [0, *(i for i in self.exit_kv if self.may_exit[row]), self.num_layers]
        for first, last in itertools.pairwise(bounds):
            for depth in range(first, last):
                view = RowView(self.kv[depth], index, row, start)
                x = self.backbone.run_layer(self.backbone.layers[depth], x, ctx, view, mask, None)
            if last in self.exit_kv:
                view = RowView(self.exit_kv[last], index, row, start)
                self.backbone.run_layer(self.exits[last].layer, x, ctx, view, mask, None)

    # --- the step -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> StepOutput:
        """Every active row's token up the stack: a new one (`tokens [n]`: the last one it produced; ignored for a
        row at its first step, which reads its last prompt slot), or the one it parked at an earlier step, which
        joins at the exit where it stopped. Rows `[0, n)` with n = `rows_in_use`."""
        n, backbone, device = self.rows_in_use, self.backbone, self.threshold.device
        rows = range(n)
        active = self.active[:n]
        position = self.position[:n]
        pos = torch.tensor(position, device=device)
        active_t = torch.tensor(active, device=device)
        may_exit = active_t & torch.tensor(self.may_exit[:n], device=device)
        resume = torch.tensor(self.resume[:n], device=device)
        live = [i for i in sorted(self.exits) if any(self.may_exit[r] for r in rows if active[r])]
        joins = [i for i in self.exits if any(self.fill[i][r] != self.fill[i - 1][r] for r in rows if active[r])]
        bounds = sorted({0, *live, *joins, self.num_layers})
        before = {b: self.fill[b][:n] for b in bounds[:-1]}  # fill levels at the start of the step, per segment
        fresh = sum(1 for r in rows if active[r] and self.resume[r] == 0)
        self.steps += 1

        x = backbone.embed(backbone.window_context(self.rows_ctx, pos[:, None]), tokens[:n, None], None, 0)
        for r, value in self.first_input.items():
            x[r, 0] = value
        self.first_input = {}
        out = ~active_t  # rows whose token is out (rows without a request: from the start)
        exit_at = torch.full((n,), self.num_layers, dtype=torch.long, device=device)
        logits: torch.Tensor | None = None
        width, below = 1, 0
        for first, last in itertools.pairwise(bounds):
            need = max((position[r] + 1 - self.fill[first][r] for r in rows if active[r]), default=1)
            if need > width:  # pending slots join: the window grows to the left
                x = torch.cat([x.new_zeros(n, need - width, x.shape[-1]), x], dim=1)
                width = need
            self.catchup_slots += (width - 1) * (last - first)
            slots = pos[:, None] - width + 1 + torch.arange(width, device=device)[None]
            if first > 0:
                x = self._join_pending(x, slots, before[first], before[below], rows, active)
            below = first
            x = self._layers(first, last, x, slots, rows, active)
            if last == self.num_layers:
                break
            if last not in live:
                continue
            leave, exit_logits = self._exit(last, x, slots, rows, active, position)
            leave &= may_exit & ~out & (resume < last)  # a parked token left nowhere below where it waits
            out = out | leave
            exit_at.masked_fill_(leave, last)
            logits = exit_logits if logits is None else torch.where(leave[:, None], exit_logits, logits)
            done = out.tolist()  # the one host read per exit
            if last == live[0] and fresh:
                left = sum(1 for r in rows if active[r] and self.resume[r] == 0 and done[r])
                self.first_exit_rate += 0.2 * (left / fresh - self.first_exit_rate)
            if all(done) or not self._climb_on(last, done, live):
                self.parks += not all(done)
                self._park(x, slots, last, before[first], rows, active)
                self._stopped(done, last)
                return StepOutput(logits, exit_at, exit_at.tolist(), done)
        final = backbone.head(x[:, -1])
        logits = final if logits is None else torch.where(out[:, None], logits, final)
        done = [True] * n
        self._stopped(done, self.num_layers)
        return StepOutput(logits, exit_at, exit_at.tolist(), done)

    def _climb_on(self, depth: int, done: list[bool], live: list[int]) -> bool:
        """Whether the step goes on above exit `depth` for the rows whose token is not out yet, or parks them there.

        Going on costs the layer calls above `depth`, and makes one token per climbing row; parking them lets the
        next step start at once, and its first exit makes tokens for about `first_exit_rate` of the rows that are
        out now, at the cost of the layers up to it. The step goes on when the climbing rows make tokens at least
        as fast per layer call, or when a climbing row has waited `max_wait` steps already (a bound on its delay);
        `exit_rule="ride_along"` always goes on."""
        if self.exit_rule == "ride_along":
            return True
        climbing = [r for r, d in enumerate(done) if not d]
        if max(self.waited[r] for r in climbing) >= self.max_wait:
            return True
        rows_out = sum(1 for r, d in enumerate(done) if d and self.active[r])
        return len(climbing) * self.calls_to[live[0]] >= self.first_exit_rate * rows_out * self.calls_above[depth]

    def _stopped(self, done: list[bool], depth: int) -> None:
        """Rows whose token is out take their next slot; the others wait at the exit where the step stopped."""
        for r, d in enumerate(done):
            if not self.active[r]:
                continue
            if d:
                self.position[r] += 1
                self.resume[r] = self.waited[r] = 0
            else:
                self.resume[r] = depth
                self.waited[r] += 1

    def _index(self, slots: torch.Tensor, fill: list[int], rows, active) -> torch.Tensor:
        """Where each window slot is written: its own slot if the row is active and has not filled it, else trash."""
        floor = torch.tensor([fill[r] if active[r] else self.max_len + 1 for r in rows], device=slots.device)
        return torch.where(slots >= floor[:, None], slots, self.trash)

    def _mask(self, slots: torch.Tensor) -> torch.Tensor:
        """Bool `[n, 1, w, slots + 1]`: a query sees its row's slots up to its own (never the trash slot)."""
        return (self._key_slots[None, None, :] <= slots.clamp(min=0)[..., None])[:, None]

    def _layers(self, first: int, last: int, x, slots, rows, active) -> torch.Tensor:
        """LM layers `first..last-1` over one window (every layer of a segment is filled to the same slot)."""
        index, mask = self._index(slots, self.fill[first], rows, active), self._mask(slots)
        ctx = self.backbone.window_context(self.rows_ctx, slots.clamp(min=0))
        for depth in range(first, last):
            x = self.backbone.run_layer(self.backbone.layers[depth], x, ctx, RowView(self.kv[depth], index), mask, None)
            for r in rows:
                if active[r]:
                    self.fill[depth][r] = self.position[r] + 1
        self.layer_calls += last - first
        return x

    def _exit(self, depth: int, x, slots, rows, active, position) -> tuple[torch.Tensor, torch.Tensor]:
        """The exit at `depth`: its layer over the window (filling its own cache), its logits at each row's new
        slot, and which rows are confident enough (max softmax probability >= the row's threshold)."""
        exit_module = self.exits[depth]
        features = x
        if exit_module.needs_cache:
            index = self._index(slots, self.exit_fill[depth], rows, active)
            ctx = self.backbone.window_context(self.rows_ctx, slots.clamp(min=0))
            view = RowView(self.exit_kv[depth], index)
            features = self.backbone.run_layer(exit_module.layer, x, ctx, view, self._mask(slots), None)
            for r in rows:
                if active[r]:
                    self.exit_fill[depth][r] = position[r] + 1
            self.exit_calls += 1
        logits = exit_module.logits(self.backbone, features[:, -1])
        return max_probability(logits) >= self.threshold[: len(rows)], logits

    def _join_pending(self, x, slots, here: list[int], below: list[int], rows, active) -> torch.Tensor:
        """Slots that stopped at this segment's first layer at an earlier step (filled in the segment below, not in
        this one, when the step began) take their kept state."""
        if not any(below[r] != here[r] for r in rows if active[r]):
            return x
        lo = torch.tensor([here[r] for r in rows], device=x.device)[:, None]
        hi = torch.tensor([below[r] for r in rows], device=x.device)[:, None]
        joins = (slots >= lo) & (slots < hi)
        kept = self.pending[: len(rows)].gather(1, slots.clamp(min=0)[..., None].expand(-1, -1, x.shape[-1]))
        return torch.where(joins[..., None], kept, x)

    def _park(self, x, slots, depth: int, floor: list[int], rows, active) -> None:
        """The step stops at `depth`: keep the window's states there for the layers above. Only slots this step
        took up through the last segment (from its first layer's fill level `floor`) hold a state at `depth`; a slot
        that waits there from an earlier step keeps the one it has."""
        index = self._index(slots, floor, rows, active)
        self.pending[: len(rows)].scatter_(1, index[..., None].expand(-1, -1, x.shape[-1]), x)
