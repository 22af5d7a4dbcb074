"""Sampling (`decoding/sampling.py`): Hugging Face's token choice, per row; exits decide on raw logits.

A seeded sample at threshold 1.0 equals Hugging Face's `generate(do_sample=True)` after `torch.manual_seed(seed)`
token for token (BLIP-2 OPT, LLaVA Llama); the per-row processing equals Hugging Face's processors on each row
alone; exits decide on the raw distribution and the token comes from the layer the row left at."""

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.decoding.config import DecodeConfig
from freevlm.decoding.policies import ExitPolicy
from freevlm.decoding.sampling import TokenChooser
from freevlm.serving import Scheduler
from freevlm.tiny import tiny_model, tiny_model_inputs

# (temperature, top_k, top_p, repetition_penalty): each processor alone, all together, none
SETTINGS = [(0.7, 0, 1.0, 1.0), (1.0, 5, 1.0, 1.0), (1.0, 0, 0.8, 1.0), (1.0, 0, 1.0, 1.4), (1.6, 7, 0.9, 0.8)]


def _hf_processors(temperature, top_k, top_p, penalty) -> LogitsProcessorList:
    """What Hugging Face's `generate(do_sample=True)` builds for these settings, in its order."""
    processors = LogitsProcessorList()
    if penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty))
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return processors


def _options(temperature, top_k, top_p, penalty) -> dict:
    return dict(do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty)


def test_per_row_processing_and_draws_equal_hugging_face_row_by_row():
    """One batch: a greedy row and rows at each setting, each with its own generator; every row's scores equal
    Hugging Face's processors on that row alone, and its draw `torch.multinomial` with the same seed."""
    vocab, length = 40, 6
    gen = torch.Generator().manual_seed(0)
    chooser = TokenChooser(len(SETTINGS) + 1, vocab, torch.device("cpu"), per_row_generators=True)
    history = torch.randint(0, vocab, (len(SETTINGS) + 1, length), generator=gen)
    chooser.set([0], DecodeConfig(), history[:1], torch.ones(1, length), None)  # greedy
    for r, settings in enumerate(SETTINGS, start=1):
        seed_gen = torch.Generator().manual_seed(r)
        chooser.set([r], DecodeConfig(**_options(*settings)), history[r : r + 1], torch.ones(1, length), seed_gen)
    rows = torch.arange(len(SETTINGS) + 1)
    for step in range(4):
        logits = torch.randn(len(rows), vocab, generator=gen) * 3
        scores, tokens = chooser.process(logits, rows), chooser.choose(logits, rows)
        assert tokens[0] == logits[0].argmax()
        for r, settings in enumerate(SETTINGS, start=1):
            expected = _hf_processors(*settings)(history[r : r + 1], logits[r : r + 1].clone())
            assert torch.equal(scores[r : r + 1], expected), (step, settings)
            draw = torch.Generator().manual_seed(r)
            for _ in range(step):  # the generator has drawn once per earlier step
                torch.multinomial(expected.softmax(-1), 1, generator=draw)
            assert tokens[r] == torch.multinomial(expected.softmax(-1), 1, generator=draw).item(), (step, settings)
        chooser.observe(rows, tokens)
        history = torch.cat([history, tokens[:, None]], dim=1)


@pytest.fixture(scope="module", params=["opt", "llama"])
def family_model(request):
    """A tiny BLIP-2 OPT or LLaVA Llama with sharper logits (so temperature and top-p change what is drawn)."""
    model = tiny_model(request.param, seed=1, num_layers=4)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 2, 3]))
    with torch.no_grad():
        ee.backbone.final_norm_modules()[0].mul_(4)
    return model, ee


def test_seeded_sample_equals_hugging_face(family_model):
    """Temperature alone, the penalty alone, all together (each alone is held to Hugging Face row by row above),
    each with its own seed; threshold 1.0 (exits never taken) and mode="full" alike."""
    model, ee = family_model
    inputs = tiny_model_inputs(model, batch=1, seed=1)
    for seed, settings in enumerate([SETTINGS[0], SETTINGS[3], SETTINGS[4]]):
        torch.manual_seed(seed)
        expected = model.generate(**inputs, max_new_tokens=8, **_options(*settings))
        out = ee.generate(**inputs, max_new_tokens=8, threshold=1.0, seed=seed, **_options(*settings))
        assert torch.equal(out.sequences, expected), settings
    out = ee.generate(**inputs, max_new_tokens=8, mode="full", seed=seed, **_options(*settings))
    assert torch.equal(out.sequences, expected)
    torch.manual_seed(seed)  # no seed: torch's global generator, as Hugging Face
    assert torch.equal(ee.generate(**inputs, max_new_tokens=8, mode="full", **_options(*settings)).sequences, expected)


def test_padded_batch_and_greedy_penalty_equal_hugging_face(family_model):
    model, ee = family_model
    inputs = tiny_model_inputs(model, batch=3, seed=2, pad=True)
    for options in (_options(*SETTINGS[-1]), dict(do_sample=False, repetition_penalty=1.5)):
        torch.manual_seed(4)
        expected = model.generate(**inputs, max_new_tokens=6, **{"top_k": 0, **options})
        out = ee.generate(**inputs, max_new_tokens=6, threshold=1.0, seed=4, **options)
        assert torch.equal(out.sequences, expected), options
    plain = ee.generate(**inputs, max_new_tokens=6, threshold=1.0)
    assert not torch.equal(plain.sequences, out.sequences), "the penalty changed nothing: a weak test"


