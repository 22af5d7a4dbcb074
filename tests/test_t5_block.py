"""The T5 decoder-block call of a decode step (`t5_block_forward`, masks superposed once per window) is bitwise
Hugging Face's block, is used only where it is, and is what BLIP-2-T5 decoding runs."""

import pytest
import torch
from test_opt_layer import _window  # the same windows: a 24-slot buffer, row 1 padded
from transformers import T5Config
from transformers.models.t5.modeling_t5 import T5Block

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.backbones import blip2_t5
from freevlm.backbones.base import cache_keyword
from freevlm.backbones.blip2_t5 import _T5CacheView, create_position_bias_mask, plain_t5_block, t5_block_forward
from freevlm.cache_utils import StaticKV, StaticView
from freevlm.tiny import tiny_blip2, tiny_inputs


def _blocks(feed_forward: str, dtype: torch.dtype) -> list[T5Block]:
    config = T5Config(
        d_model=64, d_kv=16, d_ff=128, num_heads=4, is_decoder=True, feed_forward_proj=feed_forward, dropout_rate=0.1
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    blocks = [T5Block(config, has_relative_attention_bias=i == 0, layer_idx=i) for i in range(2)]
    return [block.to(dtype).eval() for block in blocks]


@pytest.mark.parametrize("feed_forward", ["relu", "gated-gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()  # as decoding runs (a mask that needs grad takes another SDPA kernel)
def test_equals_hugging_face_block_bitwise(feed_forward, dtype):
    blocks = _blocks(feed_forward, dtype)
    encoder = torch.randn(2, 7, 64, dtype=dtype)
    encoder_mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    encoder_mask[1, ..., :3] = False  # a padded image/prompt
    attn = blocks[0].layer[0].SelfAttention
    ours = [StaticKV(2, 24) for _ in blocks]
    theirs = [StaticKV(2, 24) for _ in blocks]
    start = 0
    for size in (9, 1, 4, 1, 2):  # a prompt, then single slots and catch-up windows
        slots, mask = _window(start, size)
        bias = attn.compute_bias(size, 24, past_seen_tokens=start).to(dtype)
        cross_bias = torch.zeros(1, 4, size, 7, dtype=dtype)
        self_mask = create_position_bias_mask(bias, mask, False, encoder, encoder)
        cross_mask = create_position_bias_mask(cross_bias, encoder_mask, False, encoder, encoder)
        hidden = torch.randn(2, size, 64, dtype=dtype)
        expected = got = hidden
        for block, our_kv, their_kv in zip(blocks, ours, theirs):
            cross = block.layer[1].EncDecAttention
            cross_kv = tuple(f(encoder).view(2, 7, 4, 16).transpose(1, 2) for f in (cross.k, cross.v))
            cache = {cache_keyword(T5Block): _T5CacheView(StaticView(their_kv, slots, start), *cross_kv)}
            expected, _, _ = block(
                expected,
                attention_mask=mask,
                position_bias=bias,
                encoder_hidden_states=encoder,
                encoder_attention_mask=encoder_mask,
                encoder_decoder_position_bias=cross_bias,
                **cache,
            )
            got = t5_block_forward(block, got, StaticView(our_kv, slots, start), self_mask, cross_kv, cross_mask)
            assert torch.equal(got, expected)
            assert torch.equal(our_kv.keys, their_kv.keys) and torch.equal(our_kv.values, their_kv.values)
        start += size


def test_used_only_where_exact():
    block = _blocks("gated-gelu", torch.float32)[1]
    assert plain_t5_block(block)
    block.train()
    assert not plain_t5_block(block)  # dropout
    block.eval()
    handle = block.layer[2].DenseReluDense.wo.register_forward_hook(lambda *args: None)
    assert not plain_t5_block(block)  # a hook would be skipped
    handle.remove()
    assert plain_t5_block(block)
    block.layer[0].SelfAttention.config._attn_implementation = "eager"
    assert not plain_t5_block(block)  # another attention kernel
    block.layer[0].SelfAttention.config._attn_implementation = "sdpa"
    assert not plain_t5_block(_blocks("relu", torch.float16)[1])  # Hugging Face clamps float16 states

    class Custom(T5Block):
        pass

    assert not plain_t5_block(Custom(block.layer[0].SelfAttention.config, layer_idx=1).eval())  # may override forward
    swapped = _blocks("relu", torch.float32)[1]
    swapped.layer[1].EncDecAttention.q = torch.nn.Sequential(swapped.layer[1].EncDecAttention.q)
    assert not plain_t5_block(swapped)  # a swapped linear (an adapter, LoRA)
    assert plain_t5_block(block)
    block.layer[2].DenseReluDense.wi_1 = torch.nn.Sequential(block.layer[2].DenseReluDense.wi_1)
    assert not plain_t5_block(block)  # swapped after a first check
    encoder_block = T5Block(T5Config(d_model=64, d_kv=16, d_ff=128, num_heads=4), layer_idx=0).eval()
    assert not plain_t5_block(encoder_block)  # no cross-attention


@pytest.mark.parametrize("static", [True, False])
def test_decoding_runs_the_block_path_and_equals_hugging_face(monkeypatch, static):
    model = tiny_blip2("t5", seed=0)
    pv, ids, mask = tiny_inputs(model, batch=3, prompt_len=6, seed=1)
    mask[1, :2] = 0  # a padded row
    calls = []
    forward = blip2_t5.t5_block_forward
    monkeypatch.setattr(blip2_t5, "t5_block_forward", lambda *a: calls.append(a[0]) or forward(*a))
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 2]))
    with torch.no_grad():
        expected = model.generate(
            pixel_values=pv, input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False
        )
    got = ee.generate(pv, ids, mask, max_new_tokens=6, threshold=1.0, static=static).sequences
    assert torch.equal(got, expected)
    assert set(map(id, calls)) == set(map(id, ee.backbone.layers))  # every LM block
