"""The decoding engine: equal to Hugging Face where no exit is taken, really skips layers, keeps caches exact."""

import pytest
import torch
import torch.nn.functional as F
from conftest import RandomPolicy, TokenHashPolicy
from transformers import DynamicCache

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.backbones.base import cache_keyword, decoder_positions
from freevlm.decoding.policies import FixedSchedulePolicy
from freevlm.tiny import tiny_blip2, tiny_inputs

MAX_NEW = 10


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("batch,pad", [(1, False), (3, True)])
def test_full_and_threshold_one_equal_hf_generate(family, seed, batch, pad):
    model = tiny_blip2(family, seed=seed, num_layers=4)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 2, 3]))
    pv, ids, mask = tiny_inputs(model, batch=batch, prompt_len=2 + seed % 3, seed=seed, pad=pad)
    ref = model.generate(
        pixel_values=pv, input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, num_beams=1
    )
    full = ee.generate(pv, ids, mask, max_new_tokens=MAX_NEW, mode="full")
    never = ee.generate(pv, ids, mask, max_new_tokens=MAX_NEW, threshold=1.0)
    assert torch.equal(full.sequences, ref)
    assert torch.equal(never.sequences, ref)
    real = never.exit_layers[never.exit_layers >= 0]
    assert (real == model.config.text_config.num_hidden_layers if family == "opt" else real == 4).all()


def test_images_change_the_output(model):
    """Guards the dead-vision-path trap: two images with the same prompt give different LM inputs."""
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([2]))
    pv, ids, mask = tiny_inputs(model, batch=2, seed=3)
    ids[1], mask[1] = ids[0], mask[0]
    _, embeds, _ = ee.backbone.image_prompt_embeds(pv, ids, mask)
    assert not torch.allclose(embeds[0], embeds[1], atol=1e-3)


def test_threshold_zero_leaves_at_first_exit_and_runs_nothing_above(model):
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([2, 3]))
    calls = [0] * ee.backbone.num_layers
    hooks = [
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(ee.backbone.layers)
    ]
    exit3_calls = []
    hooks.append(ee.exits["3"].layer.register_forward_hook(lambda *_: exit3_calls.append(1)))
    try:
        pv, ids, mask = tiny_inputs(model, batch=2, seed=1)
        out = ee.generate(pv, ids, mask, max_new_tokens=MAX_NEW, threshold=0.0)
    finally:
        for h in hooks:
            h.remove()
    real = out.exit_layers[out.exit_layers >= 0]
    assert (real == 2).all()
    # the prompt (all but its last slot) is encoded once by every layer; T5's decoder prompt is one token
    encode_calls = 1 if ee.backbone.family == "opt" else 0
    assert calls[0] == calls[1] == out.stats.steps + encode_calls
    assert calls[2:] == [encode_calls] * (ee.backbone.num_layers - 2)
    assert len(exit3_calls) == encode_calls
    assert out.stats.analytic_speedup == pytest.approx(4 / 3)


