"""The K/V buffers of rows at their own positions, and the views a layer call reads them through.

Every attention layer has one buffer `[rows, heads, slots + 1, head_dim]` per K and V, allocated at its first write;
a row's sequence starts at slot 0 of its own row, and the last slot is a trash slot where writes that must not land
go (no query ever reads it). `RowView` is what a Hugging Face attention module sees as its cache for one call (each
query row's K/V written at its own slots, its row's key slots read back); `RaggedView` is the cache of a ragged layer
call (`Backbone.run_layer_ragged`): writes at each packed slot's (row, slot), attention per group of rows over views
of the buffers. `serving.rows.RowEngine` decides which slots a call runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..backbones.base import Context


class RowKV:
    """One attention layer's K/V for every row, `[rows, heads, slots + 1, head_dim]` (the last slot: trash)."""

    def __init__(self, rows: int, slots: int):
        self.rows, self.slots = rows, slots
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None


class RowView:
    """What a Hugging Face attention module sees as its cache for one call: writes each query row's K/V at its own
    slots (`index [n, w]`, the trash slot where nothing may land) and returns the first `key_length` slots of each
    query row's buffer row: `rows` a slice (a view of the buffers) or a tensor of row ids, one per query row (packed
    slots of one row repeat it; a gathered copy). The views of one window share `memo`, where the write positions
    are computed once for all its layers."""

    def __init__(
        self,
        kv: RowKV,
        index: torch.Tensor,
        rows: slice | torch.Tensor,
        key_length: int,
        start: int = 0,
        memo: dict | None = None,
    ):
        self.kv, self.index, self.rows, self.start, self.key_length = kv, index, rows, start, key_length
        self.memo = {} if memo is None else memo

    def _where(self, heads: int) -> torch.Tensor:
        """Where each (query row, head, column) lands in a buffer viewed `[rows * heads * slots, head_dim]`: one
        `index_copy_` writes a window's K/V (a scatter along the slots costs 3-4x more at 16 rows)."""
        if heads not in self.memo:
            rows, device = self.rows, self.index.device
            if isinstance(rows, slice):
                rows = torch.arange(rows.start, rows.stop, device=device)
            head = torch.arange(heads, device=device)
            where = (rows[:, None, None] * heads + head[None, :, None]) * (self.kv.slots + 1) + self.index[:, None]
            self.memo[heads] = where.flatten()
        return self.memo[heads]

    def write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """K/V `[query rows, heads, w, head_dim]` at each query row's slots."""
        kv = self.kv
        if kv.keys is None:  # allocated once, at the first write (heads and head size come from the layer)
            shape = (kv.rows, key_states.shape[1], kv.slots + 1, key_states.shape[3])
            kv.keys, kv.values = key_states.new_zeros(shape), value_states.new_zeros(shape)
        where, width = self._where(key_states.shape[1]), key_states.shape[3]
        kv.keys.view(-1, width).index_copy_(0, where, key_states.reshape(-1, width))
        kv.values.view(-1, width).index_copy_(0, where, value_states.reshape(-1, width))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.write(key_states, value_states)
        kv, seen = self.kv, slice(0, self.key_length)
        if isinstance(self.rows, slice):
            return kv.keys[self.rows, :, seen], kv.values[self.rows, :, seen]
        return kv.keys[:, :, seen].index_select(0, self.rows), kv.values[:, :, seen].index_select(0, self.rows)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start


@dataclass
class AttendGroup:
    """Packed query slots that attend together (`RaggedView.attend`): `items` of the pack, `queries` consecutive ones
    per row of `rows` (a slice of the buffers: a view; or row ids: one copy per row, never per slot)."""

    items: slice
    rows: slice | torch.Tensor
    queries: int
    key_length: int
    mask: torch.Tensor  # [rows, 1, queries, key_length] key slot <= the query's


@dataclass
class RaggedPlan:
    """A ragged layer call's packed slots: each one's row and slot, and the groups they attend in."""

    row_ids: torch.Tensor  # [m]
    slots: torch.Tensor  # [m, 1]
    groups: list[AttendGroup]
    ctx: Context
    memo: dict = field(default_factory=dict)  # write positions, shared by the plan's layers


class RaggedView:
    """One layer's cache in a ragged call (`Backbone.run_layer_ragged`): K/V of every packed slot written at its
    (row, slot) in one `index_copy_`, attention per group over views of its rows' buffers, so packing slots of many
    rows into one call gathers no K/V per slot."""

    def __init__(self, kv: RowKV, plan: RaggedPlan):
        self.kv, self.plan = kv, plan

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """K/V `[m, heads, head_dim]` of the packed slots."""
        plan = self.plan
        RowView(self.kv, plan.slots, plan.row_ids, 0, memo=plan.memo).write(keys[:, :, None], values[:, :, None])

    def attend(self, queries: torch.Tensor, scale: float) -> torch.Tensor:
        """Scaled dot-product attention of the packed queries `[m, heads, head_dim]`, each over its row's key slots
        up to its own: one call per group (rows with one query as one batch `[k, heads, 1, keys]`, a row with
        several as `[1, heads, q, keys]`)."""
        heads, head_dim = queries.shape[1:]
        out = []
        for group in self.plan.groups:
            query = queries[group.items].view(-1, group.queries, heads, head_dim).transpose(1, 2)
            seen = slice(0, group.key_length)
            if isinstance(group.rows, slice):
                keys, values = self.kv.keys[group.rows, :, seen], self.kv.values[group.rows, :, seen]
            else:
                keys = self.kv.keys[:, :, seen].index_select(0, group.rows)
                values = self.kv.values[:, :, seen].index_select(0, group.rows)
            if keys.shape[1] != heads:  # grouped-query attention: each K/V head serves consecutive query heads
                keys = keys.repeat_interleave(heads // keys.shape[1], dim=1)  # (Hugging Face's `repeat_kv`)
                values = values.repeat_interleave(heads // values.shape[1], dim=1)
            attended = F.scaled_dot_product_attention(query, keys, values, attn_mask=group.mask, scale=scale)
            out.append(attended.transpose(1, 2).reshape(-1, heads, head_dim))
        return out[0] if len(out) == 1 else torch.cat(out)
