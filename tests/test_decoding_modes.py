"""Beam search, speculative mode and batch policies on the early-exit engine."""

import itertools

import pytest
import torch
from conftest import TokenHashPolicy

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.tiny import tiny_blip2, tiny_inputs


def confident_model(family: str, seed: int):
    """A random BLIP-2 with sharpened logits, so exits are often confident."""
    model = tiny_blip2(family, seed=seed, num_layers=6)
    lm = model.language_model
    final_norm = lm.model.decoder.final_layer_norm if family == "opt" else lm.decoder.final_layer_norm
    with torch.no_grad():  # sharper logits without touching the (tied) input embeddings
        final_norm.weight.mul_(6)
    return model


def drafting_model(family: str, seed: int) -> EarlyExitVLM:
    """Confident model + exits nudged off the last layer: their drafts are sometimes right, sometimes wrong."""
    ee = EarlyExitVLM.from_backbone(confident_model(family, seed), ExitConfig([1, 2, 4]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ee.exits.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return ee


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("batch", [1, 3])
def test_speculative_equals_full_greedy_at_every_threshold(family, seed, batch):
    ee = drafting_model(family, seed)
    pv, ids, mask = tiny_inputs(ee.model, batch=batch, seed=seed, pad=True)
    full = ee.generate(pv, ids, mask, max_new_tokens=12, mode="full")
    drafted = 0
    for threshold in (0.0, 0.3, 0.6, 0.9, 1.0):
        out = ee.generate(pv, ids, mask, max_new_tokens=12, mode="speculative", threshold=threshold, max_draft=4)
        assert torch.equal(out.sequences, full.sequences), threshold
        drafted += out.stats.speculative["drafted"]
        if threshold == 1.0:
            assert out.stats.speculative["drafted"] == 0
    assert drafted > 0


def test_speculative_really_rejects_and_accepts(family):
    totals = {"drafted": 0, "accepted_drafts": 0}
    for seed in range(3):
        ee = drafting_model(family, seed)
        pv, ids, mask = tiny_inputs(ee.model, batch=2, seed=seed)
        out = ee.generate(pv, ids, mask, max_new_tokens=12, mode="speculative", threshold=0.0, eos_token_id=[])
        for key in totals:
            totals[key] += out.stats.speculative[key]
    assert 0 < totals["accepted_drafts"] < totals["drafted"], totals


def test_verification_steps_evaluate_no_exit_head(family):
    """Threshold 0 and max_draft 1: steps alternate draft (one head, at the first exit) and verify (the final
    head only - the decision to go to the final layer is made, so no exit's head is asked)."""
    ee = drafting_model(family, 0)
    pv, ids, mask = tiny_inputs(ee.model, batch=1, seed=0)
    out = ee.generate(
        pv,
        ids,
        mask,
        max_new_tokens=10,
        mode="speculative",
        threshold=0.0,
        max_draft=1,
        eos_token_id=[],
        return_engine=True,
    )
    work = out.engine.work
    assert out.stats.speculative["verifications"] > 0
    assert work.head_calls == work.steps


def test_after_rejected_drafts_caches_hold_exactly_the_accepted_tokens(family):
    ee = drafting_model(family, 1)
    pv, ids, mask = tiny_inputs(ee.model, batch=2, seed=1, pad=True)
    out = ee.generate(
        pv, ids, mask, max_new_tokens=10, mode="speculative", threshold=0.0, eos_token_id=[], return_engine=True
    )
    stats = out.stats.speculative
    assert stats["accepted_drafts"] < stats["drafted"], "no draft was rejected: the test would prove nothing"
    dec = out.engine
    prompt_len = dec.ctx.prompt_ids.shape[1]
    for b in range(2):
        last_slot = prompt_len - 1 + out.exit_layers.shape[1]  # the last token's slot: not processed yet
        for kv in [*dec.kv, *dec.exit_kv.values()]:
            assert kv.filled[b] <= last_slot  # nothing beyond the accepted tokens
        assert dec.kv[-1].filled[b] >= prompt_len  # and the verified prefix is there
    # one more step through every layer: its logits equal a fresh full-model run over the whole sequence
    rows = torch.arange(2)
    last = out.sequences[:, -1:]
    x = ee.backbone.embed(dec.ctx, last, rows, last_slot)
    step = dec.step(rows, x, last_slot, step=0, verify=[True, True])
    fresh = _full_logits(ee, pv, ids, mask, out.sequences)
    assert torch.allclose(step.logits, fresh, atol=1e-4)


def _full_logits(ee, pv, ids, mask, sequences):
    backbone = ee.backbone
    if backbone.family == "opt":
        _, embeds, full_mask = backbone.image_prompt_embeds(pv, sequences, None)
        full_mask = torch.cat([mask, torch.ones(len(mask), sequences.shape[1] - mask.shape[1], dtype=mask.dtype)], 1)
        return backbone.lm(inputs_embeds=embeds, attention_mask=full_mask).logits[:, -1]
    _, embeds, enc_mask = backbone.image_prompt_embeds(pv, ids, mask)
    return backbone.lm(inputs_embeds=embeds, attention_mask=enc_mask, decoder_input_ids=sequences).logits[:, -1]


@pytest.mark.parametrize("num_beams", [2, 5])
@pytest.mark.parametrize(
    "length_penalty,early_stopping,seed", [(1.0, False, 0), (1.0, False, 1), (0.6, True, 2), (1.5, "never", 3)]
)
def test_beam_search_without_exits_equals_hugging_face(family, num_beams, length_penalty, early_stopping, seed):
    model = tiny_blip2(family, seed=seed)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 2]))
    pv, ids, mask = tiny_inputs(model, batch=3, seed=seed, pad=True)
    kwargs = dict(max_new_tokens=9, num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping)
    ref = model.generate(pixel_values=pv, input_ids=ids, attention_mask=mask, do_sample=False, **kwargs)
    ours = ee.generate(pv, ids, mask, threshold=1.0, **kwargs)
    assert torch.equal(ours.sequences, ref)


