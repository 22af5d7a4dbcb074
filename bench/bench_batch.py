"""Batch throughput: early exit vs the full model at batch 8, measured side by side in one run.

Schedule: half the tokens leave at the middle layer, the rest go to the final layer. Two versions:
  - per row: each row's token leaves with probability 1/2, independently (rows compact at the middle layer);
  - per step: on alternate steps every row leaves (the batch moves together).
Both KV strategies. Goal: >= 1.3x tokens/s over the full model.

    python bench/bench_batch.py [--batch 8] [--tokens 16] [--layers 24] [--hidden 2048]
"""

from __future__ import annotations

import argparse

import torch
from common import big_blip2, inputs, interleaved, setup_threads

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.decoding.policies import ExitPolicy, FixedSchedulePolicy


class HalfAtMiddle(ExitPolicy):
    """Each row's token leaves at `layer` with probability 1/2 (seeded per call)."""

    def __init__(self, layer: int, seed: int = 0):
        self.layer, self.gen = layer, torch.Generator().manual_seed(seed)

    def live_exits(self, exit_layers):
        return [self.layer]

    def decide(self, layer, logits, step, rows, hidden=None):
        return (torch.rand(len(rows), generator=self.gen) < 0.5).to(rows.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=2048)
    args = parser.parse_args()
    setup_threads()
    n, mid = args.layers, args.layers // 2
    model = big_blip2(num_layers=n, hidden_size=args.hidden)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([mid]))
    pv, ids, mask = inputs(model, batch=args.batch)
    layer_params = sum(p.numel() for p in ee.backbone.layers[0].parameters())
    print(f"BLIP-2 with OPT {n} x {args.hidden} (vocabulary head = {ee.backbone.head_parameters() / layer_params:.2f} "
          f"layers), exit at {mid}, batch {args.batch}, {args.tokens} new tokens, {torch.get_num_threads()} threads")

    def run(**kw):
        out = ee.generate(pv, ids, mask, max_new_tokens=args.tokens, eos_token_id=[], **kw)
        return out

    policies = {"per row": lambda: HalfAtMiddle(mid), "per step": lambda: FixedSchedulePolicy([mid, n])}
    runs = {"full": lambda: run(mode="full").stats.seconds_decode}
    hist = {}
    for name, make in policies.items():
        for kv in ("recompute", "propagate"):
            hist[(name, kv)] = run(policy=make(), kv=kv).stats
            runs[(name, kv)] = lambda make=make, kv=kv: run(policy=make(), kv=kv).stats.seconds_decode
    times = interleaved(runs, args.repeats)
    decoded = args.batch * (args.tokens - 1)  # decode-only: the first token comes with the prefill
    full_tps = decoded / times["full"]
    print(f"full model: {full_tps:.1f} tokens/s (decode only, median of {args.repeats})")
    print(f"{'schedule':10s} {'kv':10s} {'tokens/s':>9s} {'speedup':>8s} {'ideal':>7s}  histogram")
    for key, s in hist.items():
        tps = decoded / times[key]
        print(f"{key[0]:10s} {key[1]:10s} {tps:9.1f} {tps / full_tps:7.2f}x {s.ideal_speedup:6.2f}x  {s.exit_histogram}")
    print("speedup = tokens/s over the full model's in this run (goal >= 1.3x); ideal = parameters touched per step")


if __name__ == "__main__":
    main()
