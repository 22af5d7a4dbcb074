"""Propagate mode's stacked K/V projection: one matmul for many layers gives each layer's own K/V, and a changed
weight is never projected from a stale stack."""

import pytest
import torch

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.tiny import tiny_blip2, tiny_inputs


def layer_kv(backbone, layer, x):
    """K/V the way the layer itself computes them (its norm module, then its k/v linears)."""
    if backbone.family == "opt":
        attn = layer.self_attn
        normed = layer.self_attn_layer_norm(x) if layer.do_layer_norm_before else x
        k, v, heads, dim = attn.k_proj, attn.v_proj, attn.num_heads, attn.head_dim
    else:
        attn = layer.layer[0].SelfAttention
        normed = layer.layer[0].layer_norm(x)
        k, v, heads, dim = attn.k, attn.v, attn.n_heads, attn.key_value_proj_dim
    shape = (*x.shape[:-1], heads, dim)
    return k(normed).view(shape).transpose(1, 2), v(normed).view(shape).transpose(1, 2)


@pytest.mark.parametrize("family,pre_norm", [("opt", True), ("opt", False), ("t5", None)])
def test_stacked_projection_is_each_layers_own(family, pre_norm):
    model = tiny_blip2(family, seed=1)
    backbone = EarlyExitVLM.from_backbone(model, ExitConfig([1])).backbone
    layers = list(backbone.layers)
    for layer in layers if pre_norm is False else []:
        layer.do_layer_norm_before = False  # OPT-350m's post-norm layers: K/V read the raw hidden state
    with torch.no_grad():
        for layer in layers:  # norms with non-trivial affines, so folding them into the weights is tested
            for p in layer.parameters():
                if p.dim() == 1:
                    p.uniform_(0.5, 1.5)
        x = torch.randn(2, 3, backbone.hidden_size)
        for first in (0, 2):
            got = backbone.kv_projections(layers, first, x, None, None, 0)
            assert len(got) == len(layers) - first
            for layer, (keys, values) in zip(layers[first:], got):
                want_k, want_v = layer_kv(backbone, layer, x)
                assert torch.allclose(keys, want_k, atol=1e-5) and torch.allclose(values, want_v, atol=1e-5)


def test_changed_weights_rebuild_the_stack():
    model = tiny_blip2("opt", seed=2)
    backbone = EarlyExitVLM.from_backbone(model, ExitConfig([1])).backbone
    layers = list(backbone.layers)
    x = torch.randn(1, 2, backbone.hidden_size)
    with torch.no_grad():
        before = backbone.kv_projections(layers, 0, x, None, None, 0)[-1][0]
        layers[-1].self_attn.k_proj.weight.mul_(2.0)  # in place, as an optimizer step would
        after = backbone.kv_projections(layers, 0, x, None, None, 0)[-1][0]
        assert torch.allclose(after, layer_kv(backbone, layers[-1], x)[0], atol=1e-5)
        assert not torch.allclose(after, before)


def test_propagate_engines_agree_with_stacked_projection():
    """The static and the general engine fill deeper caches the same way: same tokens at every step."""
    from conftest import RandomPolicy

    model = tiny_blip2("opt", seed=3)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 2]))
    pv, ids, mask = tiny_inputs(model)
    runs = [
        ee.generate(
            pv, ids, mask, max_new_tokens=8, policy=RandomPolicy(0.5, 7), kv="propagate", static=static, eos_token_id=[]
        )
        for static in (True, False)
    ]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert torch.equal(runs[0].exit_layers, runs[1].exit_layers)
    assert runs[0].stats.work.kv_projections == runs[1].stats.work.kv_projections > 0