def _reference_caches(ee, out, pv, ids, mask, **inputs):
    """Per-layer K/V and hidden states of the full model run once over prompt + generated tokens (`inputs`: the
    family's others; Gemma 3's token_type_ids are 0 at the generated tokens)."""
    backbone = ee.backbone
    generated = out.sequences[:, out.engine.ctx.prompt_ids.shape[1] :]
    decoder_only = not backbone.lm.config.is_encoder_decoder
    instruction = {k: inputs.pop(k) for k in list(inputs) if k.startswith("qformer_")}  # the image path's, not the LM's
    if "mm_token_type_ids" in inputs:
        return _qwen_vl_reference(backbone, out.engine.ctx, generated, pv, ids, mask, **inputs)
    if decoder_only:
        image_inputs = {k: inputs.pop(k) for k in list(inputs) if k in ("pixel_attention_mask", "image_sizes")}
        _ids_all, embeds, mask_all = backbone.image_prompt_embeds(pv, ids, mask, **instruction, **image_inputs)
        gen_embeds = backbone.lm.get_input_embeddings()(generated[:, :-1])
        embeds = torch.cat([embeds, gen_embeds], dim=1)
        mask_all = torch.cat([mask_all, torch.ones_like(generated[:, :-1])], dim=1)
        if "token_type_ids" in inputs:
            inputs["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.zeros_like(generated[:, :-1])], 1)
        full_cache = {cache_keyword(type(backbone.lm)): DynamicCache()}  # keeps every slot, sliding windows too
        res = backbone.lm(
            inputs_embeds=embeds,
            attention_mask=mask_all,
            position_ids=decoder_positions(mask_all),
            use_cache=True,
            output_hidden_states=True,
            **full_cache,
            **inputs,
        )
        cache = _cache_of(res)
    else:
        _, embeds, mask_all = backbone.image_prompt_embeds(pv, ids, mask, **instruction)
        dec_ids = out.sequences[:, :-1]
        res = backbone.lm(
            inputs_embeds=embeds,
            attention_mask=mask_all,
            decoder_input_ids=dec_ids,
            use_cache=True,
            output_hidden_states=True,
        )
        cache = _cache_of(res).self_attention_cache
    hidden = res.hidden_states if decoder_only else res.decoder_hidden_states
    return [(cache.layers[j].keys, cache.layers[j].values) for j in range(backbone.num_layers)], hidden


def _qwen_vl_reference(backbone, ctx, generated, pv, ids, mask, image_grid_thw, mm_token_type_ids):
    """Qwen-VL's: the model's language model over prompt + generated tokens, positions from the model's own
    `get_rope_index` over all of them (the generated tokens as text after the prompt), Qwen3-VL's DeepStack features
    given as its forward takes them. Its hidden states are the layers' outputs before DeepStack's features are added,
    so those are added here as the next layer reads them. (Generated tokens go in as embeddings: one may be the
    image token's id, which the model's own generate embeds as text.)"""
    model = backbone.model.model
    ids_all = torch.cat([ids, generated[:, :-1]], dim=1)
    grow = torch.ones_like(generated[:, :-1])
    mask_all = torch.cat([mask, grow], dim=1)
    positions, _ = model.get_rope_index(
        ids_all,
        mm_token_type_ids=torch.cat([mm_token_type_ids, 0 * grow], dim=1),
        image_grid_thw=image_grid_thw,
        attention_mask=mask_all,
    )
    embeds = torch.cat([ctx.prompt_embeds, backbone.embed(ctx, generated[:, :-1], None, ids.shape[1])], dim=1)
    deepstack = {}
    levels = getattr(model.get_image_features(pv, image_grid_thw, return_dict=True), "deepstack_features", None)
    if levels:
        deepstack["deepstack_visual_embeds"] = [
            torch.cat(list(f)) if isinstance(f, (list, tuple)) else f for f in levels
        ]
        deepstack["visual_pos_masks"] = F.pad(ids == backbone.config.image_token_index, (0, grow.shape[1]))
    res = model.language_model(
        inputs_embeds=embeds,
        attention_mask=mask_all,
        position_ids=positions,
        use_cache=True,
        output_hidden_states=True,
        **{cache_keyword(type(backbone.lm)): DynamicCache()},
        **deepstack,
    )
    cache, hidden = _cache_of(res), list(res.hidden_states)
    for level, features in enumerate(ctx.extra.get("deepstack", [])):
        hidden[level + 1] = hidden[level + 1].clone()
        hidden[level + 1][:, : features.shape[1]] += features
    return [(cache.layers[j].keys, cache.layers[j].values) for j in range(backbone.num_layers)], hidden


def _cache_of(output):
    """The cache a Hugging Face forward returned (`cache` in current releases, `past_key_values` before)."""
    return output.get("cache", output.past_key_values)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recompute_caches_equal_full_model(family, batch, seed):
    model = tiny_blip2(family, seed=seed, num_layers=6)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 3, 4]))
    pv, ids, mask = tiny_inputs(model, batch=batch, seed=seed, pad=True)
    out = ee.generate(
        pv,
        ids,
        mask,
        max_new_tokens=12,
        policy=RandomPolicy(0.4, seed),
        eos_token_id=[],
        return_engine=True,
        batch_policy="per_row",
    )
    hist = out.stats.exit_histogram
    assert len(hist) >= 3, f"schedule not mixed enough to test catch-up: {hist}"
    assert out.stats.work.catchup_slots > 0
    _assert_caches_equal_full_model(ee, out, pv, ids, mask)


