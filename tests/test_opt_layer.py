"""The OPT layer call of a decode step (`opt_layer_forward`) is bitwise Hugging Face's layer, and is used only where
it is (an unmodified layer in eval mode with SDPA and no hooks); `opt_layer_kv` writes bitwise the same K/V."""

import pytest
import torch
from transformers import OPTConfig
from transformers.models.opt.modeling_opt import OPTDecoderLayer

from freevlm.backbones.base import cache_keyword
from freevlm.backbones.blip2_opt import opt_layer_forward, opt_layer_kv, plain_opt_layer
from freevlm.cache_utils import StaticKV, StaticView


def _layer(pre_norm: bool = True, bias: bool = True) -> OPTDecoderLayer:
    config = OPTConfig(
        hidden_size=64,
        num_attention_heads=4,
        ffn_dim=256,
        do_layer_norm_before=pre_norm,
        enable_bias=bias,
        dropout=0.1,
        attention_dropout=0.1,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return OPTDecoderLayer(config, layer_idx=0).eval()


def _window(start: int, size: int, slots: int = 24, padded: int = 2):
    keys, queries = torch.arange(slots), torch.arange(start, start + size)
    key_ok = torch.ones(2, slots, dtype=torch.bool)
    key_ok[1, :padded] = False
    mask = ((keys[None, :] <= queries[:, None])[None] & key_ok[:, None, :]) | (keys[None, :] == queries[:, None])[None]
    return queries, mask[:, None]


@pytest.mark.parametrize("pre_norm", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_hugging_face_layer_bitwise(pre_norm, bias):
    layer = _layer(pre_norm, bias)
    assert plain_opt_layer(layer)
    ours, theirs = StaticKV(2, 24), StaticKV(2, 24)
    start = 0
    for size in (9, 1, 4, 1, 2):  # a prompt, then single slots and catch-up windows
        hidden = torch.randn(2, size, 64)
        slots, mask = _window(start, size)
        cache = {cache_keyword(OPTDecoderLayer): StaticView(theirs, slots, start)}  # the keyword varies by release
        with torch.no_grad():
            expected = layer(hidden, attention_mask=mask, **cache)
            got = opt_layer_forward(layer, hidden, StaticView(ours, slots, start), mask)
        assert torch.equal(got, expected)
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
        start += size


@pytest.mark.parametrize("pre_norm", [True, False])
def test_kv_alone_equals_the_layers_bitwise(pre_norm):
    """An exit layer's prompt slots need only their K/V (`Backbone.fill_kv`): the same bits the whole layer writes."""
    layer = _layer(pre_norm)
    whole, alone = StaticKV(2, 24), StaticKV(2, 24)
    start = 0
    for size in (9, 1, 4):
        hidden = torch.randn(2, size, 64)
        slots, mask = _window(start, size)
        with torch.no_grad():
            opt_layer_forward(layer, hidden, StaticView(whole, slots, start), mask)
            opt_layer_kv(layer, hidden, StaticView(alone, slots, start))
        assert torch.equal(alone.keys, whole.keys) and torch.equal(alone.values, whole.values)
        start += size


def test_kept_rows_equal_the_whole_layers():
    """`keep`: every row's K/V written bitwise, the output of the kept rows only (a decode step's new slots)."""
    layer = _layer()
    whole, part = StaticKV(2, 24), StaticKV(2, 24)
    hidden = torch.randn(2, 9, 64)
    slots, mask = _window(0, 9)
    keep = torch.tensor([1])
    with torch.no_grad():
        expected = opt_layer_forward(layer, hidden, StaticView(whole, slots, 0), mask)
        got = opt_layer_forward(layer, hidden, StaticView(part, slots, 0), mask, keep)
    assert torch.equal(part.keys, whole.keys) and torch.equal(part.values, whole.values)
    assert got.shape == (1, 9, 64)
    torch.testing.assert_close(got, expected[keep], rtol=0, atol=1e-6)


def test_used_only_where_exact():
    layer = _layer()
    assert plain_opt_layer(layer)
    layer.train()
    assert not plain_opt_layer(layer)  # dropout
    layer.eval()
    handle = layer.fc1.register_forward_hook(lambda *args: None)
    assert not plain_opt_layer(layer)  # a hook would be skipped
    handle.remove()
    assert plain_opt_layer(layer)
    layer.self_attn.config._attn_implementation = "eager"
    assert not plain_opt_layer(layer)  # another attention kernel
    layer.self_attn.config._attn_implementation = "sdpa"

    class Custom(OPTDecoderLayer):
        pass

    custom = Custom(layer.self_attn.config, layer_idx=0).eval()
    assert not plain_opt_layer(custom)  # a subclass may override forward
    custom = _layer()
    custom.fc1 = torch.nn.Sequential(custom.fc1)
    assert not plain_opt_layer(custom)  # a swapped linear (an adapter, LoRA)
    assert plain_opt_layer(layer)
    layer.self_attn.v_proj = torch.nn.Sequential(layer.self_attn.v_proj)
    assert not plain_opt_layer(layer)  # swapped after a first check
