"""Serving under Poisson arrivals, and in closed loops at a fixed number of concurrent requests: one request at a
time, static batches, continuous batching (full model) and continuous batching with exits under each exit rule,
side by side in one run, per arrival rate and per concurrency.

    cd bench && PYTHONPATH=.. python bench_serving.py [--rates 4 32] [--concurrency 16 4 1] [--requests 24]
        [--thresholds 0.5 0.6] [--lengths uniform] [--batch-wait 0.5 inf] [--prefill-chunk 64] [--ragged both]
        [--turns 2]

The model is the demo's (`freevlm demo`'s trained OPT backbone and its exits, from its cache, FREEVLM_CACHE or
`freevlm.demo.config.default_cache()`; `--exits`, default those `freevlm serve` consults: the demo's placement's,
else its fixed 1, 3, 6) captioning the demo's test images with its prompt, EOS on. With
`--lengths captions` (the default) every request asks for --max-tokens and its answer ends at EOS: the captions'
lengths (11-29 tokens, so mostly alike at 24). With `--lengths uniform` each request's `max_new_tokens` is drawn
uniform in [--min-tokens, --max-tokens] (seeded per rate) and EOS stays on, so an answer is the shorter of the two
and short and long answers mix, as in real traffic. Without a cache, a random model of its size (the preset) whose
exits never leave early at a useful threshold, with lengths uniform in [--min-tokens, --max-tokens] and EOS off.

Static batches are what a server without continuous batching does: when the model is free it takes the requests that
have arrived, up to --max-batch, waiting for more until --max-batch have arrived or the oldest has waited --batch-wait
seconds, and runs them to the end of their longest answer (full model, the same EOS), the next arrivals waiting
meanwhile; each row counts only the tokens its request asked for. Prints output tokens/s, time to first token and time
per output token (p50/p99), the mean rows decoding together and the mean exit layer; the baselines do not stream, so
their first token counts at the end of their prefill (`DecodeStats.seconds_prefill`), which favours them. "prefill
stall" is the longest scheduler step that encoded a prompt next to the median step that did not; "steps (joins in ...)"
counts the scheduler's steps, those with a request waiting or joining, and their share of its work; "images" the share
of the work encoding images (BLIP-2's vision encoder and Q-Former, LLaVA's tower and projector: `timing_images`);
"calls/step" the layer and exit calls per decode step; "slot-layers/token" the (slot, layer) pairs run per output token,
all of them: every prompt slot, in a step or a window of its own, every decode row (a static batch's finished rows too)
and catch-up slot, exit layers included. Their ratio, static over continuous full, is printed, and from it what
continuous batching would gain at the static batches' cost per slot-layer and per image: it saves decode rows, not
prompts or images, so where prompts cost as much as answers it gains well below the ratio of live rows. `--ragged both`
runs each continuous configuration twice, with ragged layer calls (a joining prompt's chunk rides in the decode step's
calls: `RowEngine(ragged=True)`, the default) and without ("old calls": each iteration's chunks in a window of their
own, 12 calls more); `--turns` repeats every run, in the same order, so configurations alternate in one process; the
ratios are printed per turn, then their medians over the turns (what to quote: one turn's ratio moves by 10-20% on a
shared machine).

A Poisson run below saturation measures how efficiently the server keeps up (continuous batching decodes only the
rows that have arrived, a static batcher waits to gather more), not throughput at a given concurrency; for that,
`--concurrency K` runs closed loops (instead of the default rates, or as well with --rates): K clients, each
submitting its next request as soon as its last is answered, over rate 1's requests (arrival times unused). Static
batches: the clients whose batch ended resubmit at its end, and the batcher takes up to --max-batch waiting
requests; since every client then waits, nothing more can come and the batch goes at once whatever --batch-wait is
(one "static" run). One at a time is concurrency 1 whatever K. Static batches print their rows and, in brackets,
the rows whose request still wants tokens (live), averaged over decode steps.

Throughput is printed twice: tokens per wall-clock second (arrival gaps included: at a low rate it is the arrival
rate; in a closed loop, which never idles, the work rate too, so its ratios print both) and tokens per CPU second
this process spent working, which the ratios use: on a machine shared with other jobs the wall clock of a busy
second varies several-fold between runs, its CPU seconds far less (run with --threads 1, the default, so a CPU
second is a second of work). On a GPU (`--device cuda --dtype bfloat16`: the
random model at --preset's size, as `bench/run_gpu.sh` runs it) the CPU waits on the device, so a second of work
is the wall clock inside the steps (each ends on the host, reading its tokens) and the generate calls.
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from common import big_blip2, inputs

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.demo.config import DemoConfig, default_cache
from freevlm.placement import exits_subset
from freevlm.serving import Scheduler
from freevlm.serving.rows import EXIT_RULES

EXITS = list(DemoConfig.exit_layers)


@dataclass
class Run:
    tokens_per_second: float  # wall clock, arrival gaps included
    tokens_per_busy_second: float  # per second of work (CPU seconds, or wall seconds in steps on a GPU): no idle gaps
    ttft: list[float]
    tpot: list[float]
    answers: list[int]  # tokens each request got
    mean_exit_layer: float
    mean_rows: float  # requests decoding together, on average over decode steps (batches)
    stall: tuple[float, float] | None  # (longest step that encoded a prompt, median step that did not), seconds
    calls_per_step: float | None = None  # layer calls (exit layers included) per decode step
    slot_layers_per_token: float | None = None  # (slot, layer) pairs run per token: all the arithmetic
    kv_only_per_token: float | None = None  # of those, the pairs that computed only K/V (no output was read)
    live_rows: float | None = None  # static batches: rows whose request still wants tokens, on average over steps
    joins: tuple[int, int, float] | None = None  # continuous: (steps, steps with a join, their share of work)
    image_share: float | None = None  # of the work, the share encoding images (`Backbone.image_features`)


@contextmanager
def timing_images(ee, clock):
    """Seconds of `clock` spent in the backbone's `image_features` (BLIP-2's images and Q-Former; LLaVA's are its
    model's `get_image_features`: tower and projector) while in the block, in a one-item list (on a GPU, host time:
    the encoder's launches)."""
    owner, name, spent = ee.backbone, "image_features", [0.0]
    if not hasattr(owner, name):
        owner, name = owner.model.model, "get_image_features"
    encode = getattr(owner, name)

    def timed(*args, **kwargs):
        start = clock()
        out = encode(*args, **kwargs)
        spent[0] += clock() - start
        return out

    setattr(owner, name, timed)
    try:
        yield spent
    finally:
        delattr(owner, name)  # the class's method again


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def add_exits_argument(parser: argparse.ArgumentParser) -> None:
    """`--exits`: which of the demo's trained exits are consulted (`demo_model`'s `exits_at`)."""
    parser.add_argument(
        "--exits",
        type=int,
        nargs="+",
        help="the demo's trained exits consulted (default: those its placement chose, else its fixed ones)",
    )


