"""Continuous batching (freevlm.serving): every request gets what `EarlyExitVLM.generate` gives it alone at batch 1,
tokens and exit layers, whatever else runs and whenever it arrived; handles stream, cancel, refuse."""

import itertools
import random
import threading

import pytest
import torch

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.backbones.base import Start
from freevlm.decoding.config import DecodeConfig
from freevlm.serving import QueueFull, Scheduler
from freevlm.serving import rows as rows_module
from freevlm.tiny import tiny_inputs, tiny_model

FAMILIES = ["opt", "t5", "llama"]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest, and far more on shared cores


@pytest.fixture(scope="module", params=FAMILIES)
def ee(request):
    model = tiny_model(request.param, seed=5, num_layers=6)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 3, 4]))
    if request.param != "t5":  # sharper logits: confident exits (T5's head scales its features already)
        with torch.no_grad():
            ee.backbone.final_norm_modules()[0].mul_(6)
    return ee


# Thresholds at which the probe request of `test_rows_that_stopped_early_catch_up_exactly` leaves at several layers
# (random exits are confident or not over narrow bands, which differ by family; T5's tokens all leave at one layer
# per threshold, so its requests mix exit layers across requests only). Found by a sweep, fixed here so the tests do
# not sweep; the tests check that exits are taken, so a model that changes fails them instead of passing unseen.
MIXED = {"opt": [0.1, 0.15, 0.2], "t5": [0.3, 0.5], "llama": [0.05, 0.1]}


def _family(ee) -> str:
    """The key of the per-family tables here (`MIXED`, ...): "llama" for the Llama LM, whatever its model calls it."""
    return "llama" if ee.backbone.family == "llava" else ee.backbone.family


@pytest.fixture(scope="module")
def mixed(ee):
    return MIXED[_family(ee)]


def _alone(ee, pv, ids, **options):
    out = ee.generate(pv, ids, **options)
    tokens = out.sequences[0, ids.shape[1] if ee.backbone.family != "t5" else 1 :].tolist()
    layers = out.exit_layers[0].tolist()
    return tokens[: len(layers)], layers


def _scenario(ee, mixed, seed: int, count: int = 7):
    """Requests with random arrival steps, prompts, thresholds, lengths, EOS, stop sequences and cancellations,
    each with what it must get (from `generate` alone)."""
    rng, kv_rng = random.Random(seed), random.Random(-seed)  # kv drawn apart: the other draws stay as they were
    requests = []
    for i in range(count):
        pv, ids, _ = tiny_inputs(ee.model, batch=1, prompt_len=rng.randint(1, 6), seed=seed * 100 + i)
        options = dict(
            max_new_tokens=rng.randint(1, 10),
            threshold=rng.choice([0.0, 1.0, *[rng.choice(mixed) for _ in range(4)]]),
            mode=rng.choice(["early_exit"] * 4 + ["full"]),
            kv=kv_rng.choice(["recompute", "propagate"]),
            eos_token_id=[],
        )
        tokens, layers = _alone(ee, pv, ids, **options)
        stop, cancel_after = None, None
        kind = rng.choice(["plain", "plain", "eos", "stop", "cancel"])
        if kind == "eos" and len(tokens) > 1:  # a token it makes becomes its EOS: it ends there
            options["eos_token_id"] = [tokens[rng.randrange(len(tokens))]]
            tokens, layers = _alone(ee, pv, ids, **options)
        elif kind == "stop" and len(tokens) > 2:
            at = rng.randrange(1, len(tokens) - 1)
            stop = [tokens[at - 1 : at + 1]]
            end = next(i + 2 for i in range(len(tokens) - 1) if tokens[i : i + 2] == stop[0])
            tokens, layers = tokens[:end], layers[:end]
        elif kind == "cancel":
            cancel_after = rng.randint(0, 4)  # steps after its arrival
        requests.append((rng.randint(0, 8), pv, ids, options, stop, cancel_after, tokens, layers))
    return requests


