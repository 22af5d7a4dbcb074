"""Key/value storage for a layer whose rows may be filled to different lengths.

Early exits make the cache ragged: a token that left at layer e has no K/V in the layers above e until a later
token catches it up, and in a batch every row leaves at its own layer. Each `LayerKV` keeps one preallocated
buffer for the whole batch (slots are sequence indices shared by all rows; padding is on the left) and, per row,
how many slots are filled. A write covers a window of slots for some rows and only lands where the row's slot was
not filled yet, so a window may start below a row's fill level without clobbering what is there.
"""

from __future__ import annotations

import torch


class LayerKV:
    """Keys and values of one attention layer, `[batch, heads, capacity, head_dim]`, with per-row fill levels."""

    def __init__(self, batch_size: int, capacity: int):
        self.capacity = capacity
        self.filled = [0] * batch_size  # host-side: how many leading slots of each row hold valid K/V
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

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
        if end > self.capacity:
            raise RuntimeError(f"KV cache full: slot {end} exceeds capacity {self.capacity}")
        if self.keys is None:
            shape = (len(self.filled), keys.shape[1], self.capacity, keys.shape[3])
            self.keys = keys.new_zeros(shape)
            self.values = values.new_zeros(shape)
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

    def reorder(self, index: torch.Tensor) -> None:
        """Rows follow `index` (beam search picks which hypothesis each row continues)."""
        order = index.tolist()
        self.filled = [self.filled[i] for i in order]
        if self.keys is not None:
            self.keys = self.keys.index_select(0, index)
            self.values = self.values.index_select(0, index)


class KVView:
    """What a Hugging Face attention module sees as `past_key_values` during one call of one layer."""

    def __init__(self, kv: LayerKV, rows: torch.Tensor | None, start: int, valid: torch.Tensor | None):
        self.kv, self.rows, self.start, self.valid = kv, rows, start, valid

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self.kv.write(self.rows, self.start, key_states, value_states, self.valid)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.start
