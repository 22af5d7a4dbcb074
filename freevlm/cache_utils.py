"""Key/value storage for the engines: one attention layer's cache, and the view a layer call sees of it.

Early exits make a cache ragged: a token that left at layer e has no K/V in the layers above e until a later token
catches it up. Both kinds keep one buffer `[batch, heads, slots, head_dim]` for the whole batch (slots are sequence
indices shared by all rows; padding is on the left), allocated at the first write, and differ in how full it is:

- `LayerKV` (the general engine): a fill level per row, since rows leave at their own layers and are compacted
  out. A write covers a window of slots for some rows and lands only where the row's slot was not filled yet, so a
  window may start below a row's fill level without clobbering what is there.
- `StaticKV` (the static engine): every row filled to the same slot, written at a slot tensor (`index_copy_`) and
  read whole under a mask, so each call has the same shapes (and may be captured as a CUDA graph).

Both are a `LayerCache` (fill levels, `store`, `crop`, `reorder`, as `transformers.cache_utils` keeps its dynamic
and static layers side by side); their views (`KVView`, `StaticView`) are what a Hugging Face attention module
calls `update` on.
"""

from __future__ import annotations

import torch


class LayerCache:
    """Keys and values of one attention layer, `[batch, heads, slots, head_dim]`, and how far each row is filled."""

    def __init__(self, batch_size: int, slots: int):
        self.batch_size, self.slots = batch_size, slots
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def _allocate(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self.keys is None:
            shape = (self.batch_size, keys.shape[1], self.slots, keys.shape[3])
            self.keys, self.values = keys.new_zeros(shape), values.new_zeros(shape)

    filled: list[int]  # per row: how many leading slots hold valid K/V

    def store(self, rows: torch.Tensor | None, ids: list[int], start: int, keys: torch.Tensor, values: torch.Tensor):
        """Write K/V of slots `[start, start + q)` for `rows` (None: all; `ids`: the same on the host) and count
        them filled (state propagation fills the layers a token skipped)."""
        raise NotImplementedError

    def crop(self, row: int, length: int) -> None:
        """Forget slots at or after `length` of `row` (a rejected speculative draft)."""
        raise NotImplementedError

    def reorder(self, index: torch.Tensor) -> None:
        """Rows follow `index` (beam search picks which hypothesis each row continues)."""
        raise NotImplementedError

    def take_rows(self, other: LayerCache, index: torch.Tensor) -> None:
        """Start from another batch's cache: row i holds `other`'s row index[i], as far as that was filled (copies
        of one batch sharing one prompt encoding)."""
        if other.keys is not None:
            self._allocate(other.keys, other.values)
            used = other.keys.shape[2]
            self.keys[:, :, :used].copy_(other.keys.index_select(0, index))  # in place: captured graphs read these
            self.values[:, :, :used].copy_(other.values.index_select(0, index))
        self._take_fill([other.filled[i] for i in index.tolist()])

    def _take_fill(self, filled: list[int]) -> None:
        raise NotImplementedError


class LayerKV(LayerCache):
    """A layer's K/V with a fill level per row (rows leave at their own layers)."""

    def __init__(self, batch_size: int, capacity: int):
        super().__init__(batch_size, capacity)
        self.filled = [0] * batch_size  # host-side, so fill levels are read without a device sync

    def write(
        self,
        rows: torch.Tensor | None,
        start: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        valid: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store K/V of slots `[start, start + q)` for `rows` (None: all) and return each row's K/V up to there.

        `valid[n, q]` says which of the new entries may be written (None: all of them).
        """
        end = start + keys.shape[2]
        if end > self.slots:
            raise RuntimeError(f"KV cache full: slot {end} exceeds capacity {self.slots}")
        self._allocate(keys, values)
        if valid is not None:
            mask = valid[:, None, :, None]
        if rows is None:
            k_win, v_win = self.keys[:, :, start:end], self.values[:, :, start:end]
            if valid is None:
                k_win.copy_(keys)
                v_win.copy_(values)
            else:
                k_win.copy_(torch.where(mask, keys, k_win))
                v_win.copy_(torch.where(mask, values, v_win))
            return self.keys[:, :, :end], self.values[:, :, :end]
        if valid is not None:
            keys = torch.where(mask, keys, self.keys[rows, :, start:end])
            values = torch.where(mask, values, self.values[rows, :, start:end])
        self.keys[rows, :, start:end] = keys
        self.values[rows, :, start:end] = values
        return self.keys[rows, :, :end], self.values[rows, :, :end]

    def store(self, rows, ids, start, keys, values):
        self.write(rows, start, keys, values, None)
        for b in ids:
            self.filled[b] = start + keys.shape[2]

    def crop(self, row: int, length: int) -> None:
        self.filled[row] = min(self.filled[row], length)

    def _take_fill(self, filled: list[int]) -> None:
        self.filled = filled

    def reorder(self, index: torch.Tensor) -> None:
        self.filled = [self.filled[i] for i in index.tolist()]
        if self.keys is not None:
            self.keys = self.keys.index_select(0, index)
            self.values = self.values.index_select(0, index)


class StaticKV(LayerCache):
    """A layer's K/V for a batch whose rows move together: one fill level."""

    def __init__(self, batch_size: int, slots: int):
        super().__init__(batch_size, slots)
        self.fill = 0

    @property
    def filled(self) -> list[int]:
        return [self.fill] * self.batch_size

    def store(self, rows, ids, start, keys, values):
        if rows is not None:
            raise ValueError("a static cache's rows move together: store every row")
        slots = torch.arange(start, start + keys.shape[2], device=keys.device)
        StaticView(self, slots, start).update(keys, values)
        self.fill = start + keys.shape[2]

    def crop(self, row: int, length: int) -> None:
        """Rows move together, so every row forgets those slots."""
        self.fill = min(self.fill, length)

    def _take_fill(self, filled: list[int]) -> None:
        if len(set(filled)) > 1:
            raise ValueError(f"a static cache's rows move together: cannot take rows filled to {sorted(set(filled))}")
        self.fill = filled[0]

    def reorder(self, index: torch.Tensor) -> None:
        """In place: captured graphs keep writing into these very buffers."""
        if self.keys is not None:
            self.keys.copy_(self.keys.index_select(0, index))
            self.values.copy_(self.values.index_select(0, index))


class KVView:
    """What a Hugging Face attention module sees as `past_key_values` during one call of one layer: a window of
    `rows` from slot `start`; only `valid` entries (None: all) are written."""

    def __init__(self, kv: LayerKV, rows: torch.Tensor | None, start: int, valid: torch.Tensor | None):
        self.kv, self.rows, self.start, self.valid = kv, rows, start, valid

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.kv.write(self.rows, self.start, key_states, value_states, self.valid)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start


class StaticView(KVView):
    """A static cache as one call sees it: writes at `slots`, reads every slot (`key_length` of them)."""

    def __init__(self, kv: StaticKV, slots: torch.Tensor, start: int):
        super().__init__(kv, None, start, None)
        self.slots, self.key_length = slots, kv.slots

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        kv = self.kv
        kv._allocate(key_states, value_states)
        kv.keys.index_copy_(2, self.slots, key_states)
        kv.values.index_copy_(2, self.slots, value_states)
        return kv.keys, kv.values