def _run_scenario(scheduler: Scheduler, requests: list) -> None:
    """Submit each request of `_scenario` at its arrival step (cancelling it where it says), step until all are
    done, and check each got what it gets alone (a cancelled one: a prefix of it)."""
    handles, step = {}, 0
    while step < 200 and (len(handles) < len(requests) or not scheduler.idle):
        for i, (arrival, pv, ids, options, stop, cancel_after, *_) in enumerate(requests):
            if arrival == step:
                handles[i] = scheduler.submit(pv, ids, stop=stop, **options)
            if cancel_after is not None and arrival + cancel_after == step and i in handles:
                handles[i].cancel()
        scheduler.step()
        step += 1
    assert len(handles) == len(requests) and scheduler.idle
    for i, (*_, cancel_after, tokens, layers) in enumerate(requests):
        result = handles[i].result(timeout=0)
        if cancel_after is not None and result.finish_reason == "cancelled":
            n = len(result.tokens)
            assert n <= len(tokens)
            tokens, layers = tokens[:n], layers[:n]
        assert result.tokens == tokens, i
        assert result.exit_layers == layers, i


@pytest.mark.parametrize(
    "seed, exit_rule, ragged",
    [(8, "park", False), (35, "park", False), (20, "park", True), (35, "park", True), (1, "ride_along", True)]
    + [(4, "coin", True)],
)  # 8, 35 park in each family without ragged calls; 20, 35 with them (OPT's, Llama's)
def test_every_request_decodes_as_alone(ee, mixed, seed, exit_rule, ragged, monkeypatch):
    """`coin`: the park rule's decision at each exit is a coin toss (still at most `max_wait` steps of waiting), so
    tokens park and resume at every depth: exactness must not depend on what the rule decides. `ragged`: where the
    family has ragged layer calls (OPT, Llama), prompts joining while rows decode ride in the steps' calls."""
    requests = _scenario(ee, mixed, seed)
    rule = exit_rule.replace("coin", "park")
    scheduler = Scheduler(ee, max_batch=3, max_len=32, prefill_chunk=5, exit_rule=rule, ragged=ragged)
    if exit_rule == "coin":
        engine, rng = scheduler.engine, random.Random(seed)

        def coin(depth, done, live, joining=(0, 0)):
            waited = max((engine.waited[r] for r, out in enumerate(done) if not out), default=0)
            return waited >= 2 or rng.random() < 0.3

        monkeypatch.setattr(engine, "_climb_on", coin)
    _run_scenario(scheduler, requests)
    exits_taken = {layer for r in requests for layer in r[-1]} - {ee.backbone.num_layers}
    assert exits_taken, "no request left early: the test would not see a wrong exit rule"
    if exit_rule != "ride_along":
        assert scheduler.engine.parks > 0, "no step parked a token: the test would not see a wrong resumption"


# Scenarios (seed) whose prompts stop at an exit with first tokens out and waiting (found by a sweep, as MIXED): each
# family's own, and 175 in both (at exits 1 and 3 in OPT).
STOP_AT_EXIT = {"opt": 98, "llama": 121}


@pytest.mark.parametrize("seed, backlog", [(None, None), (175, None), (175, 0)])
def test_prompts_that_stop_at_an_exit_decode_as_alone(ee, mixed, seed, backlog, monkeypatch):
    """With ragged calls (OPT, Llama), a step that ends at an exit (every token out, or parked) with joining prompts'
    chunks riding in it leaves them there too, as parked tokens (`RowEngine._park_riding`): a row whose first token
    left at or below that exit, and a row whose first token waits at its prompt's last slot. Their layers above are
    caught up later; in ragged calls where a row has more than `RAGGED_BACKLOG` slots to catch up (at 0: every
    step that catches up)."""
    if not ee.backbone.ragged_layers():
        pytest.skip("ragged layer calls: OPT's and Llama-like decoders'")
    if backlog is not None:
        monkeypatch.setattr(rows_module, "RAGGED_BACKLOG", backlog)
    seed = seed or STOP_AT_EXIT[_family(ee)]
    scheduler = Scheduler(ee, max_batch=3, max_len=32, prefill_chunk=5, ragged=True)
    engine, parked = scheduler.engine, []
    park_riding = engine._park_riding

    def recorded(riding):
        waiting = sum(1 for row in riding.rows if row not in riding.first)
        parked.append((riding.depth, len(riding.rows) - waiting, waiting))
        park_riding(riding)

    monkeypatch.setattr(engine, "_park_riding", recorded)
    _run_scenario(scheduler, _scenario(ee, mixed, seed))
    assert any(out for _, out, _ in parked), "no prompt stopped at an exit with its first token out"
    assert any(waiting for *_, waiting in parked), "no prompt stopped at an exit with its first token waiting"
    assert engine.parked_prompts == sum(out + waiting for _, out, waiting in parked)