def demo_model(cache: Path, exits_at: list[int] | None = None):
    """The demo's trained backbone and its FREE exits at `exits_at` (default: those `freevlm serve` consults, the
    ones the demo's placement chose where it recorded them, else FREE's fixed layers), or None when the cache has
    none."""
    from freevlm.demo.train import read_placement
    from freevlm.loading import load_exits, load_vlm

    for exits in sorted(cache.glob("backbone-opt-*-exits-free_candidates-*/exits")):
        backbone = Path(str(exits.parent).split("-exits-")[0])
        placement = read_placement(exits)
        exits_at = exits_at or list(EXITS if placement is None else placement.layers)
        bundle = load_vlm(backbone)
        ee = exits_subset(load_exits(bundle.model, exits), exits_at)
        return bundle, ee, f"the demo's trained model ({backbone.name}, exits {exits_at})"
    return None


def demo_workload(bundle, count: int, rate: float, lengths: tuple[int, int], seed: int):
    """Poisson arrivals of the demo's test images (in order, cycling), each with the demo's caption prompt, asking
    for `max_new_tokens` uniform in `lengths` (its own generator: the arrivals do not change with the lengths)."""
    from freevlm.data import shapes
    from freevlm.loading import CAPTION_PROMPT

    rng, lengths_rng = random.Random(seed), random.Random(seed + 1)
    t, out = 0.0, []
    for i in range(count):
        t += rng.expovariate(rate)
        image = shapes.render(shapes.make_example("test", i % DemoConfig.test_images).scene)
        batch = bundle.inputs([image], [CAPTION_PROMPT])
        out.append((t, batch["pixel_values"], batch["input_ids"], lengths_rng.randint(*lengths)))
    return out


def random_workload(model, count: int, rate: float, lengths: tuple[int, int], seed: int):
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(count):
        t += rng.expovariate(rate)
        pv, ids, _ = inputs(model, batch=1, prompt_len=rng.randint(4, 12), seed=seed * 1000 + i)
        out.append((t, pv, ids, rng.randint(*lengths)))
    return out