def _assert_caches_equal_full_model(ee, out, pv, ids, mask, **inputs):
    """Every layer's and every exit layer's K/V, as far as filled, equal the full model's (padding slots aside)."""
    engine, batch = out.engine, ids.shape[0]
    ref, hidden = _reference_caches(ee, out, pv, ids, mask, **inputs)
    key_ok = engine.ctx.key_mask
    checked = 0
    for j, (ref_k, ref_v) in enumerate(ref):
        kv = engine.kv[j]
        for b in range(batch):
            n = kv.filled[b]
            real = key_ok[b, :n]  # padding slots hold K/V nobody reads
            assert torch.allclose(kv.keys[b, :, :n][:, real], ref_k[b, :, :n][:, real], atol=1e-5), (j, b)
            assert torch.allclose(kv.values[b, :, :n][:, real], ref_v[b, :, :n][:, real], atol=1e-5), (j, b)
            checked += n
    total = ref[0][0].shape[2]
    assert checked > batch * total * ee.backbone.num_layers // 2
    # the exit layers' own caches: E_i run over the full model's hidden_states[i]
    for i, kv in engine.exit_kv.items():
        ref_kv = _exit_reference(ee, i, hidden[i], engine)
        for b in range(batch):
            n = kv.filled[b]
            real = key_ok[b, :n]
            assert torch.allclose(kv.keys[b, :, :n][:, real], ref_kv[0][b, :, :n][:, real], atol=1e-5), (i, b)


def _exit_reference(ee, i, hidden_i, engine):
    from freevlm.backbones.base import causal_padding_mask
    from freevlm.cache_utils import KVView, LayerKV

    batch, length = hidden_i.shape[:2]
    kv = LayerKV(batch, length)
    mask = causal_padding_mask(engine.ctx.key_mask, 0, length)
    ee.backbone.run_layer(ee.exits[str(i)].layer, hidden_i, engine.ctx, KVView(kv, None, 0, None), mask, None)
    return kv.keys, kv.values


def test_tokens_after_catch_up_are_the_full_models_choice(family):
    """A token that goes through all layers after others left early gets the full model's greedy token."""
    model = tiny_blip2(family, seed=4, num_layers=6)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([2, 4]))
    pv, ids, mask = tiny_inputs(model, batch=1, seed=4)
    schedule = [2, 4, 2, 2, 6, 4, 6, 2, 6]
    out = ee.generate(
        pv, ids, mask, max_new_tokens=len(schedule), policy=FixedSchedulePolicy(schedule), eos_token_id=[]
    )
    assert out.exit_layers[0].tolist() == schedule
    prompt_len = out.sequences.shape[1] - len(schedule)
    for t, layer in enumerate(schedule):
        if layer == 6:
            prefix = out.sequences[:, : prompt_len + t]
            assert int(out.sequences[0, prompt_len + t]) == _full_next_token(ee, pv, ids, prefix)


def _full_next_token(ee, pv, ids, prefix) -> int:
    backbone = ee.backbone
    if backbone.family == "opt":
        _, embeds, mask = backbone.image_prompt_embeds(pv, prefix, None)
        logits = backbone.lm(inputs_embeds=embeds, attention_mask=mask).logits
    else:
        _, embeds, mask = backbone.image_prompt_embeds(pv, ids, None)
        logits = backbone.lm(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=prefix).logits
    return int(logits[0, -1].argmax())