# Prompts (seed) and thresholds at which kv="propagate" gives other tokens or exit layers than "recompute" alone
# (found by a sweep, as MIXED): a scheduler that ignored kv, or filled the deeper K/V otherwise, fails on them.
PROPAGATE_DIFFERS = {"opt": [(40, 0.1), (43, 0.2), (46, 0.15)], "llama": [(40, 0.05), (42, 0.1), (46, 0.05)]}


@pytest.mark.parametrize("exit_rule", ["park", "ride_along"])
def test_rows_at_kv_propagate_decode_as_alone(ee, mixed, exit_rule):
    """Rows at kv="propagate" beside rows at "recompute": each gets what `generate` gives it alone with its kv."""
    family = _family(ee)
    if family not in PROPAGATE_DIFFERS:
        pytest.skip("T5's tokens all leave at one layer per threshold here: propagate changes nothing to see")
    scheduler = Scheduler(ee, max_batch=3, max_len=40, exit_rule=exit_rule)
    cases = [(seed, threshold, "propagate") for seed, threshold in PROPAGATE_DIFFERS[family]]
    cases += [(50, mixed[0], "recompute"), (51, mixed[-1], "recompute")]
    expected, handles, differs = [], [], 0
    for seed, threshold, kv in cases:
        pv, ids, _ = tiny_inputs(ee.model, batch=1, prompt_len=3, seed=seed)
        options = dict(max_new_tokens=16, threshold=threshold, eos_token_id=[], kv=kv)
        expected.append(_alone(ee, pv, ids, **options))
        differs += kv == "propagate" and expected[-1] != _alone(ee, pv, ids, **{**options, "kv": "recompute"})
        handles.append(scheduler.submit(pv, ids, **options))
        scheduler.step()
    scheduler.run_until_idle()
    assert differs == len(PROPAGATE_DIFFERS[family]), "propagate gives what recompute gives: the test would not see"
    for handle, (tokens, layers) in zip(handles, expected):
        result = handle.result(timeout=0)
        assert (result.tokens, result.exit_layers) == (tokens, layers)
    assert scheduler.engine.projected_slot_layers > 0