def test_temperature_and_seed_change_the_sample(family_model):
    model, ee = family_model
    inputs = tiny_model_inputs(model, batch=1, seed=3)
    run = lambda **o: ee.generate(**inputs, max_new_tokens=8, mode="full", do_sample=True, **o).sequences  # noqa: E731
    sample = run(seed=5)
    assert torch.equal(sample, run(seed=5))
    assert not torch.equal(sample, run(seed=6))
    assert not torch.equal(run(seed=5, temperature=0.3), run(seed=5, temperature=3.0))
    greedy = ee.generate(**inputs, max_new_tokens=8, mode="full").sequences
    assert torch.equal(run(seed=5, top_k=1), greedy)  # one token left: the argmax


def test_exits_decide_on_raw_logits_and_the_token_comes_from_the_exit(family_model):
    """At any temperature a token leaves where greedy's does (the exit reads its raw confidence: a processed one
    would be far below 0.05 at temperature 50), and with top_k=1 the sample is greedy's, exit layers and all (the
    token comes from the layer the row left at, here always exit 1, not from the last layer)."""
    model, ee = family_model
    inputs = tiny_model_inputs(model, batch=3, seed=5)
    options = dict(max_new_tokens=6, eos_token_id=[])
    greedy = ee.generate(**inputs, **options, threshold=0.05)
    first = greedy.exit_layers[:, 0]
    assert len(set(first.tolist())) > 1, "the first tokens leave at one layer: the test would not see the rule"
    for temperature in (0.2, 50.0):  # the first token's state is the same whatever was sampled
        hot = ee.generate(**inputs, **options, threshold=0.05, do_sample=True, temperature=temperature, seed=1)
        assert torch.equal(hot.exit_layers[:, 0], first), temperature
    greedy = ee.generate(**inputs, **options, threshold=0.02)
    assert not torch.equal(greedy.sequences, ee.generate(**inputs, **options, mode="full").sequences)
    top1 = ee.generate(**inputs, **options, threshold=0.02, do_sample=True, top_k=1, temperature=5.0, seed=1)
    assert torch.equal(top1.sequences, greedy.sequences) and torch.equal(top1.exit_layers, greedy.exit_layers)


def _scheduled(ee, requests):
    """Run `(arrival step, pixel_values, input_ids, options)` requests through one scheduler; their handles."""
    scheduler = Scheduler(ee, max_batch=3, max_len=48)
    handles, step = [None] * len(requests), 0
    while step <= max(r[0] for r in requests) or not scheduler.idle:
        for i, (arrival, pv, ids, options) in enumerate(requests):
            if arrival == step:
                handles[i] = scheduler.submit(pv, ids, **options)
        scheduler.step()
        step += 1
    return [h.result() for h in handles]


def test_scheduler_sample_is_the_same_whatever_else_runs(family_model):
    """A seeded request samples what `generate` samples for it alone, alone in the scheduler or beside greedy
    and sampling requests (their own temperatures, top-k, penalties, seeds) that arrive before and after it."""
    model, ee = family_model
    pv, ids = (tiny_model_inputs(model, batch=1, seed=7)[k] for k in ("pixel_values", "input_ids"))
    seeded = dict(max_new_tokens=6, threshold=0.05, eos_token_id=[], **_options(0.8, 0, 0.9, 1.2), seed=3)
    out = ee.generate(pv, ids, **seeded)
    expected = (out.sequences[0, ids.shape[1] :].tolist(), out.exit_layers[0].tolist())
    (alone,) = _scheduled(ee, [(0, pv, ids, seeded)])
    assert (alone.tokens, alone.exit_layers) == expected
    others = []
    for i, settings in enumerate([SETTINGS[0], SETTINGS[2], SETTINGS[4]]):
        o_pv, o_ids = (
            tiny_model_inputs(model, batch=1, prompt_len=2 + i % 3, seed=20 + i)[k]
            for k in ("pixel_values", "input_ids")
        )
        others.append(
            (i, o_pv, o_ids, dict(max_new_tokens=3 + i, threshold=0.05, eos_token_id=[], **_options(*settings), seed=i))
        )
    greedy = (1, pv, ids, dict(max_new_tokens=6, threshold=0.05, eos_token_id=[]))
    other_seed = (2, pv, ids, {**seeded, "seed": 4})
    results = _scheduled(ee, [others[0], others[1], greedy, (2, pv, ids, seeded), other_seed, *others[2:]])
    assert (results[3].tokens, results[3].exit_layers) == expected
    assert results[4].tokens != expected[0], "another seed drew the same tokens: the test cannot see the generator"
    assert results[2].tokens == ee.generate(pv, ids, **greedy[3]).sequences[0, ids.shape[1] :].tolist()


def test_scheduler_refuses_bad_options_by_name(family_model):
    _, ee = family_model
    scheduler = Scheduler(ee, max_batch=1, max_len=32)
    pv, ids = (tiny_model_inputs(ee.model, batch=1, seed=7)[k] for k in ("pixel_values", "input_ids"))
    bad = {
        "temperature": dict(do_sample=True, temperature=0.0),
        "top_p": dict(do_sample=True, top_p=1.5),
        "top_k": dict(do_sample=True, top_k=-2),
        "repetition_penalty": dict(repetition_penalty=-1.0),
        "seed": dict(do_sample=True, seed=-3),
        "do_sample": dict(do_sample="yes"),
        "batch_policy": dict(batch_policy="per_row"),
        "static": dict(static=True),
        "eos_token_id": dict(eos_token_id=[-1]),
        "policy": dict(policy=ExitPolicy()),
    }
    for name, options in bad.items():
        with pytest.raises(ValueError, match=name):
            scheduler.submit(pv, ids, **options)
    assert scheduler.idle