def test_beam_search_follows_each_early_stopping_setting_as_hugging_face():
    """A batch where False, True and "never" give three different answers (OPT seed 9 with EOS 60: found by a
    search), so each setting must be followed as Hugging Face follows it, not taken for another."""
    model = tiny_blip2("opt", seed=9)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 2]))
    pv, ids, mask = tiny_inputs(model, batch=3, seed=9, pad=True)
    kwargs = dict(max_new_tokens=12, num_beams=3, length_penalty=1.5, eos_token_id=60)
    answers = []
    for early_stopping in (False, True, "never"):
        ref = model.generate(
            pixel_values=pv,
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            early_stopping=early_stopping,
            **kwargs,
        )
        ours = ee.generate(pv, ids, mask, threshold=1.0, early_stopping=early_stopping, **kwargs)
        assert torch.equal(ours.sequences, ref), early_stopping
        answers.append(ref)
    assert all(a.shape != b.shape or not torch.equal(a, b) for a, b in itertools.combinations(answers, 2))


def test_beam_search_with_exits_reports_per_token_layers(family):
    model = tiny_blip2(family, seed=2, num_layers=6)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 3]))
    pv, ids, mask = tiny_inputs(model, batch=2, seed=2, pad=True)
    out = ee.generate(
        pv, ids, mask, max_new_tokens=8, num_beams=3, policy=TokenHashPolicy(), eos_token_id=[], batch_policy="per_row"
    )
    assert out.exit_layers.shape == (2, 8)
    assert set(out.exit_layers.unique().tolist()) <= {1, 3, 6}
    assert len(out.stats.exit_histogram) >= 2


def test_slowest_batch_policy_keeps_rows_in_step(family):
    model = tiny_blip2(family, seed=3, num_layers=6)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 2, 4]))
    pv, ids, mask = tiny_inputs(model, batch=3, seed=3, pad=True)
    kwargs = dict(max_new_tokens=8, policy=TokenHashPolicy(), eos_token_id=[])
    per_row = ee.generate(pv, ids, mask, batch_policy="per_row", **kwargs)
    slowest = ee.generate(pv, ids, mask, batch_policy="slowest", **kwargs)
    assert (slowest.exit_layers == slowest.exit_layers[:1]).all()  # every step: one layer for the whole batch
    assert (per_row.exit_layers != per_row.exit_layers[:1]).any()
    with pytest.raises(ValueError, match="batch_policy"):
        ee.generate(pv, ids, mask, batch_policy="fastest")
