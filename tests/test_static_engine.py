"""The static engine (rows move together, fixed-shape segments) decodes exactly what the general engine does."""

import pytest
import torch
from conftest import TokenHashPolicy

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.decoding.general import GeneralEngine
from freevlm.decoding.policies import FixedSchedulePolicy
from freevlm.decoding.static import StaticEngine, window_bucket
from freevlm.tiny import tiny_blip2, tiny_inputs

SCHEDULE = [1, 6, 3, 3, 4, 6, 1, 1, 6, 4]


@pytest.fixture(scope="module")
def models():
    out = {}
    for family in ("opt", "t5"):
        model = tiny_blip2(family, seed=5, num_layers=6)
        with torch.no_grad():  # sharper logits: confident exits, so thresholds in (0, 1) really exit
            norm = (
                model.language_model.model.decoder.final_layer_norm
                if family == "opt"
                else model.language_model.decoder.final_layer_norm
            )
            norm.weight.mul_(6)
        out[family] = EarlyExitVLM.from_backbone(model, ExitConfig([1, 3, 4]))
    return out


def _both(ee, pv, ids, mask, **kw):
    static = ee.generate(pv, ids, mask, static=True, return_engine="num_beams" not in kw, **kw)
    general = ee.generate(pv, ids, mask, static=False, **kw)
    if static.engine is not None:
        assert isinstance(static.engine, StaticEngine)
    return static, general


@pytest.mark.parametrize("kv", ["recompute", "propagate"])
@pytest.mark.parametrize("batch,batch_policy", [(1, "per_row"), (3, "ride_along"), (3, "slowest")])
def test_greedy_static_equals_general(models, family, kv, batch, batch_policy):
    ee = models[family]
    pv, ids, mask = tiny_inputs(ee.model, batch=batch, seed=1, pad=True)
    for policy in (TokenHashPolicy(), FixedSchedulePolicy(SCHEDULE), None):
        kw = dict(max_new_tokens=10, kv=kv, batch_policy=batch_policy, eos_token_id=[])
        kw.update(policy=policy) if policy is not None else kw.update(threshold=0.2)
        static, general = _both(ee, pv, ids, mask, **kw)
        assert torch.equal(static.sequences, general.sequences), policy
        assert torch.equal(static.exit_layers, general.exit_layers), policy
        assert not isinstance(policy, FixedSchedulePolicy) or len(static.stats.exit_histogram) >= 3  # exits taken


def test_finished_rows_ride_along_without_holding_the_batch(models, family):
    """A row that hit EOS keeps running (fixed shapes) but never keeps the others from leaving early."""
    ee = models[family]
    pv, ids, mask = tiny_inputs(ee.model, batch=3, seed=2, pad=True)
    first = ee.generate(pv, ids, mask, max_new_tokens=6, threshold=0.0, eos_token_id=[], static=False)
    eos = int(first.sequences[1, -5])  # row 1's second token: that row stops early
    static, general = _both(
        ee, pv, ids, mask, max_new_tokens=6, threshold=0.0, eos_token_id=[eos], batch_policy="ride_along"
    )
    assert torch.equal(static.sequences, general.sequences)
    assert torch.equal(static.exit_layers, general.exit_layers)
    assert (static.exit_layers[1, 2:] == -1).all() and (static.exit_layers[0] == 1).all()


@pytest.mark.parametrize("num_beams", [2, 3])
def test_beams_static_equal_general(models, family, num_beams):
    ee = models[family]
    pv, ids, mask = tiny_inputs(ee.model, batch=2, seed=3, pad=True)
    static, general = _both(
        ee,
        pv,
        ids,
        mask,
        max_new_tokens=8,
        num_beams=num_beams,
        policy=TokenHashPolicy(),
        batch_policy="slowest",
        eos_token_id=[],
    )
    assert torch.equal(static.sequences, general.sequences)
    assert torch.equal(static.exit_layers, general.exit_layers)


def test_speculative_static_equals_full_model(models, family):
    ee = models[family]
    pv, ids, mask = tiny_inputs(ee.model, batch=1, seed=4)
    full = ee.generate(pv, ids, mask, max_new_tokens=12, mode="full", static=False)
    out = ee.generate(
        pv,
        ids,
        mask,
        max_new_tokens=12,
        mode="speculative",
        threshold=0.0,
        max_draft=3,
        static=True,
        return_engine=True,
    )
    assert isinstance(out.engine, StaticEngine)
    assert torch.equal(out.sequences, full.sequences)
    assert out.stats.speculative["drafted"] > 0


def test_default_engine_by_batch_policy(models):
    ee = models["opt"]
    pv, ids, mask = tiny_inputs(ee.model, batch=3, seed=0, pad=True)
    kw = dict(max_new_tokens=2, return_engine=True)
    assert isinstance(ee.generate(pv[:1], ids[:1], mask[:1], **kw).engine, StaticEngine)
    assert isinstance(ee.generate(pv, ids, mask, **kw).engine, StaticEngine)  # auto: rows ride along
    assert isinstance(ee.generate(pv, ids, mask, batch_policy="per_row", **kw).engine, GeneralEngine)
    with pytest.raises(ValueError, match="static=True needs rows that move together"):
        ee.generate(pv, ids, mask, batch_policy="per_row", static=True, **kw)


def test_window_buckets():
    assert [window_bucket(n) for n in (1, 2, 3, 5, 8, 9, 64)] == [1, 2, 4, 8, 8, 16, 64]
    assert window_bucket(65) is None
