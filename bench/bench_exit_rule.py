"""Exits against the full model at a fixed number of requests in flight (a closed loop), for the exit rule.

    cd bench && PYTHONPATH=.. python bench_exit_rule.py [--concurrency 1 2 4 10] [--repeats 2] [--thresholds 0.5 0.6]
        [--kv recompute propagate] [--old-calls] [--lengths uniform]

Poisson arrivals (`bench_serving.py`) mix loads within a run and their short runs are noisy on a shared machine; here
the scheduler always holds `K` requests (a new one is submitted as one finishes), the same requests for every run, and
the full model and each threshold (at each `--kv` mode) take turns, `--repeats` times after a warm-up, so machine drift
hits them alike. Prints the median tokens per CPU second (image encoder and prompt included) and each threshold's ratio
to the full model, with the mean layer its tokens left at (how far exits can pay at several rows in flight depends on
how often the first one is sure: docs/DESIGN.md, "The ceiling with exact caches"). The model is the demo's when its
cache is there (FREEVLM_CACHE), else a random one of its size; `--exits` picks which of its trained exits are consulted.
Each request asks for 24 tokens (the demo's answers end at EOS: the captions' lengths), or with `--lengths uniform` for
4-24 (short and long answers mixed, as `bench_serving.py --lengths uniform`; always so on the random model, EOS off).
`--old-calls` adds the full model without ragged layer calls (`Scheduler(ragged=False)`: each iteration's joining
prompts in a window of their own) to the turns, and prints the ragged full model's ratio to it.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_serving import add_exits_argument, model_and_requests, run_continuous


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 10])
    parser.add_argument("--thresholds", type=float, nargs="+", help="default: 0.5 0.6 on the demo, 0.1 at random")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kv", nargs="+", choices=("recompute", "propagate"), default=["recompute"])
    add_exits_argument(parser)
    parser.add_argument("--old-calls", action="store_true", help="the full model without ragged calls too")
    parser.add_argument("--lengths", choices=("captions", "uniform"), default="captions")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lengths = (24, 24) if args.lengths == "captions" else (4, 24)
    ee, name, requests, demo = model_and_requests(args.requests, lengths, 7, (4, 24), args.exits)
    eos, thresholds = (None, args.thresholds or [0.5, 0.6]) if demo else ([], args.thresholds or [0.1])
    asked = "24 tokens asked" if lengths == (24, 24) else "4-24 tokens asked"
    print(f"{name}: {args.requests} requests ({asked}), median of {args.repeats} turns, tokens per CPU second")
    for concurrency in args.concurrency:
        runs = {(1.0, "recompute"): [], **{(t, kv): [] for t in thresholds for kv in args.kv}}
        depth = {}  # mean exit layer per run (the same tokens every turn)
        if args.old_calls:
            runs[1.0, "old calls"] = []
        for turn in range(args.repeats + 1):  # the first turn warms up
            for (threshold, kv), speeds in runs.items():
                old = kv == "old calls"
                kv_mode = "recompute" if old else kv
                run = run_continuous(
                    ee, requests, threshold, concurrency, eos, ragged=not old, concurrency=concurrency, kv=kv_mode
                )
                depth[threshold, kv] = run.mean_exit_layer
                if turn:
                    speeds.append(run.tokens_per_busy_second)
        full = statistics.median(runs[1.0, "recompute"])
        ratios = "  ".join(
            f"@{t}{'' if kv == 'recompute' else ' ' + kv}: {statistics.median(runs[t, kv]) / full:.2f}x"
            f" (mean exit layer {depth[t, kv]:.2f})"
            for t, kv in list(runs)[1:]
            if kv != "old calls"
        )
        print(f"  {concurrency:2d} in flight: full {full:6.1f}  exits / full {ratios}")
        if args.old_calls:
            old = runs[1.0, "old calls"]
            turns = ", ".join(f"{a / b:.2f}x" for a, b in zip(runs[1.0, "recompute"], old))
            print(f"      full / full with old calls {full / statistics.median(old):.2f}x (per turn: {turns})")


if __name__ == "__main__":
    main()
