"""Rows at their own positions: the K/V of up to `max_rows` independent requests in buffers allocated once
(`row_kv`), and one decode step that takes every row's next token up the stack together.

Each row is one request: its sequence starts at slot 0 of its own row of every buffer (no padding), its new token
sits at its own slot. A step's layer call runs the slots its rows fill there, packed one query row each (a row's
new slot, and before it the slots it catches up): K/V are written at (row, slot), a query reads its row's key slots
up to the deepest slot of the call (rounded up to `KEY_BUCKET`) under a bool mask `key slot <= query slot`. When
the call is every row's new slot and nothing else (the full model, every plain step) the K/V rows are a view of
the buffers; otherwise they are gathered. Each buffer has one extra slot, the *trash slot*, where prompt writes
that must not land go; no query ever sees it.

Ragged calls (`ragged=True`, where the backbone has them: `Backbone.ragged_layers`, OPT, Llama-like LMs): while rows
decode, the prompt chunks `prefill` would encode in a window of their own (those of rows whose whole prompt it encodes)
ride in the next step's layer calls instead: per layer one call whose per-slot operations (norms, linears, MLP) run once
over the step's packed slots and the chunks' slots, and whose attention runs per group over views of each row's buffer
(`RaggedView`: the rows with one slot as one batch, each other row alone), so no K/V row is gathered per slot. A joining
prompt then costs no layer calls of its own. Where a riding row may leave early the step runs each exit layer over the
chunks too (`_riding_exit`: their K/V, and its first token's exit at its prompt's last slot). A step that ends at an
exit (below) leaves the chunks there with the tokens, as parked tokens (`_park_riding`), where each ends its prompt;
otherwise the chunks climb to the top. A step whose rows catch up more than `RAGGED_BACKLOG` slots (a parked prompt)
runs ragged calls too: its catch-up groups gather no K/V per slot.

Every row reads every live exit it reaches and leaves at the first one its own threshold accepts, exactly as
alone; what the step did not run for a token (layers above where it stopped) is caught up exactly at the next step
that goes deeper, as in the engines of `freevlm.decoding` (`kv="recompute"`): the states that stopped are kept
(`pending`) and join the window at the depth where they stopped. A gate that stops consulting exits would change
rows' exit layers, so there is none. A row at `kv="propagate"` has a leaving token's deeper K/V projected from its
state at the exit instead (`_propagate`), so nothing of it waits to be caught up. What the exit rule decides is
only which rows a layer runs and how far a step climbs (`exit_rule`):

- `ride_along`: a step climbs until every row's token is out; a row that left rides along while a deeper row
  climbs (its deeper K/V filled on the way). A mixed batch then runs as deep as its deepest row at every step.
- `park` (the default): a row that left is out of the deeper layers' calls (its layers above are caught up with
  its next deep token), and at each exit where some rows left and others climb on, the step stops when the
  climbing rows would make tokens more slowly per unit of time than a new step would (`_climb_on`, from measured
  costs of a layer call, of a row in it and of a step: `ROW_COST`, `STEP_COST`); their tokens
  wait at that exit and go on at the next step, joining at that depth, so the layers above run once for the rows
  gathered there. A token waits at most `max_wait` steps.

Either way each row's tokens and exit layers are those of `generate` alone: the rule moves work between steps,
never changes it. Nor does it change much how much there is: with `kv="recompute"` every slot goes through every
layer (and every exit layer) as soon as a later token of its row goes deeper, so exits save per-call costs (fewer
calls, catch-up slots riding in them), and the layers of an answer's last shallow tokens, not arithmetic per slot.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..backbones.base import Backbone, Context
from ..decoding.policies import max_probability
from ..decoding.static import SegmentRunner
from .row_kv import AttendGroup, RaggedPlan, RaggedView, RowKV, RowView

EXIT_RULES = ("park", "ride_along")
KEY_BUCKET = 16  # a window reads its rows' key slots up to the deepest one, rounded up to this (few mask shapes)
# The park rule's costs, in layer calls of one row (measured on the 2-core CPU at the demo's size, OPT 12 x 256,
# one thread, decode steps under load: a call ~560 us, each more row in it ~44 us, a step's own work (embedding,
# heads, packing, token choice) ~1 ms). On a GPU rows are nearly free up to ~200 per call: ROW_COST ~0.
ROW_COST = 0.08
STEP_COST = 2.0
RAGGED_BACKLOG = 8  # a step whose rows catch up more slots than this (a parked prompt) runs ragged calls


@dataclass
class _Riding:
    """Joining prompts' chunks that ride in a step's layer calls (`RowEngine(ragged=True)`), packed row after row."""

    rows: list[int]
    spans: list[tuple[int, int]]  # per row: (first slot, slots)
    states: torch.Tensor  # [m, H] at `depth`
    plan: RaggedPlan
    ending: list[int]  # the last item of each row whose whole prompt ends here: its first token's logits
    ends: list[int]  # those rows, in the same order
    depth: int = 0
    first: dict = field(default_factory=dict)  # row -> (logits [V], the final layer)


@dataclass
class _Pack:
    """The slots a segment of a step fills, one query row each (see `RowEngine._pack`)."""

    flat: torch.Tensor  # [m] where each sits in the step's window, flattened `[n * width]`
    row_ids: torch.Tensor  # [m] its row
    rows: list[int]
    selector: slice | torch.Tensor  # the K/V rows a layer call reads: a slice (a view) when item i is row i's only
    slots: torch.Tensor  # [m, 1] its slot
    slot_list: list[int]
    last: list[int]  # per row of the segment, in order: the item of its new slot
    last_items: torch.Tensor  # [k] the same, on the device
    key_length: int  # key slots the queries read (up to the deepest, rounded up to KEY_BUCKET)
    mask: torch.Tensor  # [m, 1, 1, key_length] slot <= the query's
    ctx: Context
    groups: list[AttendGroup]  # for a ragged call (`RaggedView`); rows with one slot come first
    memo: dict = field(default_factory=dict)  # its `RowView`s' write positions, shared by its layers


@dataclass
class StepOutput:
    """What a step produced for rows `[0, n)` (rows without a request hold garbage)."""

    logits: torch.Tensor  # [n, V] logits of the layer each row left at
    exit_at: list[int]  # that layer (num_layers = final)
    out: list[bool]  # whether each row's token is out (a parked row's is not: it goes on at a later step)
    first: dict[int, tuple[torch.Tensor, int]] = field(default_factory=dict)  # joining rows' first tokens (`prefill`)


class RowEngine:
    """K/V, pending states and per-row fill levels of a batch of independent rows (see the module docstring).

    A request joins with `join` (its image and prompt encoded by the backbone, batch 1), its prompt is encoded in
    chunks by `prefill` (so a long prompt never freezes the other rows for long): all of it where it runs in a window
    of rows (its first token then comes from `prefill`, from the first exit that lets it out or the last layer),
    else all but the last slot, its first `step`. `leave` frees the row at once: the next request overwrites it.
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
        graphs: bool = False,
        ragged: bool = True,
    ):
        if exit_rule not in EXIT_RULES:
            raise ValueError(f"exit_rule must be one of {EXIT_RULES}, got {exit_rule!r}")
        if not isinstance(max_wait, int) or max_wait < 0:
            raise ValueError(f"max_wait must be a non-negative integer, got {max_wait!r}")
        self.backbone, self.exits = backbone, exits
        self.exit_rule, self.max_wait = exit_rule, max_wait
        self.ragged = ragged  # prompts ride in steps where the backbone can (`Backbone.ragged_layers`): `prefill`
        self.riding: _Riding | None = None  # joining prompts' chunks staged by `prefill` for the next step
        self.num_layers = backbone.num_layers
        self.max_rows, self.max_len, self.max_prompt = max_rows, max_len, max_prompt
        self.trash = max_len
        self.kv = [RowKV(max_rows, max_len) for _ in range(self.num_layers)]
        self.exit_kv = {i: RowKV(max_rows, max_len) for i in sorted(exits) if exits[i].needs_cache}
        device = backbone.device
        self.pending = torch.zeros(max_rows, max_len + 1, backbone.hidden_size, dtype=backbone.dtype, device=device)
        self.rows_ctx = backbone.rows_context(max_rows, max_len + 1, max_prompt)
        self._key_slots = torch.arange(max_len + 1, device=device)
        # per row, on the host: the slot of its next new token, how far each layer is filled (the cache of an exit
        # layer at depth d is filled as far as layer d - 1: it runs over the slots that layer outputs)
        self.position = [0] * max_rows
        self.fill = [[0] * max_rows for _ in range(self.num_layers)]
        self.active = [False] * max_rows  # takes part in steps
        self.may_exit = [False] * max_rows
        self.propagate = [False] * max_rows  # kv="propagate": a token that leaves fills the deeper K/V at once
        self.threshold = torch.ones(max_rows, device=device)
        self.first_input: dict[int, torch.Tensor] = {}  # row -> [H] its last prompt slot's input, for its first step
        self.prompts: dict[int, tuple[Context, torch.Tensor, int]] = {}  # row -> (ctx, prompt embeds, slots encoded)
        self.waited = [0] * max_rows  # steps a row's token has waited at an exit (parked)
        # layer calls (exit layers included) from the bottom up to each exit, and from each exit to the top
        layered = [i for i in sorted(exits) if exits[i].needs_cache]
        self.calls_to = {i: i + sum(1 for j in layered if j <= i) for i in exits}
        self.calls_above = {i: self.num_layers - i + sum(1 for j in layered if j > i) for i in exits}
        self.first_exit_rate = 0.5  # running share of new tokens that leave at the first exit
        self.runner = SegmentRunner(graphs)  # CUDA graphs of plain segments, per (layers, row bucket): `_plain`
        self.steps = self.layer_calls = self.exit_calls = self.parks = 0
        self.row_steps = 0  # rows each step made a token for (or parked it), first tokens of riding prompts included
        self.slot_layers = 0  # (slot, layer) pairs run by steps, exit layers included: the work, catch-up and all
        self.window_slot_layers = 0  # (slot, layer) pairs run in prompt windows of their own (`_encode`), padding too
        self.catchup_slots = 0  # slot-layers run for tokens that stopped early at an earlier step
        self.kv_only_slot_layers = 0  # of the slot-layers, those that computed only K/V (`Backbone.run_layer_at`)
        self.projected_slot_layers = 0  # (slot, layer) K/V projected from an exit's state (kv="propagate")
        self.riding_slots = 0  # joining prompts' slots that rode in steps' layer calls (`prefill`, ragged)
        self.parked_prompts = 0  # of those prompts, the ones whose chunk stopped at an exit with the step

    # --- rows joining and leaving ---------------------------------------------------------------------------------
    def join(self, row: int, ctx: Context, threshold: float, may_exit: bool, kv: str = "recompute") -> None:
        """Row `row` takes request `ctx` (batch 1, no padding); its prompt is encoded by `prefill`. `kv` as in
        `DecodeConfig`: "propagate" fills a leaving token's deeper K/V from its state at the exit (`_propagate`)."""
        if self.active[row] or row in self.prompts:
            raise ValueError(f"row {row} is taken")
        self.backbone.join_row(self.rows_ctx, row, ctx)
        self.prompts[row] = (ctx, self.backbone.embed_prompt(ctx), 0)
        self.may_exit[row] = may_exit
        self.propagate[row] = kv == "propagate"
        self.threshold[row] = threshold

    def prefill(self, rows: list[int], budget: int) -> dict[int, tuple[torch.Tensor, int]]:
        """Encode up to `budget` more prompt slots of the joining `rows`, the first ones' first (a chunk goes past
        the budget where the backbone cannot cut the prompt there: `prefill_cut`). The chunks of the rows whose
        prompts may share a window of rows (`Backbone.prompt_in_rows`) run together, one call per layer; the others
        in their own context. A row whose prompt is encoded up to its end (`_prompt_end`) is active: one whose whole
        prompt was encoded got its first token's logits here and the layer it left at, returned `{row: ([V],
        layer)}` (its next step reads the token chosen from them); another has its last prompt slot as its first
        step."""
        chunks = {}  # row -> (slot of its chunk's first, slots in it)
        for row in rows:
            ctx, _, done = self.prompts[row]
            end = self._prompt_end(row)
            count = min(budget, end - done)
            if count > 0:  # a chunk the backbone may cut there (Gemma 3: an image whole)
                count = min(self.backbone.prefill_cut(ctx, done + count), end) - done
            if count > 0 or done == end:
                chunks[row] = (done, max(count, 0))
                budget -= max(count, 0)
        encode = [r for r, (_, count) in chunks.items() if count]
        together = [r for r in encode if self.backbone.prompt_in_rows(self.prompts[r][0])]
        riding = [r for r in together if self._prompt_end(r) == self._length(r)]  # see `_riding`
        if riding and self.ragged and any(self.active) and self.backbone.ragged_layers():
            self.riding = self._riding(riding, [chunks.pop(r) for r in riding])
            self.riding_slots += len(self.riding.states)
            together = [r for r in together if r in chunks]
        first = self._encode(together, [chunks[r] for r in together]) if together else {}
        for row in encode:
            if row in chunks and row not in together:
                self._encode([row], [chunks[row]], own=True)
        self._advance(chunks, first)
        return first

    def _advance(self, chunks: dict[int, tuple[int, int]], first: dict) -> None:
        """Joining rows whose chunks (`{row: (first slot, slots)}`) were encoded move on; a row whose prompt is
        encoded up to its end is active (its first step reads its last prompt slot unless `first` has its logits)."""
        for row, (done, count) in chunks.items():
            ctx, embeds, _ = self.prompts[row]
            end = self._prompt_end(row)
            if done + count < end:
                self.prompts[row] = (ctx, embeds, done + count)
                continue
            del self.prompts[row]
            if row not in first:
                self.first_input[row] = embeds[0, -1]
            self.position[row] = end
            for fill in self.fill:
                fill[row] = end
            self.waited[row] = 0
            self.active[row] = True

    def _riding(self, rows: list[int], spans: list[tuple[int, int]]) -> _Riding:
        """The chunks (`(first slot, slots)` of each of `rows`) of joining prompts, to ride in the next step's layer
        calls, each row's slots as one attention group over its own buffer row. Rows whose whole prompt is encoded
        (`_prompt_end`) ride; for one that may leave early the step also fills its exit layers' K/V and consults the
        exits at its prompt's last slot (`_riding_exit`)."""
        device = self.threshold.device
        states = torch.cat([self.prompts[r][1][0, done : done + count] for r, (done, count) in zip(rows, spans)])
        row_ids = torch.tensor([r for r, (_, count) in zip(rows, spans) for _ in range(count)], device=device)
        slots = torch.tensor([s for done, count in spans for s in range(done, done + count)], device=device)[:, None]
        lasts = [done + count - 1 for done, count in spans]
        groups = self._groups(rows, lasts, [count for _, count in spans], 0)
        plan = RaggedPlan(row_ids, slots, groups, self.backbone.window_context(self.rows_ctx, slots, row_ids))
        ends = itertools.accumulate(count for _, count in spans)
        ended = [(end - 1, r) for r, (done, count), end in zip(rows, spans, ends) if done + count == self._length(r)]
        return _Riding(rows, spans, states, plan, [item for item, _ in ended], [r for _, r in ended])

    def _prompt_end(self, row: int) -> int:
        """The prompt slots `prefill` encodes for a joining row: all of them where its prompt runs in a window of
        rows, its first token then chosen there (the last layer's, or an exit's on the way up: `_exit_in_window`; a
        step of its own for the last slot would cost its layer calls again), else all but the last (its first step).
        Not at kv="propagate" where the token may leave: its deeper K/V at that slot must be the projections."""
        early = self.may_exit[row] and self.propagate[row]
        whole = not early and self.backbone.prompt_in_rows(self.prompts[row][0])
        return self._length(row) - (0 if whole else 1)

    def _length(self, row: int) -> int:
        """A joining row's prompt slots."""
        return self.prompts[row][1].shape[1]

    def prompt_left(self, row: int) -> int:
        """Prompt slots a joining row has still to encode."""
        return self._prompt_end(row) - self.prompts[row][2]

    def leave(self, row: int) -> None:
        self.active[row] = False
        self.prompts.pop(row, None)
        self.first_input.pop(row, None)

    @property
    def rows_in_use(self) -> int:
        """Rows a step runs: up to the highest active one (a freed row below it runs as garbage)."""
        return max((r + 1 for r in range(self.max_rows) if self.active[r]), default=0)

    @torch.no_grad()
    def _encode(self, rows: list[int], chunks: list[tuple[int, int]], own: bool = False) -> dict:
        """Prompt chunks (`(first slot, slots)` of each of `rows`) through every layer, and every exit layer with a
        cache for the rows that may leave early: one call per layer over a window `[rows, longest chunk]`, each
        chunk from its row's first column (the columns past its end repeat its last slot, as a query, and write the
        trash slot). In a window of rows (`window_context`), or, `own`, in the one row's own context. Where no one
        reads a layer's output (an exit layer's, the last layer's but at the last slot of a whole prompt: see
        `_prompt_end`) only its K/V are computed (`Backbone.fill_kv`). Returns `{row: (logits [V], layer)}`: the first
        token of each row whose whole prompt ends in this window, from the first exit whose threshold it reaches at
        the last slot where the row may leave early (`_exit_in_window`), else from the last layer."""
        device, width = self.threshold.device, max(count for _, count in chunks)
        first = torch.tensor([done for done, _ in chunks], device=device)[:, None]
        last = torch.tensor([done + count - 1 for done, count in chunks], device=device)[:, None]
        wanted = first + torch.arange(width, device=device)
        slots = torch.minimum(wanted, last)  # [k, w] each query's slot
        index = torch.where(wanted <= last, slots, self.trash)  # where its K/V go
        x = torch.cat([self._prompt_chunk(r, done, count, width) for r, (done, count) in zip(rows, chunks)])
        if own:  # the row's own context reads its positions from the cache's start
            key_length, start = self.max_len + 1, chunks[0][0]
        else:
            key_length, start = self._key_length(int(last.max())), 0
        mask = self._causal(slots, key_length)[:, None]  # [k, 1, w, keys]

        def window(pick: list[int]):
            """The rows `pick` (places in `rows`) of a window of rows: a `RowView` maker, their context, places."""
            ids = [rows[i] for i in pick]
            places = torch.tensor(pick, device=device)
            if ids == list(range(len(ids))):  # rows 0..k-1 in order: the buffers' rows as a view
                selector, ctx = slice(0, len(ids)), self.backbone.window_context(self.rows_ctx, slots[places])
            else:
                selector = torch.tensor(ids, device=device)
                ctx = self.backbone.window_context(self.rows_ctx, slots[places], selector)
            picked, memo = index[places], {}
            return (lambda kv: RowView(kv, picked, selector, key_length, start, memo)), ctx, places

        everyone = list(range(len(rows)))
        if own:
            row = rows[0]
            memo, ctx = {}, self.prompts[row][0]

            def view(kv: RowKV) -> RowView:
                return RowView(kv, index, slice(row, row + 1), key_length, start, memo)

        else:
            view, ctx, _ = window(everyone)
        leaving = [i for i, r in enumerate(rows) if self.may_exit[r]]
        ending = [i for i, (r, (done, count)) in enumerate(zip(rows, chunks)) if done + count == self._length(r)]
        deciding = [i for i in ending if self.may_exit[rows[i]]]  # their first token may leave on the way up
        at = {i: chunks[i][1] - 1 for i in ending}  # the column of its last slot
        exits = {*(i for i in self.exit_kv if leaving), *(self.exits if deciding else ())}
        chosen = {}  # place in `rows` -> (logits [V], the layer its first token left at)
        for low, high in itertools.pairwise([0, *sorted(exits), self.num_layers]):
            for depth in range(low, high):
                layer = self.backbone.layers[depth]
                self.window_slot_layers += x.shape[0] * x.shape[1]
                if depth < self.num_layers - 1:
                    x = self.backbone.run_layer(layer, x, ctx, view(self.kv[depth]), mask, None)
                    continue
                final = [i for i in ending if i not in chosen]
                if final:  # the first token of the rows whose whole prompt ends here: the last layer's output there
                    keep = torch.tensor(final, device=device)
                    out = self.backbone.run_layer_at(layer, x, ctx, view(self.kv[depth]), mask, keep)
                    logits = self.backbone.head(out[torch.arange(len(final), device=device), self._at(at, final)])
                    chosen |= {i: (logits[j], self.num_layers) for j, i in enumerate(final)}
                else:  # no one reads the last layer's output at a prompt slot
                    self.backbone.fill_kv(layer, x, ctx, view(self.kv[depth]), mask)
            if high < self.num_layers:
                chosen |= self._exit_in_window(
                    high, x, mask, rows, leaving, [i for i in deciding if i not in chosen], at, window, view, ctx
                )
        return {rows[i]: token for i, token in chosen.items()}

    def _exit_in_window(self, depth, x, mask, rows, leaving, deciding, at, window, view, ctx) -> dict:
        """The exit at `depth` in a prompt window: its layer's K/V for the rows that may leave (no one reads its
        output at a prompt slot), and for `deciding` (places whose whole prompt ends here, their first token not
        out yet) its logits at their last slot, as their first `step` would take them there; returns
        `{place: (logits, depth)}` for those whose threshold it reaches."""
        device = x.device
        if depth in self.exit_kv:
            everyone = list(range(len(rows)))
            exit_view, exit_ctx, places = (view, ctx, slice(None)) if leaving == everyone else window(leaving)
            args = (self.exits[depth].layer, x[places], exit_ctx, exit_view(self.exit_kv[depth]), mask[places])
            self.window_slot_layers += len(leaving) * x.shape[1]
            if not deciding:
                self.backbone.fill_kv(*args)
                return {}
            keep = torch.tensor([leaving.index(i) for i in deciding], device=device)
            out = self.backbone.run_layer_at(*args, keep)
            features = out[torch.arange(len(deciding), device=device), self._at(at, deciding)]
        elif deciding:
            features = x[deciding, self._at(at, deciding)]
        else:
            return {}
        out = self._first_tokens_out(depth, features, [rows[i] for i in deciding])
        return {deciding[j]: token for j, token in out.items()}

    def _first_tokens_out(self, depth: int, features: torch.Tensor, rows: list[int]) -> dict:
        """Of the first tokens of `rows` at the exit at `depth` (`features [k, H]`: the exit layer's output at each
        one's prompt's last slot), those its row's threshold accepts: `{place in rows: (logits [V], depth)}`."""
        logits = self.exits[depth].logits(self.backbone, features)
        confident = self._confident(logits, torch.tensor(rows, device=features.device))
        return {j: (logits[j], depth) for j, out in enumerate(confident) if out}

    def _confident(self, logits: torch.Tensor, row_ids: torch.Tensor) -> list[bool]:
        """Whether each token's max softmax probability reaches its row's threshold (the one host read per exit)."""
        return (max_probability(logits) >= self.threshold[row_ids]).tolist()

    def _at(self, at: dict[int, int], places: list[int]) -> torch.Tensor:
        """The column of each place's last slot in a prompt window."""
        return torch.tensor([at[i] for i in places], device=self.threshold.device)

    def _causal(self, slots: torch.Tensor, key_length: int) -> torch.Tensor:
        """The bool mask `[..., q, key_length]` of queries at `slots [..., q]`: a key slot is seen up to the query's."""
        return self._key_slots[:key_length] <= slots[..., None]

    def _key_length(self, deepest: int) -> int:
        """Key slots a window reads whose deepest query slot is `deepest`: up to it, rounded up to `KEY_BUCKET`."""
        return min(self.max_len, -(-(deepest + 1) // KEY_BUCKET) * KEY_BUCKET)

    def _prompt_chunk(self, row: int, done: int, count: int, width: int) -> torch.Tensor:
        """`[1, width, H]`: row `row`'s prompt inputs at slots `[done, done + count)`, the last repeated to `width`."""
        chunk = self.prompts[row][1][:, done : done + count]
        return torch.cat([chunk, chunk[:, -1:].expand(-1, width - count, -1)], dim=1) if count < width else chunk

    # --- the step -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> StepOutput:
        """Every active row's token up the stack: a new one (`tokens [n]`: the last one it produced; ignored for a
        row at its first step, which reads its last prompt slot), or the one it parked at an earlier step, which
        joins at the exit where it stopped. Rows `[0, n)` with n = `rows_in_use`. The chunks `prefill` staged ride
        in its layer calls (the layers above where it stopped run for them alone); the rows they bring to their
        prompt's end are active after it, their first token's logits (where `prefill` would give them) in `first`."""
        riding, self.riding = self.riding, None
        out = self._step(tokens, riding)
        if riding is not None:
            if riding.depth < self.num_layers:  # the step ended at an exit (`_stops`): the chunks wait there too
                self._park_riding(riding)
            else:
                self._advance(dict(zip(riding.rows, riding.spans)), riding.first)
            out.first = riding.first
        return out

    def _step(self, tokens: torch.Tensor, riding: _Riding | None) -> StepOutput:
        n, backbone, device = self.rows_in_use, self.backbone, self.threshold.device
        rows = range(n)
        active = self.active[:n]
        position = self.position[:n]
        pos = torch.tensor(position, device=device)
        live = [i for i in sorted(self.exits) if any(self.may_exit[r] for r in rows if active[r])]
        joins = [i for i in self.exits if any(self.fill[i][r] != self.fill[i - 1][r] for r in rows if active[r])]
        riding_exits = list(self.exits) if riding is not None and any(self.may_exit[r] for r in riding.rows) else []
        bounds = sorted({0, *live, *joins, *riding_exits, self.num_layers})
        before = {b: self.fill[b][:n] for b in bounds[:-1]}  # fill levels at the start of the step, per segment
        fresh = [r for r in rows if active[r] and self.fill[0][r] <= position[r]]  # a new token (not parked)
        # calls are ragged with chunks riding, or with a prompt to catch up (a chunk that stopped at an exit); for a
        # few catch-up slots per row they measured ~2% slower under park
        backlog = max((position[r] + 1 - self.fill[-1][r] for r in rows if active[r]), default=0)
        ragged = riding is not None or (backlog > RAGGED_BACKLOG and self.ragged and backbone.ragged_layers())
        ride = self.exit_rule == "ride_along"
        self.steps += 1
        self.row_steps += sum(active) + (0 if riding is None else len(riding.ends))

        x = backbone.embed(backbone.window_context(self.rows_ctx, pos[:, None]), tokens[:n, None], None, 0)
        for r, value in self.first_input.items():
            x[r, 0] = value
        self.first_input = {}
        done = [not a for a in active]  # whose token is out (rows without a request: from the start)
        exit_at = [self.num_layers] * n
        logits = None
        width, below = 1, 0
        for first, last in itertools.pairwise(bounds):
            work = self._work(first, done, active, position, ride)
            need = max((position[r] + 1 - self.fill[first][r] for r in work), default=1)
            if need > width:  # pending slots join: the window grows to the left
                x = torch.cat([x.new_zeros(n, need - width, x.shape[-1]), x], dim=1)
                width = need
            if first > 0:
                slots = pos[:, None] - width + 1 + torch.arange(width, device=device)[None]
                x = self._join_pending(x, slots, before[first], before[below], rows, active)
            below = first
            if not work:
                if riding is not None:
                    self._ragged(first, last, None, None, riding)
                    if last in riding_exits:
                        self._riding_exit(last, riding)
                continue
            pack = self._pack(x, first, work, position, ragged)
            work = [pack.rows[i] for i in pack.last]  # the pack's order
            self.catchup_slots += (len(pack.flat) - len(work)) * (last - first)
            x, states = self._layers(first, last, x, pack, ragged, riding)
            if last in riding_exits:
                self._riding_exit(last, riding)
            if last == self.num_layers:
                break
            if last not in live:
                continue
            left, exit_logits = self._exit(last, states, pack, done)
            for i, r in enumerate(work):
                if left[i]:
                    done[r], exit_at[r] = True, last
            logits = self._merge(logits, exit_logits, work, left, n)
            projected = {r for i, r in enumerate(work) if left[i] and self.propagate[r]}
            if projected:
                self._propagate(last, states, pack, projected)
            if not ride and any(left):  # a token out now keeps its state here for later steps
                self._park(states, pack, {r for i, r in enumerate(work) if left[i]} - projected)
            if last == live[0] and fresh:
                share = sum(1 for r in fresh if done[r]) / len(fresh)
                self.first_exit_rate += 0.2 * (share - self.first_exit_rate)
            if self._stops(last, done, live, riding):
                climbing = {r for r in rows if not done[r]}
                self.parks += bool(climbing)
                self.parked_prompts += 0 if riding is None else len(riding.rows)
                self._park(states, pack, climbing if self.exit_rule == "park" else set(work) - projected)
                self._stopped(done)
                return StepOutput(logits, exit_at, done)
        top = [r for r in rows if not done[r]]
        final = backbone.head(x[:, -1] if len(top) == n else x[top, -1])
        logits = self._merge(logits, final, top, [True] * len(top), n)
        done = [True] * n
        self._stopped(done)
        return StepOutput(logits, exit_at, done)

    def _work(self, first: int, done: list[bool], active: list[bool], position: list[int], ride: bool) -> list[int]:
        """The rows a segment from layer `first` runs: those with slots to fill there (a token parked deeper has
        none below where it waits). Riding along (`ride`), rows that left go on with the others; parking, they are
        out of the deeper layers' batch, their skipped layers caught up when a later token of theirs goes deeper. A
        row at kv="propagate" never rides along: its deeper K/V are the projections of its state at the exit."""
        fill = self.fill[first]
        return [
            r
            for r, a in enumerate(active)
            if a and ((ride and not self.propagate[r]) or not done[r]) and position[r] + 1 > fill[r]
        ]

    def _pack(self, x: torch.Tensor, first: int, work: list[int], position: list[int], ragged: bool) -> _Pack:
        """The slots the rows in `work` fill in this segment (from the segment's fill level to the row's new slot),
        each its own query row: no row pads its window to another's width. Rows with one slot come first (one
        attention batch in a ragged call: `_groups`)."""
        width = x.shape[1]
        fill = self.fill[first]
        counts = {r: position[r] + 1 - fill[r] for r in work}
        work = sorted(work, key=lambda r: counts[r] > 1)
        flat, rows_of, slots_of, last = [], [], [], []
        for r in work:
            count = counts[r]
            start = r * width + width - count
            flat.extend(range(start, start + count))
            rows_of.extend([r] * count)
            slots_of.extend(range(position[r] + 1 - count, position[r] + 1))
            last.append(len(flat) - 1)
        device = x.device
        slots = torch.tensor(slots_of, device=device)[:, None]
        row_ids = torch.tensor(rows_of, device=device)
        key_length = self._key_length(max(slots_of))
        mask = self._causal(slots, key_length)[:, None]
        in_order = rows_of == list(range(len(rows_of)))  # one slot per row, rows 0..k-1: no gather
        ctx = self.backbone.window_context(self.rows_ctx, slots, None if in_order else row_ids)
        selector = slice(0, len(rows_of)) if in_order else row_ids
        flat_t, last_items = torch.tensor(flat, device=device), torch.tensor(last, device=device)
        singles = sum(1 for r in work if counts[r] == 1)
        lasts = [position[r] for r in work]
        groups = self._groups(work, lasts, [counts[r] for r in work], singles) if ragged else []
        return _Pack(
            flat_t, row_ids, rows_of, selector, slots, slots_of, last, last_items, key_length, mask, ctx, groups
        )

    def _groups(self, rows: list[int], lasts: list[int], counts: list[int], batched: int) -> list[AttendGroup]:
        """Attention groups over slots packed row after row (`counts[i]` slots of `rows[i]`, its last at slot
        `lasts[i]`): the first `batched` rows, one slot each, as one batch; each other row alone over its own
        buffer row."""
        device, groups = self.threshold.device, []
        if batched:
            ids = rows[:batched]
            slots = torch.tensor(lasts[:batched], device=device)[:, None]
            key_length = self._key_length(max(lasts[:batched]))
            mask = self._causal(slots, key_length)[:, None]
            contiguous = ids == list(range(ids[0], ids[0] + batched))
            selector = slice(ids[0], ids[0] + batched) if contiguous else torch.tensor(ids, device=device)
            groups.append(AttendGroup(slice(0, batched), selector, 1, key_length, mask))
        start = batched
        for row, last, count in zip(rows[batched:], lasts[batched:], counts[batched:]):
            key_length = self._key_length(last)
            slots = torch.arange(last + 1 - count, last + 1, device=device)
            mask = self._causal(slots, key_length)[None, None]
            groups.append(AttendGroup(slice(start, start + count), slice(row, row + 1), count, key_length, mask))
            start += count
        return groups

    def _layers(
        self, first: int, last: int, x, pack: _Pack, ragged: bool, riding: _Riding | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LM layers `first..last-1` over the packed slots (every layer of a segment is filled to the same slot):
        the window with their new states, and those states `[m, 1, H]`. The last layer's output is read only at
        the new slots (the final head), so caught-up slots get only their K/V there (`Backbone.run_layer_at`).
        Every row's new slot and nothing else (a plain segment) replays a CUDA graph where graphs are on. `ragged`:
        in ragged calls (`_ragged`), with the chunks riding."""
        n, width, hidden = x.shape
        plain = width == 1 and len(pack.rows) == n and isinstance(pack.selector, slice)  # each row's new slot
        states = x if plain else x.reshape(n * width, hidden).index_select(0, pack.flat)[:, None]
        if ragged:
            states = self._ragged(first, last, states[:, 0], pack, riding)[:, None]
        elif plain and self.runner.enabled:
            states = self._plain(first, last, states, pack.slots)
        else:
            for depth in range(first, last):
                view = RowView(self.kv[depth], pack.slots, pack.selector, pack.key_length, memo=pack.memo)
                layer = self.backbone.layers[depth]
                if depth == self.num_layers - 1 and len(pack.rows) > len(pack.last):
                    states = self.backbone.run_layer_at(layer, states, pack.ctx, view, pack.mask, pack.last_items)
                else:
                    states = self.backbone.run_layer(layer, states, pack.ctx, view, pack.mask, None)
        flat = pack.flat[pack.last_items] if last == self.num_layers else pack.flat  # the slots whose states came out
        touched = set(pack.rows)
        for fill in self.fill[first:last]:
            for r in touched:
                fill[r] = self.position[r] + 1
        if last == self.num_layers:
            self.kv_only_slot_layers += len(pack.rows) - len(pack.last)
        self.layer_calls += last - first
        self.slot_layers += len(pack.rows) * (last - first)
        if plain:  # the window is the packed slots
            return states, states
        x = x.reshape(n * width, hidden).index_copy(0, flat, states[:, 0]).view(n, width, hidden)
        return x, states

    def _plain(self, first: int, last: int, states: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Layers `first..last-1` over every row's new slot (`states [n, 1, H]` at `slots [n, 1]`) as one captured
        CUDA graph per (layers, row bucket): rows padded up to a power of two (at most `max_rows`) whose K/V go to
        the trash slot, every key slot read under the mask, so the shapes are the bucket's whatever the rows' slots
        and the depths their earlier tokens left at. What the graph closes over is fixed; the rest is its inputs."""
        n = states.shape[0]
        bucket = min(1 << (n - 1).bit_length(), self.max_rows)
        pad = bucket - n
        x = torch.cat([states, states.new_zeros(pad, *states.shape[1:])]) if pad else states
        at = torch.cat([slots, slots.new_zeros(pad, 1)]) if pad else slots  # padded rows: positions 0
        index = torch.cat([slots, slots.new_full((pad, 1), self.trash)]) if pad else slots
        (out,) = self.runner((first, last, bucket), self._segment(first, last, bucket), x, at, index)
        return out[:n].clone()  # the graph's output buffer is overwritten at its next replay

    def _segment(self, first: int, last: int, rows: int):
        """The function `_plain` captures: layers `first..last-1` over rows `[0, rows)` of the buffers."""

        def run(x: torch.Tensor, slots: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor]:
            ctx = self.backbone.window_context(self.rows_ctx, slots)
            mask = self._causal(slots, self.max_len)[:, None]
            memo: dict = {}
            for depth in range(first, last):
                view = RowView(self.kv[depth], index, slice(0, rows), self.max_len, memo=memo)
                x = self.backbone.run_layer(self.backbone.layers[depth], x, ctx, view, mask, None)
            return (x,)

        return run

    def _ragged(
        self, first: int, last: int, states: torch.Tensor | None, pack: _Pack | None, riding: _Riding | None
    ) -> torch.Tensor | None:
        """LM layers `first..last-1` as ragged calls (`Backbone.run_layer_ragged`) over a segment's packed slots
        (`states [m, H]`; none: the riding chunks alone) and the riding chunks': one call per layer, the linears
        once over all of them, attention per group (`RaggedView`). Their states come out `[m, H]`; at the top only
        at each row's new slot (`pack.last`), and the chunks' at the last slot of each prompt that ends there give
        its first token's logits (`riding.first`), unless that token left at an exit on the way."""
        m = 0 if pack is None else len(pack.rows)
        if riding is None:
            plan = RaggedPlan(pack.row_ids, pack.slots, pack.groups, pack.ctx, pack.memo)
        else:
            plan = riding.plan if pack is None else self._plan(pack, riding)
            states = riding.states if pack is None else torch.cat([states, riding.states])
        top = last == self.num_layers
        # at the top, the first tokens of the prompts that end here and did not leave at an exit (`_riding_exit`)
        final = [] if riding is None else [(i, r) for i, r in zip(riding.ending, riding.ends) if r not in riding.first]
        keep = None
        if top and (riding is not None or len(pack.rows) > len(pack.last)):
            items = [*([] if pack is None else pack.last), *(m + i for i, _ in final)]
            keep = torch.tensor(items, dtype=torch.long, device=states.device)
        for depth in range(first, last):
            view = RaggedView(self.kv[depth], plan)
            at = keep if depth == self.num_layers - 1 else None
            states = self.backbone.run_layer_ragged(self.backbone.layers[depth], states, plan.ctx, view, at)
        if riding is None:
            return states
        self.slot_layers += len(riding.states) * (last - first)  # the riding slots (`_layers` counts the segment's)
        if top:
            self.kv_only_slot_layers += len(riding.states) - len(final)
        self.layer_calls += last - first if pack is None else 0  # with a segment, `_layers` counts its calls
        riding.depth = last
        if not top:
            riding.states, states = states[m:], states[:m]
        else:
            kept = 0 if pack is None else len(pack.last)
            if final:
                logits = self.backbone.head(states[kept:])
                riding.first |= {row: (row_logits, self.num_layers) for (_, row), row_logits in zip(final, logits)}
            states = states[:kept]
        return None if pack is None else states

    def _riding_exit(self, depth: int, riding: _Riding) -> None:
        """The exit at `depth` for the riding chunks, where a riding row may leave early: its layer's K/V at their
        slots (a ragged call; no one reads its output at a prompt slot), and at the last slot of a prompt that ends
        here whose first token is not out yet its logits: that token leaves here if its row's threshold accepts
        (`riding.first`), as in a window (`_exit_in_window`)."""
        deciding = [
            (item, row)
            for item, row in zip(riding.ending, riding.ends)
            if self.may_exit[row] and row not in riding.first
        ]
        keep = torch.tensor([item for item, _ in deciding], dtype=torch.long, device=riding.states.device)
        if depth in self.exit_kv:
            view = RaggedView(self.exit_kv[depth], riding.plan)
            layer = self.exits[depth].layer
            features = self.backbone.run_layer_ragged(layer, riding.states, riding.plan.ctx, view, keep)
            self.exit_calls += 1
            self.slot_layers += len(riding.states)
        else:
            features = riding.states[keep]
        if deciding:
            out = self._first_tokens_out(depth, features, [row for _, row in deciding])
            riding.first |= {deciding[j][1]: token for j, token in out.items()}

    def _plan(self, pack: _Pack, riding: _Riding) -> RaggedPlan:
        """One ragged call's slots: a segment's packed slots, then the riding chunks'."""
        m = len(pack.rows)
        row_ids = torch.cat([pack.row_ids, riding.plan.row_ids])
        slots = torch.cat([pack.slots, riding.plan.slots])
        shifted = [replace(g, items=slice(g.items.start + m, g.items.stop + m)) for g in riding.plan.groups]
        ctx = self.backbone.window_context(self.rows_ctx, slots, row_ids)
        return RaggedPlan(row_ids, slots, pack.groups + shifted, ctx)

    def _exit(self, depth: int, states, pack: _Pack, done: list[bool]) -> tuple[list[bool], torch.Tensor]:
        """The exit at `depth` for the packed rows: its layer over their slots (filling its own cache; caught-up
        slots need only their K/V: `Backbone.run_layer_at`), its logits at each row's new slot `[k, V]`, and which
        rows leave: those that may, whose token is not out yet, and whose max softmax probability reaches their
        threshold (the one host read per exit)."""
        exit_module, last = self.exits[depth], pack.last_items
        features = states[last, 0]
        if exit_module.needs_cache:
            view = RowView(self.exit_kv[depth], pack.slots, pack.selector, pack.key_length, memo=pack.memo)
            if len(pack.rows) > len(pack.last):
                features = self.backbone.run_layer_at(exit_module.layer, states, pack.ctx, view, pack.mask, last)
                self.kv_only_slot_layers += len(pack.rows) - len(pack.last)
            else:  # one slot per row: `last` is every item, in order
                features = self.backbone.run_layer(exit_module.layer, states, pack.ctx, view, pack.mask, None)
            features = features[:, 0]
            self.exit_calls += 1
            self.slot_layers += len(pack.rows)
        logits = exit_module.logits(self.backbone, features)
        work = [pack.rows[i] for i in pack.last]
        confident = self._confident(logits, pack.row_ids[last])
        left = [c and self.may_exit[r] and not done[r] for c, r in zip(confident, work)]
        return left, logits

    @staticmethod
    def _merge(logits, new: torch.Tensor, work: list[int], take: list[bool], n: int) -> torch.Tensor:
        """`logits [n, V]` with the rows of `work` whose `take` is set replaced by their row of `new` `[k, V]`."""
        picked = [i for i, t in enumerate(take) if t]
        if logits is None and len(picked) == n and work == list(range(n)):  # every row's, in order
            return new
        if logits is None:
            logits = new.new_zeros(n, new.shape[-1])
        if picked:
            index = torch.tensor([work[i] for i in picked], device=new.device)
            logits = logits.index_copy(0, index, new[picked])
        return logits

    def _stops(self, depth: int, done: list[bool], live: list[int], riding: _Riding | None) -> bool:
        """Whether the step ends at exit `depth`: every token is out, or the park rule parks those that are not
        (`_climb_on`). Riding chunks stop there with the tokens (`_park_riding`) where each ends its prompt (a chunk
        that does not is read at every layer by its prompt's next one) and the rule is `park`; a riding row's first
        token not out yet counts as a climbing row's."""
        if riding is not None and (self.exit_rule != "park" or len(riding.ends) < len(riding.rows)):
            return False
        waiting = 0 if riding is None else sum(1 for r in riding.ends if r not in riding.first)
        if all(done) and not waiting:
            return True
        joining = (0, 0) if riding is None else (len(riding.ends) - waiting, waiting)
        return not self._climb_on(depth, done, live, joining)

    def _climb_on(self, depth: int, done: list[bool], live: list[int], joining: tuple[int, int] = (0, 0)) -> bool:
        """Whether the step goes on above exit `depth` for the rows whose token is not out yet, or parks them there.
        `joining`: riding rows whose first token is out, and those whose first token is not (counted as the others).

        Going on costs the layer calls above `depth` (each dearer by `ROW_COST` per climbing row), and makes one
        token per climbing row; parking them lets the next step start at once, and its first exit makes tokens for
        about `first_exit_rate` of the rows that are out now, at the cost of the layers up to it (with every row
        in them) and of a step's own work (`STEP_COST`). The step goes on when the climbing rows make tokens at
        least as fast for the time, or when a climbing row has waited `max_wait` steps already (a bound on its
        delay); `exit_rule="ride_along"` always goes on."""
        if self.exit_rule == "ride_along":
            return True
        waiting = [r for r, d in enumerate(done) if not d]
        if max((self.waited[r] for r in waiting), default=0) >= self.max_wait:
            return True
        climbing = len(waiting) + joining[1]
        rows_out = sum(1 for r, d in enumerate(done) if d and self.active[r]) + joining[0]
        going_on = self.calls_above[depth] * (1 + ROW_COST * climbing)
        next_step = self.calls_to[live[0]] * (1 + ROW_COST * (rows_out + climbing)) + STEP_COST
        return climbing * next_step >= self.first_exit_rate * rows_out * going_on

    def _park_riding(self, riding: _Riding) -> None:
        """The step ended at exit `riding.depth` with chunks riding, each the end of its prompt (`_stops`): their rows
        are active, the chunks' states kept there as a parked token's are (the layers and exit layers above are
        caught up when a later token of the row goes deeper), and a row whose first token is not out yet waits at
        its prompt's last slot as a parked token does."""
        depth, spans = riding.depth, dict(zip(riding.rows, riding.spans))
        self._advance(spans, riding.first)
        rows = [r for r, (_, count) in spans.items() for _ in range(count)]
        slots = [s for done, count in spans.values() for s in range(done, done + count)]
        self._keep_pending(rows, slots, riding.states)
        for r, (done, _) in spans.items():
            for fill in self.fill[depth:]:
                fill[r] = done
            if r not in riding.first:
                self.position[r] -= 1
                self.first_input.pop(r)
                self.waited[r] = 1

    def _stopped(self, done: list[bool]) -> None:
        """Rows whose token is out take their next slot; the others wait (at the exit where the step stopped, or
        deeper where they waited already: their fill levels say where)."""
        for r, d in enumerate(done):
            if not self.active[r]:
                continue
            if d:
                self.position[r] += 1
                self.waited[r] = 0
            else:
                self.waited[r] += 1

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

    def _propagate(self, depth: int, states: torch.Tensor, pack: _Pack, rows: set[int]) -> None:
        """Tokens of `rows` (kv="propagate") left at exit `depth`: every deeper layer's and exit layer's K/V at their
        slot are projected from their state there, as `generate` does (`Backbone.propagated_kv`: one stacked
        matmul where the family allows), so nothing of theirs is pending. A row at propagate has one slot in a
        pack (nothing of it is ever caught up)."""
        items = [i for i in pack.last if pack.rows[i] in rows]
        ids = [pack.rows[i] for i in items]
        device = states.device
        row_ids, slots = torch.tensor(ids, device=device), pack.slots[items]
        hidden = states[items]
        ctx = self.backbone.window_context(self.rows_ctx, slots, row_ids)
        deeper = [i for i in self.exit_kv if i > depth]
        caches = [*self.kv[depth:], *(self.exit_kv[i] for i in deeper)]
        exit_layers = {i: self.exits[i].layer for i in self.exit_kv}
        out = self.backbone.propagated_kv(depth, exit_layers, hidden, ctx, None, 0)
        memo: dict = {}
        for cache, (keys, values) in zip(caches, out):
            RowView(cache, slots, row_ids, 0, memo=memo).write(keys, values)
        for fill in self.fill[depth:]:
            for r in ids:
                fill[r] = self.position[r] + 1
        self.projected_slot_layers += len(ids) * len(caches)

    def _park(self, states: torch.Tensor, pack: _Pack, keep: set[int]) -> None:
        """Keep the packed states of the rows in `keep` (at the depth the step reached) for the layers above; a
        slot that waits from an earlier step is not in the pack and keeps the state it has."""
        items = [i for i, r in enumerate(pack.rows) if r in keep]
        if items:
            self._keep_pending([pack.rows[i] for i in items], [pack.slot_list[i] for i in items], states[items, 0])

    def _keep_pending(self, rows: list[int], slots: list[int], states: torch.Tensor) -> None:
        """`states [k, H]` kept in `pending` at each one's (row, slot), for the layers above where they stopped."""
        where = torch.tensor([r * (self.max_len + 1) + s for r, s in zip(rows, slots)], device=states.device)
        self.pending.view(-1, self.pending.shape[-1]).index_copy_(0, where, states)
