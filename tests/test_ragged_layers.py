"""A ragged layer call (`Backbone.run_layer_ragged`: several rows' slots packed into one call, attention per row over
its own K/V) computes what the family's layer computes over each row's window alone (`Backbone.run_layer`): the same
outputs and the same K/V at each (row, slot). OPT through its tensor operations, Llama through the layer's own
submodules with each slot rotated at its own position and grouped-query K/V heads (4 query, 2 K/V here)."""

import pytest
import torch

from freevlm.backbones import load_backbone
from freevlm.serving.row_kv import AttendGroup, RaggedPlan, RaggedView, RowKV, RowView
from freevlm.tiny import tiny_model

SLOTS = 16


def _causal(first: int, count: int, key_length: int) -> torch.Tensor:
    """`[1, 1, count, key_length]`: slots first..first+count-1 see every key slot up to their own."""
    queries = torch.arange(first, first + count)[:, None]
    return (torch.arange(key_length)[None, :] <= queries)[None, None]


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_a_ragged_call_equals_each_rows_window(family):
    backbone = load_backbone(tiny_model(family, seed=3, num_layers=2))
    assert backbone.ragged_layers()
    layer, width = backbone.layers[1], backbone.hidden_size
    rows_ctx = backbone.rows_context(3, SLOTS, 8)
    # row 0: slots 0-4 (a prompt), then 5-6; row 2: slots 0-2, then 3 (a decode token); row 1 stays empty
    spans = {0: [(0, 5), (5, 2)], 2: [(0, 3), (3, 1)]}
    torch.manual_seed(0)
    hidden = {
        (row, i): torch.randn(count, width) for row, chunks in spans.items() for i, (_, count) in enumerate(chunks)
    }

    windowed, outputs = RowKV(3, SLOTS), {}
    with torch.no_grad():
        for i in range(2):
            for row, chunks in spans.items():
                first, count = chunks[i]
                slots = torch.arange(first, first + count)[None]
                ctx = backbone.window_context(rows_ctx, slots, torch.tensor([row]))
                view = RowView(windowed, slots, slice(row, row + 1), first + count)
                mask = _causal(first, count, first + count)
                outputs[row, i] = backbone.run_layer(layer, hidden[row, i][None], ctx, view, mask, None)[0]

    ragged = RowKV(3, SLOTS)
    with torch.no_grad():
        for i in range(2):
            packed, row_ids, slot_ids, groups = [], [], [], []
            for row, chunks in spans.items():
                first, count = chunks[i]
                items = slice(len(slot_ids), len(slot_ids) + count)
                groups.append(
                    AttendGroup(items, slice(row, row + 1), count, first + count, _causal(first, count, first + count))
                )
                packed.append(hidden[row, i])
                row_ids += [row] * count
                slot_ids += range(first, first + count)
            row_ids, slots = torch.tensor(row_ids), torch.tensor(slot_ids)[:, None]
            plan = RaggedPlan(row_ids, slots, groups, backbone.window_context(rows_ctx, slots, row_ids))
            out = backbone.run_layer_ragged(layer, torch.cat(packed), plan.ctx, RaggedView(ragged, plan), None)
            for (row, _), got in zip(spans.items(), out.split([chunks[i][1] for chunks in spans.values()])):
                torch.testing.assert_close(got, outputs[row, i], rtol=1e-5, atol=1e-5)

    filled = torch.zeros(3, SLOTS + 1, dtype=torch.bool)
    filled[0, :7], filled[2, :4] = True, True
    for buffer, expected in ((ragged.keys, windowed.keys), (ragged.values, windowed.values)):
        torch.testing.assert_close(
            buffer.transpose(1, 2)[filled], expected.transpose(1, 2)[filled], rtol=1e-5, atol=1e-5
        )
        assert buffer.transpose(1, 2)[filled].abs().sum() > 0
    assert ragged.keys.shape[1] == (2 if family == "llama" else 4)  # Llama's grouped-query K/V heads


def test_keep_gives_the_kept_slots_outputs():
    """`keep` (the top layer at each row's new slot): those slots' outputs, all slots' K/V."""
    backbone = load_backbone(tiny_model("llama", seed=3, num_layers=2))
    layer, width = backbone.layers[0], backbone.hidden_size
    rows_ctx = backbone.rows_context(2, SLOTS, 8)
    slots, row_ids = torch.tensor([0, 1, 2, 0, 1])[:, None], torch.tensor([0, 0, 0, 1, 1])
    groups = [
        AttendGroup(slice(0, 3), slice(0, 1), 3, 3, _causal(0, 3, 3)),
        AttendGroup(slice(3, 5), slice(1, 2), 2, 2, _causal(0, 2, 2)),
    ]
    hidden = torch.randn(5, width)
    outs = []
    for keep in (None, torch.tensor([2, 4])):
        plan = RaggedPlan(row_ids, slots, groups, backbone.window_context(rows_ctx, slots, row_ids))
        with torch.no_grad():
            outs.append(backbone.run_layer_ragged(layer, hidden, plan.ctx, RaggedView(RowKV(2, SLOTS), plan), keep))
    torch.testing.assert_close(outs[1], outs[0][[2, 4]])