@pytest.mark.parametrize("batch_policy", ["per_row", "ride_along"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_batched_rows_equal_rows_decoded_alone(family, seed, batch_policy):
    """Rows compacted out of the deeper layers (per_row) or riding along through them (ride_along): either way a
    row's tokens and exits are what it gets decoded alone."""
    model = tiny_blip2(family, seed=seed, num_layers=6)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 3, 4]))
    pv, ids, mask = tiny_inputs(model, batch=3, seed=seed, pad=True)
    # random models are equally unsure at every exit; a policy that reads only the row's own logits mixes exits
    batched = ee.generate(
        pv, ids, mask, max_new_tokens=MAX_NEW, policy=TokenHashPolicy(), eos_token_id=[], batch_policy=batch_policy
    )
    assert len(batched.stats.exit_histogram) >= 2, batched.stats.exit_histogram
    steps_with_mixed_rows = (batched.exit_layers != batched.exit_layers[:1]).any(0).sum()
    assert steps_with_mixed_rows > 0
    for b in range(3):
        keep = mask[b].bool()
        alone = ee.generate(
            pv[b : b + 1],
            ids[b : b + 1, keep],
            mask[b : b + 1, keep],
            max_new_tokens=MAX_NEW,
            policy=TokenHashPolicy(),
            eos_token_id=[],
        )
        steps = MAX_NEW
        assert torch.equal(batched.sequences[b, -steps:], alone.sequences[0, -steps:])
        assert torch.equal(batched.exit_layers[b], alone.exit_layers[0])


def test_propagate_fills_every_cache_and_never_pends(model):
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 2, 3]))
    pv, ids, mask = tiny_inputs(model, batch=2, seed=5, pad=True)
    out = ee.generate(
        pv,
        ids,
        mask,
        max_new_tokens=8,
        policy=RandomPolicy(0.5, 1),
        kv="propagate",
        eos_token_id=[],
        return_engine=True,
        batch_policy="per_row",
    )
    dec = out.engine
    assert len(out.stats.exit_histogram) >= 2
    assert dec.pending is None and dec.work.catchup_slots == 0 and dec.work.kv_projections > 0
    fills = {tuple(kv.filled) for kv in dec.kv}
    assert len(fills) == 1  # all layers equally filled: nothing left behind


def test_propagate_at_threshold_one_is_the_full_model(model):
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 2]))
    pv, ids, mask = tiny_inputs(model, batch=2, seed=6, pad=True)
    a = ee.generate(pv, ids, mask, max_new_tokens=8, threshold=1.0, kv="propagate")
    b = ee.generate(pv, ids, mask, max_new_tokens=8, mode="full")
    assert torch.equal(a.sequences, b.sequences)


def test_features_are_the_full_models_hidden_states(model):
    """`features` (the training-time pass) equals Hugging Face's forward: the last state gives its logits."""
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([2]))
    pv, ids, mask = tiny_inputs(model, batch=2, seed=7, pad=True)
    backbone = ee.backbone
    if backbone.family == "opt":
        states, ctx, _ = backbone.features(pv, ids, mask)
        _, embeds, full_mask = backbone.image_prompt_embeds(pv, ids, mask)
        ref = backbone.lm(inputs_embeds=embeds, attention_mask=full_mask).logits
    else:
        dec = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 10]])
        states, ctx, _ = backbone.features(pv, ids, mask, decoder_input_ids=dec)
        _, embeds, full_mask = backbone.image_prompt_embeds(pv, ids, mask)
        ref = backbone.lm(inputs_embeds=embeds, attention_mask=full_mask, decoder_input_ids=dec).logits
    assert len(states) == backbone.num_layers + 1
    real = ctx.key_mask[:, : states[-1].shape[1]]
    assert torch.allclose(backbone.head(states[-1])[real], ref[real], atol=1e-5)


