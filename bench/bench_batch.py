"""Batch throughput: early exit vs the full model at batch 8, measured side by side in one run.

Schedule: half the tokens leave at the middle layer, the rest go to the final layer. Two versions:
  - per row: each row's token leaves with probability 1/2, independently;
  - per step: on alternate steps every row leaves (the batch moves together).
Batch policies: the default ("auto": rows ride along below `COMPACT_FROM_ROWS`, exits gated while they do not
pay), per-row compaction ("per_row": rows that left are taken out of the deeper layers) and "slowest" (the batch
leaves only if every row does); both KV strategies. Goal: the default >= 1.0x of the full model at every schedule.

"ideal" is the most a schedule allows: parameters touched per step by the full model over those touched by the run
(LM layers any row needs, the exit layer, every vocabulary head, K/V projections; a catch-up rides along with the
next token for free).

`--crossover 8 16 32 64` instead times, per batch size, rows riding along and per-row compaction against the full
model (rows leaving independently, half at the middle layer): where compaction starts to pay on this device, which
is what `COMPACT_FROM_ROWS` in `decoding/engine.py` stands for.

    python bench/bench_batch.py [--preset opt-350m|opt-1.3b|opt-2.7b|tiny] [--batch 8] [--tokens 16] [--repeats 3]
                                [--crossover 8 16 32 64] [--device cpu|cuda] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import argparse

import torch
from common import PRESETS, HalfAtMiddle, add_model_args, add_timing_args, big_blip2, inputs, interleaved, setup_threads

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.decoding import engine
from freevlm.decoding.engine import resolve_batch_policy
from freevlm.decoding.policies import FixedSchedulePolicy

GOAL = 1.0  # the default batch policy must never make a batch slower than the full model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    add_timing_args(parser, repeats=3)
    parser.add_argument(
        "--crossover",
        type=int,
        nargs="*",
        default=[],
        help="only this: batch sizes at which to time riding along against compaction",
    )
    args = parser.parse_args()
    setup_threads()
    n = PRESETS[args.preset][1]
    mid = n // 2
    model = big_blip2(args.preset, getattr(torch, args.dtype), args.device)
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([mid]))
    pv, ids, mask = inputs(model, batch=args.batch)
    layer_params = sum(p.numel() for p in ee.backbone.layers[0].parameters())
    print(
        f"{type(model).__name__} with {args.preset} ({n} layers; vocabulary head = "
        f"{ee.backbone.head_parameters() / layer_params:.2f} layers), exit at {mid}, batch {args.batch}, "
        f"{args.tokens} new tokens, {torch.get_num_threads()} threads"
    )

    if args.crossover:
        crossover(ee, args, mid)
        return

    def run(**kw):
        return ee.generate(pv, ids, mask, max_new_tokens=args.tokens, eos_token_id=[], **kw).stats

    variants = {  # name -> generate arguments (the policy is made fresh per run so every run sees the same exits)
        ("per row", "default", "recompute"): lambda: {"policy": HalfAtMiddle(mid)},
        ("per row", "default", "propagate"): lambda: {"policy": HalfAtMiddle(mid), "kv": "propagate"},
        ("per row", "per_row", "recompute"): lambda: {"policy": HalfAtMiddle(mid), "batch_policy": "per_row"},
        ("per row", "per_row", "propagate"): lambda: {
            "policy": HalfAtMiddle(mid),
            "batch_policy": "per_row",
            "kv": "propagate",
        },
        ("per row", "slowest", "recompute"): lambda: {"policy": HalfAtMiddle(mid), "batch_policy": "slowest"},
        ("per step", "default", "recompute"): lambda: {"policy": FixedSchedulePolicy([mid, n])},
        ("per step", "default", "propagate"): lambda: {"policy": FixedSchedulePolicy([mid, n]), "kv": "propagate"},
        ("per step", "per_row", "recompute"): lambda: {
            "policy": FixedSchedulePolicy([mid, n]),
            "batch_policy": "per_row",
        },
    }
    runs = {"full": lambda: run(mode="full").seconds_decode}
    stats = {}
    for key, make in variants.items():
        stats[key] = run(**make())
        runs[key] = lambda make=make: run(**make()).seconds_decode
    times = interleaved(runs, args.repeats, args.stat)
    decoded = args.batch * (args.tokens - 1)  # decode-only: the first token comes with the prefill
    full_tps = decoded / times["full"]
    print(f"full model: {full_tps:.1f} tokens/s (decode only, {args.stat} of {args.repeats})")
    print(
        f"{'schedule':9s} {'batch policy':13s} {'kv':10s} {'tokens/s':>9s} {'speedup':>8s} {'ideal':>7s} "
        f"{'of ideal':>9s}  histogram"
    )
    for key, s in stats.items():
        speedup = times["full"] / times[key]
        print(
            f"{key[0]:9s} {key[1]:13s} {key[2]:10s} {decoded / times[key]:9.1f} {speedup:7.2f}x "
            f"{s.ideal_speedup:6.2f}x {speedup / s.ideal_speedup:9.2f}  {s.exit_histogram}"
        )
    worst = min((times["full"] / times[k], k) for k in variants if k[1] == "default")
    print(
        f"default policy, worst schedule: {' / '.join(worst[1])} at {worst[0]:.2f}x of the full model (goal >= {GOAL}x)"
    )


def crossover(ee: EarlyExitVLM, args, mid: int) -> None:
    """Rows riding along (gated, as "auto" below `COMPACT_FROM_ROWS`) vs per-row compaction, each against the full
    model, at every batch size in `args.crossover`; rows leave independently, half at `mid` (recompute)."""
    print(
        f"\nwhere compaction pays (rows leave independently, half at {mid}; decode only, {args.stat} of "
        f"{args.repeats}):"
    )
    print(f"{'batch':>5s} {'full ms/step':>13s} {'ride along':>11s} {'compact':>8s}  default (auto)")
    for batch in args.crossover:
        batch_inputs = inputs(ee.backbone.model, batch=batch)

        def run(batch_inputs=batch_inputs, **kw):
            return ee.generate(*batch_inputs, max_new_tokens=args.tokens, eos_token_id=[], **kw).stats.seconds_decode

        def riding_along(batch=batch):  # "auto" as below the compaction size: rows ride along behind the gate
            saved, engine.COMPACT_FROM_ROWS = engine.COMPACT_FROM_ROWS, batch + 1
            try:
                return run(policy=HalfAtMiddle(mid))
            finally:
                engine.COMPACT_FROM_ROWS = saved

        runs = {
            "full": lambda: run(mode="full"),
            "ride_along": riding_along,
            "per_row": lambda: run(policy=HalfAtMiddle(mid), batch_policy="per_row"),
        }
        times = interleaved(runs, args.repeats, args.stat)
        print(
            f"{batch:5d} {1000 * times['full'] / (args.tokens - 1):13.1f} "
            f"{times['full'] / times['ride_along']:10.2f}x {times['full'] / times['per_row']:7.2f}x  "
            f"{resolve_batch_policy('auto', batch)}"
        )


if __name__ == "__main__":
    main()