def model_and_requests(
    count: int, lengths: tuple[int, int], seed: int, random_lengths=None, exits_at: list[int] | None = None
) -> tuple:
    """(ee, name, requests, demo): the demo's trained model and `count` requests of its test images
    (`demo_workload`) when its cache is there (`demo` True), else a random opt-demo with random prompts
    (`random_workload`, answer lengths `random_lengths`, default `lengths`); requests arrive at rate 1."""
    demo = demo_model(default_cache(), exits_at)
    if demo is not None:
        bundle, ee, name = demo
        return ee, name, demo_workload(bundle, count, 1.0, lengths, seed), True
    model, exits_at = big_blip2("opt-demo"), exits_at or EXITS
    ee = EarlyExitVLM.from_backbone(model, ExitConfig(exits_at))
    requests = random_workload(model, count, 1.0, random_lengths or lengths, seed)
    return ee, f"a random opt-demo (exits {exits_at})", requests, False


def run_continuous(
    ee,
    requests,
    threshold: float,
    max_batch: int,
    eos,
    exit_rule: str = EXIT_RULES[0],
    chunk=64,
    clock=time.process_time,
    ragged: bool = True,
    concurrency: int | None = None,
    kv: str = "recompute",
):
    """A Scheduler over `requests`, each submitted at its arrival time, or (`concurrency`) a closed loop: that many
    clients, each submitting its next request (in order) as soon as its previous one is answered."""
    scheduler = Scheduler(ee, max_batch=max_batch, max_len=128, prefill_chunk=chunk, exit_rule=exit_rule, ragged=ragged)
    start, handles, pending = time.perf_counter(), [], list(requests)
    prefill_steps, decode_steps, steps, busy, joining = [], [], 0, 0.0, 0.0

    def due(arrival: float) -> bool:
        if concurrency is None:
            return arrival <= time.perf_counter() - start
        return scheduler.running + scheduler.waiting < concurrency

    with timing_images(ee, clock) as images:
        while pending or not scheduler.idle:
            while pending and due(pending[0][0]):
                arrival, pv, ids, n = pending.pop(0)
                handle = scheduler.submit(pv, ids, max_new_tokens=n, threshold=threshold, eos_token_id=eos, kv=kv)
                if concurrency is None:
                    handle.submitted = start + arrival
                handles.append(handle)
            prefilling = bool(scheduler._waiting or scheduler._joining)
            t0, c0 = time.perf_counter(), clock()
            live = scheduler.step()
            work = clock() - c0
            busy += work
            joining += work if prefilling else 0.0
            (prefill_steps if prefilling else decode_steps).append(time.perf_counter() - t0)
            steps += 1
            if not live and pending and concurrency is None:
                time.sleep(max(0.0, pending[0][0] - (time.perf_counter() - start)))
    results = [h.result() for h in handles]
    ttft = [r.time_to_first_token for r in results]
    tpot = [r.time_per_output_token for r in results if r.time_per_output_token is not None]
    layers = [layer for r in results for layer in r.exit_layers]
    tokens = sum(len(r.tokens) for r in results)
    stall = (max(prefill_steps, default=0.0), statistics.median(decode_steps) if decode_steps else float("nan"))
    wall, engine = time.perf_counter() - start, scheduler.engine
    calls = (engine.layer_calls + engine.exit_calls) / engine.steps
    return Run(
        tokens / wall,
        tokens / busy,
        ttft,
        tpot,
        [len(r.tokens) for r in results],
        statistics.mean(layers),
        engine.row_steps / engine.steps,  # a step's rows, those that finished in it included
        stall,
        calls,
        (engine.slot_layers + engine.window_slot_layers) / tokens,
        engine.kv_only_slot_layers / tokens,
        joins=(steps, len(prefill_steps), joining / busy),
        image_share=images[0] / busy,
    )