def _host_syncs_in_steps(ee, monkeypatch, *args, **kwargs) -> tuple[int, int]:
    """Count tensor-to-host reads (`tolist`, `item`, `bool`, `int`, `float`) made inside engine steps."""
    from freevlm.decoding.general import GeneralEngine
    from freevlm.decoding.static import StaticEngine

    count, inside = [0], [False]
    for name in ("tolist", "item", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, **kw):
            count[0] += inside[0]
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def counted_step(self, *a, _step, **kw):
        inside[0] = True
        try:
            return _step(self, *a, **kw)
        finally:
            inside[0] = False

    for engine in (GeneralEngine, StaticEngine):
        monkeypatch.setattr(
            engine, "step", lambda self, *a, _step=engine.step, **kw: counted_step(self, *a, _step=_step, **kw)
        )
    out = ee.generate(*args, **kwargs)
    monkeypatch.undo()
    return count[0], out.stats.steps


@pytest.mark.parametrize("batch_policy", ["per_row", "ride_along"])
@pytest.mark.parametrize("kv", ["recompute", "propagate"])
def test_host_syncs_per_step_do_not_grow_with_depth(family, kv, batch_policy, monkeypatch):
    """docs/DESIGN.md: no host sync per layer (on a GPU each one stalls the launch queue). A step may read its row ids
    once and each exit's leave/continue decision once; twice the layers must not mean more syncs."""
    counts = []
    for depth in (4, 8):
        ee = EarlyExitVLM.from_backbone(tiny_blip2(family, num_layers=depth), ExitConfig([1, 2]))
        pv, ids, mask = tiny_inputs(ee.model, batch=3, seed=0, pad=True)
        syncs, steps = _host_syncs_in_steps(
            ee,
            monkeypatch,
            pv,
            ids,
            mask,
            max_new_tokens=MAX_NEW,
            policy=RandomPolicy(0.4),
            kv=kv,
            eos_token_id=[],
            batch_policy=batch_policy,
        )
        assert syncs <= steps * (1 + 2), (depth, syncs, steps)
        counts.append(syncs)
    assert counts[0] == counts[1], counts


def test_ride_along_rows_fill_deeper_caches_exactly(family):
    """A row that left rides along while another row goes on: its deeper K/V are computed for real (nothing
    pends for it), and every cache equals the full model's."""
    model = tiny_blip2(family, seed=1, num_layers=6)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 3, 4]))
    pv, ids, mask = tiny_inputs(model, batch=3, seed=1, pad=True)
    out = ee.generate(
        pv,
        ids,
        mask,
        max_new_tokens=10,
        policy=TokenHashPolicy(),
        eos_token_id=[],
        batch_policy="ride_along",
        return_engine=True,
    )
    left_early = out.exit_layers < ee.backbone.num_layers
    assert left_early.any() and (~left_early).any()
    _assert_caches_equal_full_model(ee, out, pv, ids, mask)


class _NeverAllLeave(RandomPolicy):
    """Row 0 always leaves at the first exit, row 1 never does: riding along never saves a layer."""

    def decide(self, layer, logits, step, rows, hidden=None):
        return rows == 0


def test_auto_gate_stops_consulting_exits_that_do_not_pay(family):
    """batch_policy="auto" with several rows: once consulting exits has saved nothing, the step runs like the full
    model (probing again later), and the exit caches catch up exactly from the inputs kept meanwhile."""
    model = tiny_blip2(family, seed=2, num_layers=6)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([2, 4]))
    pv, ids, mask = tiny_inputs(model, batch=2, seed=2, pad=True)
    steps = 20
    out = ee.generate(pv, ids, mask, max_new_tokens=steps, policy=_NeverAllLeave(), eos_token_id=[], return_engine=True)
    consulted = (out.exit_layers[0] < ee.backbone.num_layers).sum()
    assert consulted == 2  # the first step, then the probe at step 16
    assert out.engine.work.exit_calls <= 2 * consulted + 2  # each exit when consulted, one catch-up each
    _assert_caches_equal_full_model(ee, out, pv, ids, mask)