@pytest.mark.parametrize("rows", [1, 3])
def test_rows_that_stopped_early_catch_up_exactly(ee, mixed, rows):
    """Only early-exit rows: steps stop below the top, and later steps catch the skipped layers up."""
    thresholds = [mixed[(len(mixed) * i) // rows] for i in range(rows)]
    pv, ids, _ = tiny_inputs(ee.model, batch=1, prompt_len=2, seed=40)
    if len(set(_alone(ee, pv, ids, max_new_tokens=12, threshold=mixed[0], eos_token_id=[])[1])) == 1:
        pytest.skip("no threshold mixes exit layers within one request of this random model")
    scheduler = Scheduler(ee, max_batch=3, max_len=40)
    expected, handles = [], []
    for i, threshold in enumerate(thresholds):
        pv, ids, _ = tiny_inputs(ee.model, batch=1, prompt_len=2 + i, seed=40 + i)
        options = dict(max_new_tokens=14, threshold=threshold, eos_token_id=[])
        expected.append(_alone(ee, pv, ids, **options))
        handles.append(scheduler.submit(pv, ids, **options))
        scheduler.step()  # each arrives one step after the one before
    scheduler.run_until_idle()
    layers = expected[0][1]
    if rows == 1 and any(a < b for a, b in itertools.pairwise(layers)):  # a deeper token after a shallower one
        assert scheduler.engine.catchup_slots > 0
        assert scheduler.engine.kv_only_slot_layers > 0  # caught-up slots at the last layer: their K/V only
    for handle, (tokens, layers) in zip(handles, expected):
        assert (handle.result().tokens, handle.result().exit_layers) == (tokens, layers)


@pytest.mark.parametrize("cut", [False, True])
def test_requests_joining_together_decode_as_alone(ee, mixed, cut, monkeypatch):
    """Six requests arrive at once, four take rows: their images go through the vision model in one call, their
    prompts through each layer in one window (T5: each row its own encoder states, no decoder prompt to encode), rows
    that may leave early and rows that may not side by side; `cut`: the first arrives alone and decodes when the
    others come, and the budget of 1.5 prompts per iteration (which binds only while a row decodes) makes a window
    hold one prompt's rest and the next ones' starts. Each request decodes as alone."""
    rng, requests = random.Random(7), []
    for i in range(6):
        pv, ids, _ = tiny_inputs(ee.model, batch=1, prompt_len=rng.randint(1, 6), seed=70 + i)
        options = dict(max_new_tokens=rng.randint(2, 8), threshold=[1.0, *mixed, 0.0][i % (len(mixed) + 2)])
        options |= dict(eos_token_id=[], mode="full" if i == 4 else "early_exit")
        requests.append((pv, ids, options, _alone(ee, pv, ids, **options)))
    slots = sum(ids.shape[1] for _, ids, *_ in requests) / len(requests)
    scheduler = Scheduler(ee, max_batch=4, max_len=32, prefill_chunk=int(1.5 * slots) if cut else 256)
    images, windows = [], []
    vision = ee.backbone.stage1_parts()["vision"][0]
    vision.register_forward_pre_hook(
        lambda m, args, kwargs: images.append(len(args[0] if args else kwargs["pixel_values"])), with_kwargs=True
    )
    encode, riding = scheduler.engine._encode, scheduler.engine._riding
    monkeypatch.setattr(
        scheduler.engine, "_encode", lambda rows, chunks, own=False: windows.append(chunks) or encode(rows, chunks, own)
    )  # and where prompts ride in a step's calls (OPT, while a row decodes), the chunks that ride together
    monkeypatch.setattr(scheduler.engine, "_riding", lambda rows, spans: windows.append(spans) or riding(rows, spans))
    handles = []
    for pv, ids, options, _ in requests:
        handles.append(scheduler.submit(pv, ids, **options))
        if cut and len(handles) == 1:
            scheduler.step()
    try:
        scheduler.run_until_idle()
    finally:
        vision._forward_pre_hooks.clear()
    for handle, (*_, (tokens, layers)) in zip(handles, requests):
        assert (handle.result().tokens, handle.result().exit_layers) == (tokens, layers)
    assert max(images) > 1, "no images were encoded together"
    if ee.backbone.family == "t5":
        assert not windows
    else:
        assert max(len(w) for w in windows) > 1, "no prompts were encoded together"
        if cut:
            assert any(len({first for first, _ in w}) > 1 for w in windows), "no window mixed prompt offsets"


@pytest.mark.parametrize("ragged", [False, True])
def test_prompts_joining_while_rows_decode_decode_as_alone(ee, mixed, ragged):
    """Requests arrive one every other step while others decode: a budget of 3 slots per iteration splits each prompt
    over steps, rows that may leave early (tokens parked at exits meanwhile) beside rows that may not (their first token
    from their prompt's last slot). With ragged calls (OPT, Llama) the chunks ride in the decode steps' layer calls,
    each over its own row's K/V; each request decodes as alone."""
    if ragged and not ee.backbone.ragged_layers():
        pytest.skip("ragged layer calls: OPT's and Llama-like decoders'")
    rng, requests = random.Random(161 if _family(ee) == "llama" else 49), []  # tokens park, with ragged calls too
    for i in range(8):
        pv, ids, _ = tiny_inputs(ee.model, batch=1, prompt_len=rng.randint(2, 8), seed=130 + i)
        options = dict(max_new_tokens=rng.randint(3, 10), threshold=rng.choice([1.0, *mixed]), eos_token_id=[])
        options["mode"] = "full" if i % 3 == 1 else "early_exit"
        requests.append((pv, ids, options, _alone(ee, pv, ids, **options)))
    scheduler = Scheduler(ee, max_batch=4, max_len=40, prefill_chunk=3, ragged=ragged)
    handles = []
    for step in range(200):
        if step % 2 == 0 and step // 2 < len(requests):
            pv, ids, options, _ = requests[step // 2]
            handles.append(scheduler.submit(pv, ids, **options))
        if not scheduler.step() and len(handles) == len(requests):
            break
    for handle, (*_, (tokens, layers)) in zip(handles, requests):
        assert (handle.result(timeout=0).tokens, handle.result(timeout=0).exit_layers) == (tokens, layers)
    assert scheduler.engine.parks > 0, "no token parked while prompts joined"
    if ragged:
        assert scheduler.engine.riding_slots > 0, "no prompt rode in a decode step"


@pytest.mark.parametrize("ragged", [False, True])
def test_step_counters_count_the_rows_and_slots_each_step_ran(ee, ragged):
    """What the benchmarks read from `RowEngine`: `row_steps` (rows decoding together), `layer_calls` and
    `slot_layers` (calls per step, slot-layers per token). With the full model every token but a prompt's first comes
    from one row of one step, and a first token counts where its prompt rode in a step (ragged calls, its slots
    counted too) but not where it was encoded in a window of its own (a burst into an idle scheduler): those windows
    count apart (`window_slot_layers`), their padded columns included. T5's decoder has no prompt: its first tokens
    come from steps."""
    scheduler = Scheduler(ee, max_batch=4, max_len=32, ragged=ragged)
    handles, lengths = [], []
    for i in range(4):
        if i == 3:
            scheduler.step()
            scheduler.step()
        pv, ids, _ = tiny_inputs(ee.model, batch=1, prompt_len=3 + i, seed=120 + i)
        ctx = ee.backbone.start(pv, ids, torch.ones_like(ids), 8)
        lengths.append(ee.backbone.embed_prompt(ctx).shape[1])  # the prompt's slots
        handles.append(scheduler.submit(pv, ids, max_new_tokens=3 + 2 * i, mode="full", eos_token_id=[]))
    scheduler.run_until_idle()
    tokens = sum(len(h.result().tokens) for h in handles)
    rode = scheduler.engine.riding_slots > 0  # the last request's prompt rode in a decode step
    assert rode == (ragged and ee.backbone.ragged_layers())
    engine, layers = scheduler.engine, ee.backbone.num_layers
    windowed = 0 if ee.backbone.family == "t5" else 4 - rode
    assert engine.row_steps == tokens - windowed
    # every step ran every layer once, over its rows' new slots and the riding prompt's (its first token's row)
    assert engine.layer_calls == layers * engine.steps
    assert engine.slot_layers == layers * (engine.row_steps - rode + engine.riding_slots)
    # the burst of three in one window as wide as its longest prompt, the last one alone unless it rode
    windows = 0 if ee.backbone.family == "t5" else 3 * max(lengths[:3]) + (0 if rode else lengths[3])
    assert engine.window_slot_layers == layers * windows


def test_prefill_budget_binds_only_while_rows_decode(ee, mixed):
    """A burst into an idle scheduler joins whole in one iteration, whatever `prefill_chunk` (no row decodes, so
    nobody waits on the prompts); a request arriving while rows decode gets only the budget (its prompt is longer).
    Each decodes as alone."""
    if ee.backbone.family == "t5":
        pytest.skip("T5's prompt is its encoder's, encoded at admission: no decoder prompt to budget")
    scheduler = Scheduler(ee, max_batch=4, max_len=32, prefill_chunk=2)
    requests, handles = [], []
    for i in range(4):
        pv, ids, _ = tiny_inputs(ee.model, batch=1, prompt_len=3 + i, seed=110 + i)
        options = dict(max_new_tokens=6, threshold=mixed[i % len(mixed)], eos_token_id=[])
        requests.append(_alone(ee, pv, ids, **options))
        if i == 3:
            scheduler.step()
            assert scheduler.engine.active[:3] == [True] * 3, "the burst did not join in one iteration"
        handles.append(scheduler.submit(pv, ids, **options))
    scheduler.step()
    assert not scheduler.engine.active[3], "the budget did not bind while rows decode"
    scheduler.run_until_idle()
    for handle, (tokens, layers) in zip(handles, requests):
        assert (handle.result().tokens, handle.result().exit_layers) == (tokens, layers)


def test_start_many_gives_each_request_what_start_gives_it(ee):
    """Images encoded together, each request's context is the one `start` makes for it alone, bit for bit."""
    backbone, requests = ee.backbone, []
    for i, length in enumerate([1, 4, 2]):
        pv, ids, _ = tiny_inputs(ee.model, batch=1, prompt_len=length, seed=90 + i)
        requests.append(Start(pv, ids, 3 + i, {}))
    together = backbone.start_many(requests)
    for request, ctx in zip(requests, together):
        alone = backbone.start(request.pixel_values, request.input_ids, None, request.max_new_tokens)
        assert torch.equal(ctx.prompt_ids, alone.prompt_ids) and torch.equal(ctx.key_mask, alone.key_mask)
        assert torch.equal(ctx.prompt_embeds, alone.prompt_embeds)
        for name in ("positions", "encoder_out", "encoder_mask"):
            if name in alone.extra:
                assert torch.equal(ctx.extra[name], alone.extra[name]), name


def test_stream_and_background_thread(ee):
    pv, ids, _ = tiny_inputs(ee.model, batch=1, prompt_len=3, seed=3)
    tokens, layers = _alone(ee, pv, ids, max_new_tokens=6, threshold=0.5, eos_token_id=[])
    scheduler = Scheduler(ee, max_batch=2, max_len=32)
    scheduler.start()
    try:
        handle = scheduler.submit(pv, ids, max_new_tokens=6, threshold=0.5, eos_token_id=[])
        events = list(handle)
    finally:
        scheduler.stop()
    assert [e.token for e in events] == tokens and [e.exit_layer for e in events] == layers
    assert handle.result().finish_reason == "length"


def test_background_thread_runs_at_the_callers_torch_threads(ee, monkeypatch):
    """A new thread's MKL/OpenMP start at every core whatever the starting thread set (`torch.get_num_threads()`
    there still reports the caller's value), so the loop must set the count itself."""
    calls, set_threads = [], torch.set_num_threads
    monkeypatch.setattr(
        torch, "set_num_threads", lambda n: (calls.append((threading.current_thread().name, n)), set_threads(n))
    )
    pv, ids, _ = tiny_inputs(ee.model, batch=1, prompt_len=3, seed=3)
    scheduler = Scheduler(ee, max_batch=2, max_len=32)
    scheduler.start()
    try:
        list(scheduler.submit(pv, ids, max_new_tokens=2, eos_token_id=[]))
    finally:
        scheduler.stop()
    assert calls == [("freevlm-scheduler", torch.get_num_threads())]


def test_options_refused_at_submission(ee):
    scheduler = Scheduler(ee, max_batch=1, max_len=16, max_waiting=1)
    pv, ids, _ = tiny_inputs(ee.model, batch=1, prompt_len=3)
    bad = {
        "threshold": dict(threshold=1.5),
        "max_new_tokens": dict(max_new_tokens=0),
        "mode": dict(mode="speculative"),
        "kv": dict(kv="exact"),
        "num_beams": dict(num_beams=2),
        "unknown option": dict(temprature=0.5),
    }
    for name, options in bad.items():
        with pytest.raises(ValueError, match=name):
            scheduler.submit(pv, ids, **options)
    with pytest.raises(ValueError, match="max_len=16"):  # can never fit
        scheduler.submit(pv, ids, max_new_tokens=16)
    with pytest.raises(ValueError, match="one image"):
        scheduler.submit(torch.cat([pv, pv]), ids)
    with pytest.raises(ValueError, match="stop"):
        scheduler.submit(pv, ids, stop=[[]])
    scheduler.submit(pv, ids, max_new_tokens=2)
    with pytest.raises(QueueFull):
        scheduler.submit(pv, ids, max_new_tokens=2)
    scheduler.run_until_idle()


def test_config_object_and_overrides(ee):
    pv, ids, _ = tiny_inputs(ee.model, batch=1, prompt_len=2, seed=9)
    tokens, layers = _alone(ee, pv, ids, max_new_tokens=4, threshold=0.3, eos_token_id=[])
    scheduler = Scheduler(ee, max_batch=2, max_len=32)
    handle = scheduler.submit(
        pv, ids, config=DecodeConfig(max_new_tokens=9, threshold=0.3, eos_token_id=[]), max_new_tokens=4
    )
    scheduler.run_until_idle()
    assert handle.result().tokens == tokens and handle.result().exit_layers == layers