def run_generate(ee, requests, batch: int, eos, wait: float = 0.0, clock=time.process_time, clients=None):
    """Static batches: when the model is free, the requests that have arrived, up to `batch`, once `batch` have
    arrived or the oldest has waited `wait` seconds (or all that are still to come have: at a run's end); each batch
    runs to its end, later arrivals waiting (batch 1: one request at a time). `clients`: a closed loop instead of the
    arrival times: that many clients, the first requests at 0 s, each submitting its next request at the end of the
    batch that answered its last; then every client waits whenever the model is free, so a batch goes at once."""
    start, ttft, tpot, tokens, layers = time.perf_counter(), [], [], 0, []
    pending, later = (list(requests), []) if clients is None else ([], list(requests))
    pending += [(0.0, *r[1:]) for r in later[:clients]]
    later = later[len(pending) :]
    busy, rows, answers, live, slot_layers, image_seconds = 0.0, [], [], [], 0, 0.0
    while pending:
        go = min(pending[0][0] + wait, pending[min(batch, len(pending)) - 1][0])
        time.sleep(max(0.0, go - (time.perf_counter() - start)))
        now = time.perf_counter() - start
        group = [r for r in pending[:batch] if r[0] <= now]
        pending = pending[len(group) :]
        t0 = time.perf_counter() - start
        n = max(r[3] for r in group)
        pv = torch.cat([r[1] for r in group])
        width = max(r[2].shape[1] for r in group)
        ids = torch.stack([torch.cat([r[2][0].new_full((width - r[2].shape[1],), 1), r[2][0]]) for r in group])
        mask = torch.stack([torch.arange(width) >= width - r[2].shape[1] for r in group]).long()
        device = ee.backbone.device
        c0 = clock()
        with timing_images(ee, clock) as images:
            out = ee.generate(
                pv.to(device), ids.to(device), mask.to(device), max_new_tokens=n, threshold=1.0, eos_token_id=eos
            )
        busy += clock() - c0
        image_seconds += images[0]
        rows.append(len(group))
        # every row's prompt (its ids: these prompts hold their image tokens) and a slot per later step, through
        # every layer (threshold 1.0: no exit runs), finished rows too
        slot_layers += len(group) * (width + out.stats.steps - 1) * ee.backbone.num_layers
        made_per_row = []
        for (arrival, _, _, want), row in zip(group, out.exit_layers):
            made = row[:want][row[:want] >= 0]  # a static batch runs to its longest answer: only the asked count
            ttft.append(t0 + out.stats.seconds_prefill - arrival)
            tpot.append(out.stats.seconds_decode / max(out.exit_layers.shape[1] - 1, 1))
            tokens += len(made)
            answers.append(len(made))
            made_per_row.append(len(made))
            layers += made.tolist()
        live += [sum(made > step for made in made_per_row) for step in range(out.exit_layers.shape[1])]
        end = time.perf_counter() - start
        pending += [(end, *r[1:]) for r in later[: len(group)]]  # the clients of the closed loop, answered
        later = later[len(group) :]
    wall = time.perf_counter() - start
    mean_rows = statistics.mean(rows)
    mean_layer, mean_live = statistics.mean(layers), statistics.mean(live)
    return Run(
        tokens / wall,
        tokens / busy,
        ttft,
        tpot,
        answers,
        mean_layer,
        mean_rows,
        None,
        slot_layers_per_token=slot_layers / tokens,
        live_rows=mean_live,
        image_share=image_seconds / busy,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("auto", "demo", "random"), default="auto")
    add_exits_argument(parser)
    parser.add_argument("--preset", default="opt-demo", help="the random model's size")
    parser.add_argument(
        "--rates", type=float, nargs="+", help="arrivals per second (default: 2 16, none with --concurrency)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        help="closed loops: that many clients, each submitting its next request when its last is answered",
    )
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument(
        "--thresholds", type=float, nargs="+", help="exit thresholds (default: 0.5 0.6 on the demo, 0.1 at random)"
    )
    parser.add_argument(
        "--lengths",
        choices=("captions", "uniform"),
        default="captions",
        help="the demo's max_new_tokens: --max-tokens for every request (answers end at EOS: the captions' lengths), "
        "or uniform in [--min-tokens, --max-tokens] per request, seeded by the rate, EOS on (the random model: always "
        "uniform, EOS off)",
    )
    parser.add_argument("--max-tokens", type=int, default=24, help="the longest max_new_tokens")
    parser.add_argument("--min-tokens", type=int, default=4, help="the shortest max_new_tokens, for uniform lengths")
    parser.add_argument(
        "--batch-wait",
        type=float,
        nargs="+",
        default=[0.5, float("inf")],
        help="static batches: the longest the oldest waiting request waits for --max-batch to arrive, seconds "
        "(one static run each; inf: always a full batch, the most tokens per CPU second and the longest waits)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=64,
        help="the scheduler's prompt slots per iteration (`freevlm serve`: 512)",
    )
    parser.add_argument(
        "--ragged",
        choices=("on", "off", "both"),
        default="on",
        help="continuous batching with ragged layer calls (prompt chunks ride in decode steps), without, or both",
    )
    parser.add_argument("--turns", type=int, default=1, help="runs of every configuration, taking turns")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cuda: the random model only, ratios of wall-clock work")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    on_gpu = args.device.startswith("cuda")
    clock = time.perf_counter if on_gpu else time.process_time  # the steps end on the host: wall clock is work there
    per_work = "tok/busy-s" if on_gpu else "tok/CPU-s"
    demo = None if args.model == "random" or on_gpu else demo_model(default_cache(), args.exits)
    if demo is None and args.model == "demo":
        raise SystemExit(f"no demo model in {default_cache()}: run `freevlm demo` or set FREEVLM_CACHE")
    if demo is not None:
        bundle, ee, name = demo
        eos, thresholds = None, args.thresholds or [0.5, 0.6]  # the demo's chosen threshold and the issue's
        uniform = args.lengths == "uniform"
        lengths = (args.min_tokens if uniform else args.max_tokens, args.max_tokens)
        told = "uniform in [{}, {}]".format(*lengths) if uniform else f"{args.max_tokens}"
        told = f"max_new_tokens {told} (seed: 10 x rate + 1), EOS on"

        def workload(rate):
            return demo_workload(bundle, args.requests, rate, lengths, seed=int(rate * 10))
    else:
        model = big_blip2(args.preset, getattr(torch, args.dtype), args.device)
        ee = EarlyExitVLM.from_backbone(model, ExitConfig(EXITS))
        eos, thresholds, name = [], args.thresholds or [0.1], f"a random {args.preset} (exits {EXITS})"
        told = f"answer lengths uniform in [{args.min_tokens}, {args.max_tokens}] (seed: 10 x rate), EOS off"

        def workload(rate):
            lengths = (args.min_tokens, args.max_tokens)
            return random_workload(model, args.requests, rate, lengths, seed=int(rate * 10))

    print(f"{name}: {args.requests} requests per load, max batch {args.max_batch}, {torch.get_num_threads()} thread(s)")
    print(told)
    chunk = args.prefill_chunk
    variants = {"on": [True], "off": [False], "both": [True, False]}[args.ragged]

    def continuous_runs(requests, concurrency=None) -> tuple[dict, dict]:
        """(runs, fulls): the continuous configurations, and each one's full model of the same variant."""
        runs, fulls = {}, {}
        for ragged in variants:
            old = "" if ragged else ", old calls"
            for threshold in [1.0, *thresholds]:
                for rule in EXIT_RULES if threshold < 1.0 else EXIT_RULES[:1]:
                    label = f"continuous, {rule} @ {threshold}{old}" if threshold < 1.0 else f"continuous, full{old}"
                    fulls[label] = f"continuous, full{old}"
                    runs[label] = lambda r=requests, t=threshold, rule=rule, g=ragged: run_continuous(
                        ee, r, t, args.max_batch, eos, rule, chunk, clock, g, concurrency
                    )
        return runs, fulls

    rates = args.rates if args.rates is not None else [] if args.concurrency else [2.0, 16.0]
    for rate in rates:
        requests = workload(rate)
        runs = {"one at a time": lambda r=requests: run_generate(ee, r, 1, eos, clock=clock)}
        for wait in args.batch_wait:
            label = f"static, wait for {args.max_batch}" if wait == float("inf") else f"static, wait <= {wait:g} s"
            runs[label] = lambda r=requests, w=wait: run_generate(ee, r, args.max_batch, eos, w, clock)
        continuous, fulls = continuous_runs(requests)
        print(f"\nrate {rate}/s")
        take_turns({**runs, **continuous}, fulls, args.turns, per_work)
    requests = workload(1.0)  # the closed loops': rate 1's requests, their arrival times unused
    for concurrency in args.concurrency or []:
        runs = {
            "one at a time": lambda: run_generate(ee, requests, 1, eos, clock=clock, clients=1),
            "static": lambda k=concurrency: run_generate(ee, requests, args.max_batch, eos, clock=clock, clients=k),
        }
        continuous, fulls = continuous_runs(requests, concurrency)
        print(f"\nclosed loop, {concurrency} concurrent requests (one at a time: 1)")
        take_turns({**runs, **continuous}, fulls, args.turns, per_work, closed=True)


