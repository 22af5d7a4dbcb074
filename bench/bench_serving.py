"""Serving under Poisson arrivals: one request at a time, static batches, continuous batching (full model) and
continuous batching with exits, side by side in one run, per arrival rate.

    PYTHONPATH=. python bench/bench_serving.py [--preset opt-demo] [--rates 2 8] [--requests 24] [--threshold 0.1]

A random model of the demo LM's size (the preset), exits at the demo's layers (1, 3, 6); answer lengths vary
(uniform in [--min-tokens, --max-tokens]), EOS disabled. Prints output tokens/s, time to first token and time per
output token (p50/p99) and the mean exit layer; the baselines do not stream, so their first token counts at the end
of their prefill (`DecodeStats.seconds_prefill`), which favours them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from common import big_blip2, inputs

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.serving import Scheduler

EXITS = [1, 3, 6]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def workload(model, count: int, rate: float, lengths: tuple[int, int], seed: int):
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(count):
        t += rng.expovariate(rate)
        pv, ids, _ = inputs(model, batch=1, prompt_len=rng.randint(4, 12), seed=seed * 1000 + i)
        out.append((t, pv, ids, rng.randint(*lengths)))
    return out


def run_continuous(ee, requests, threshold: float, max_batch: int):
    scheduler = Scheduler(ee, max_batch=max_batch, max_len=128)
    start, handles, pending = time.perf_counter(), [], list(requests)
    while pending or not scheduler.idle:
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            arrival, pv, ids, n = pending.pop(0)
            handle = scheduler.submit(pv, ids, max_new_tokens=n, threshold=threshold, eos_token_id=[])
            handle.submitted = start + arrival
            handles.append(handle)
        if not scheduler.step() and pending:
            time.sleep(max(0.0, pending[0][0] - (time.perf_counter() - start)))
    results = [h.result() for h in handles]
    ttft = [r.time_to_first_token for r in results]
    tpot = [r.time_per_output_token for r in results if r.time_per_output_token is not None]
    layers = [layer for r in results for layer in r.exit_layers]
    tokens = sum(len(r.tokens) for r in results)
    return tokens / (time.perf_counter() - start), ttft, tpot, statistics.mean(layers)


def run_generate(ee, requests, batch: int):
    """Requests in arrival order, `batch` at a time once that many (or all that remain) have arrived; each batch runs
    to its end (batch 1: one request at a time)."""
    start, ttft, tpot, tokens, layers, pending = time.perf_counter(), [], [], 0, [], list(requests)
    while pending:
        group = pending[:batch]
        wait = group[-1][0] - (time.perf_counter() - start)
        if wait > 0:
            time.sleep(wait)
        pending = pending[len(group) :]
        t0 = time.perf_counter() - start
        n = max(r[3] for r in group)
        pv = torch.cat([r[1] for r in group])
        width = max(r[2].shape[1] for r in group)
        ids = torch.stack([torch.cat([r[2][0].new_full((width - r[2].shape[1],), 1), r[2][0]]) for r in group])
        mask = torch.stack([torch.arange(width) >= width - r[2].shape[1] for r in group]).long()
        out = ee.generate(pv, ids, mask, max_new_tokens=n, threshold=1.0, eos_token_id=[])
        for (arrival, _, _, want), row in zip(group, out.exit_layers):
            ttft.append(t0 + out.stats.seconds_prefill - arrival)
            tpot.append(out.stats.seconds_decode / max(n - 1, 1))
            tokens += want  # a static batch pads short answers to the longest: only the asked tokens count
            layers += row[:want].tolist()
    return tokens / (time.perf_counter() - start), ttft, tpot, statistics.mean(layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="opt-demo")
    parser.add_argument("--rates", type=float, nargs="+", default=[2.0, 16.0], help="arrivals per second")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--threshold", type=float, default=0.1)
    parser.add_argument("--min-tokens", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = big_blip2(args.preset)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig(EXITS))
    print(
        f"{args.preset}: {ee.backbone.num_layers} layers, exits {EXITS}, {args.requests} requests per rate, "
        f"{args.min_tokens}-{args.max_tokens} new tokens, {torch.get_num_threads()} thread(s)"
    )
    for rate in args.rates:
        requests = workload(model, args.requests, rate, (args.min_tokens, args.max_tokens), seed=int(rate * 10))
        runs = {
            "one at a time": lambda r=requests: run_generate(ee, r, 1),
            f"static batches of {args.max_batch}": lambda r=requests: run_generate(ee, r, args.max_batch),
            "continuous, full": lambda r=requests: run_continuous(ee, r, 1.0, args.max_batch),
            f"continuous, exits @ {args.threshold}": lambda r=requests: run_continuous(
                ee, r, args.threshold, args.max_batch
            ),
        }
        print(f"\nrate {rate}/s")
        speed = {}
        for name, fn in runs.items():
            tps, ttft, tpot, layers = fn()
            speed[name] = tps
            print(
                f"  {name:28s} {tps:7.1f} tok/s"
                f"  TTFT p50 {percentile(ttft, 0.5):6.3f} p99 {percentile(ttft, 0.99):6.3f} s"
                f"  TPOT p50 {percentile(tpot, 0.5) * 1000:6.1f} p99 {percentile(tpot, 0.99) * 1000:6.1f} ms"
                f"  mean exit layer {layers:.2f}"
            )
        names = list(speed)
        print(
            f"  continuous full / one at a time {speed[names[2]] / speed[names[0]]:.2f}x (goal >= 3 at 16 concurrent); "
            f"/ static {speed[names[2]] / speed[names[1]]:.2f}x (goal >= 1.3); "
            f"exits / continuous full {speed[names[3]] / speed[names[2]]:.2f}x (goal >= 1.0)"
        )


if __name__ == "__main__":
    main()
