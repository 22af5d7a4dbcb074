"""The scheduler's cost per token against the static engine's, on the same requests, side by side in one run.

    cd bench && FREEVLM_CACHE=<the demo's cache> PYTHONPATH=.. python bench_row_step.py [--rows 1 16] [--tokens 40]

`rows` requests (the demo's first test images with its caption prompt, EOS off, `--tokens` new tokens each, the full
model) are decoded two ways: as one `EarlyExitVLM.generate` batch (the static engine, rows moving together) and as
requests submitted at once to a `Scheduler` with `--rows` rows, driven to the end. Both must give the same tokens.
Prints CPU milliseconds per token (one torch thread) of the whole run (images, prompts, decode) and of decode alone
(for both alike: a run of `--tokens` minus a run of one token), the median of `--repeats` turns that alternate the
two after a warm-up, and their ratios (static / scheduler: 1.0 means the scheduler is as cheap). The model is the
demo's when its cache is there, else a random one of its size.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_serving import model_and_requests

from freevlm.serving import Scheduler


def static_run(ee, requests, tokens: int) -> tuple[list[list[int]], float]:
    """Tokens per row and CPU seconds of one `generate` batch of `tokens` new tokens."""
    pv = torch.cat([r[1] for r in requests])
    ids = torch.cat([r[2] for r in requests])
    start = time.process_time()
    out = ee.generate(pv, ids, max_new_tokens=tokens, threshold=1.0, mode="full", eos_token_id=[])
    return out.sequences[:, -tokens:].tolist(), time.process_time() - start


def scheduler_run(ee, requests, tokens: int) -> tuple[list[list[int]], float]:
    """Tokens per request and CPU seconds of the requests submitted at once and stepped to the end."""
    scheduler = Scheduler(ee, max_batch=len(requests), max_len=requests[0][2].shape[1] + 64 + tokens)
    start = time.process_time()
    handles = [
        scheduler.submit(pv, ids, max_new_tokens=tokens, threshold=1.0, mode="full", eos_token_id=[])
        for _, pv, ids, _ in requests
    ]
    scheduler.run_until_idle()
    return [h.result().tokens for h in handles], time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ee, name, workload, demo = model_and_requests(max(args.rows), (args.tokens, args.tokens), seed=0)
    if not demo:  # one prompt length, no padding: each cut to the shortest (the image tokens come first)
        shortest = min(ids.shape[1] for _, _, ids, _ in workload)
        workload = [(t, pv, ids[:, :shortest], n) for t, pv, ids, n in workload]
    print(f"{name}: {args.tokens} new tokens per request, full model, EOS off, 1 thread, median of {args.repeats}")
    print("CPU ms per token (whole run: images, prompts, decode | decode alone); static / scheduler")
    for rows in args.rows:
        requests = workload[:rows]
        costs = {"static": [], "scheduler": []}  # per turn: (whole, decode) CPU seconds per token
        for turn in range(args.repeats + 1):  # the first turn warms up
            for label, run in (("static", static_run), ("scheduler", scheduler_run)):
                _, one = run(ee, requests, 1)
                made, whole = run(ee, requests, args.tokens)
                if label == "static":
                    expected = made
                elif made != expected:
                    raise SystemExit(f"the scheduler's tokens differ from the static engine's at {rows} rows")
                if turn:  # decode: every token but the first (a one-token run subtracted), alike for both
                    costs[label].append((whole / (rows * args.tokens), (whole - one) / (rows * (args.tokens - 1))))
        (a, b), (c, d) = ([statistics.median(t[i] for t in runs) * 1000 for i in (0, 1)] for runs in costs.values())
        print(
            f"  {rows:2d} rows: static {a:5.2f} | {b:5.2f}  scheduler {c:5.2f} | {d:5.2f}"
            f"  static / scheduler: whole {a / c:.2f}x, decode {b / d:.2f}x"
        )


if __name__ == "__main__":
    main()