def take_turns(runs: dict, fulls: dict, turns: int, per_work: str, closed: bool = False) -> None:
    """Runs every configuration `turns` times in turn (so machine drift hits them alike) and prints each run and the
    ratios of each turn, then (several turns) each ratio's median over the turns (a neighbour's burst on a shared
    machine lands in one configuration's run); `closed`: ratios of tokens per wall-clock second too (a closed loop
    never idles)."""
    statics = [label for label in runs if label.startswith("static")]
    pairs = []  # (a, b, goal): the ratios printed, a's tokens per second of work over b's
    for label, full in fulls.items():
        if label == full:
            pairs.append((full, "one at a time", "goal >= 3 at 16 concurrent"))
            pairs += [(full, static, "goal >= 1.3") for static in statics]
        else:
            pairs.append((label, full, "goal >= 1.0; >= 1.3 at 1-2 concurrent"))
    if {"continuous, full", "continuous, full, old calls"} <= runs.keys():  # `--ragged both`
        pairs.append(("continuous, full", "continuous, full, old calls", None))
    ratios: dict[tuple, list[tuple[float, float]]] = {pair: [] for pair in pairs}
    for turn in range(turns):
        if turns > 1:
            print(f" turn {turn + 1}")
        done = {}
        for label, fn in runs.items():
            done[label] = run = fn()
            if label == "one at a time" and turn == 0:
                answers = sorted(run.answers)
                print(f"  answers: {answers[0]}-{answers[-1]} tokens, median {statistics.median(answers):g}")
            print_run(label, run, per_work)
        print(f"  ratios of {per_work}:")
        for pair in pairs:
            a, b = done[pair[0]], done[pair[1]]
            ratios[pair].append(
                (a.tokens_per_busy_second / b.tokens_per_busy_second, a.tokens_per_second / b.tokens_per_second)
            )
            print_ratio(pair, [ratios[pair][-1]], closed)
        for full, static in itertools.product(dict.fromkeys(fulls.values()), statics):
            # what continuous batching saves in arithmetic, and so could gain
            work = done[static].slot_layers_per_token / done[full].slot_layers_per_token
            images = done[static].image_share
            priced = 1 / (images + (1 - images) / work)  # its images cost as much as static's, its slots fewer
            print(
                f"  slot-layers per token, {static} / {full} {work:.2f}x; {full} / {static} at"
                f" {static}'s cost per slot-layer and image: {priced:.2f}x"
            )
    if turns > 1:
        print(f" medians over {turns} turns (ratios of {per_work}):")
        for pair in pairs:
            print_ratio(pair, ratios[pair], closed)


def print_ratio(pair: tuple, values: list[tuple[float, float]], wall: bool) -> None:
    """`a / b` of `pair` (a, b, goal): the median of `values` (per work, per wall-clock second), and `wall`: the
    median of the latter too."""
    a, b, goal = pair
    of_wall = f" ({statistics.median(v[1] for v in values):.2f}x of tok/s)" if wall else ""
    told = f" ({goal})" if goal else ""
    print(f"  {a} / {b} {statistics.median(v[0] for v in values):.2f}x{of_wall}{told}")


def print_run(label: str, run: Run, per_work: str) -> None:
    stall = run.stall
    stalled = "" if stall is None else f"  prefill stall {stall[0] * 1000:5.1f} ms (step {stall[1] * 1000:4.1f})"
    if run.image_share is not None:
        stalled += f"  images {run.image_share:4.0%}"
    if run.slot_layers_per_token is not None:
        stalled += f"  slot-layers/token {run.slot_layers_per_token:5.1f}"
    if run.calls_per_step is not None:
        stalled += f" (K/V only {run.kv_only_per_token:3.1f})  calls/step {run.calls_per_step:4.1f}"
        steps, joined, share = run.joins
        stalled += f"  steps {steps} (joins in {joined}: {share:.0%} of the work)"
    print(
        f"  {label:36s} {run.tokens_per_second:6.1f} tok/s {run.tokens_per_busy_second:6.1f} {per_work}"
        f"  rows {run.mean_rows:4.1f}{'' if run.live_rows is None else f' (live {run.live_rows:4.1f})'}"
        f"  TTFT p50 {percentile(run.ttft, 0.5):6.3f} p99 {percentile(run.ttft, 0.99):6.3f} s"
        f"  TPOT p50 {percentile(run.tpot, 0.5) * 1000:6.1f}"
        f" p99 {percentile(run.tpot, 0.99) * 1000:6.1f} ms  exit layer {run.mean_exit_layer:5.2f}{stalled}"
    )


if __name__ == "__main__":
    main()
