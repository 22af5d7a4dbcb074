"""Engine speed against Hugging Face and against the hardware, measured side by side in one run.

1. No exit taken: Hugging Face `generate` (eager, and with its static cache), freevlm's full model and threshold
   1.0 on the default engine and on the general engine; ms per new token end to end. Goal: threshold 1.0 <= HF.
2. Forced exit schedules at batch 1: measured decode speedup over the full model divided by the ideal one
   (parameters touched per token, full over early exit: layers, exit layers, every vocabulary head, catch-up
   included). Goal >= 0.9 for both KV strategies. The paper's analytic speedup is printed beside it.
3. Batches (`--batch-sizes`): the default batch policy, per-row compaction and whole-batch exits against the
   full model at the same batch size; half the tokens leave at the middle layer. Goal: the default >= 1.0x.
4. The floor: the LM's weights read once at the device's measured copy bandwidth.
5. What a window of slots costs: one LM layer's matmuls over 1, 2, 4, 8 slots, relative to 1. Near 1.0 a layer costs
   reading its weights (a GPU at these sizes) and catch-up windows ride free, as the ideal assumes; near the slot
   count the device is compute-bound (a CPU core) and `kv="recompute"` pays every caught-up slot in full.

    python bench/bench_engine.py [--preset opt-350m|opt-2.7b|opt-6.7b|t5-large|flant5-xl|opt-demo|t5-demo|tiny]
                                 [--device cpu|cuda] [--dtype float32|bfloat16] [--tokens 32] [--batch-sizes 8 32]
"""

from __future__ import annotations

import argparse

import torch
from common import (
    PRESETS,
    HalfAtMiddle,
    add_model_args,
    add_timing_args,
    bandwidth_floor_seconds,
    big_blip2,
    inputs,
    interleaved,
    setup_threads,
)

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.decoding.policies import FixedSchedulePolicy


class ForcedWithChecks(FixedSchedulePolicy):
    """A forced schedule that still pays for a confidence check (vocabulary head) at every exit it passes."""

    def live_exits(self, exit_layers):
        return list(exit_layers)

    def needs_logits(self, layer):
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--tokens", type=int, default=32)
    add_timing_args(parser, repeats=3)
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[], help="section 3 (e.g. 8 32)")
    parser.add_argument("--skip-hf", action="store_true", help="leave out Hugging Face's generate (section 1)")
    args = parser.parse_args()
    setup_threads()
    family, n = PRESETS[args.preset][0], PRESETS[args.preset][1]
    model = big_blip2(args.preset, getattr(torch, args.dtype), args.device)
    exits = [n // 4, n // 2, 3 * n // 4]
    ee = EarlyExitVLM.from_backbone(model, ExitConfig(exits))
    pv, ids, mask = inputs(model)
    tokens = args.tokens
    layer_params = sum(p.numel() for p in ee.backbone.layers[0].parameters())
    print(
        f"{type(model).__name__} with {args.preset} ({family} {n} layers), exits at {exits}, "
        f"{args.device} {args.dtype}, {tokens} new tokens, {torch.get_num_threads()} threads; one vocabulary head = "
        f"{ee.backbone.head_parameters() / layer_params:.2f} LM layers of parameters\n"
    )

    def ours(batch_inputs=(pv, ids, mask), **kw):
        return ee.generate(*batch_inputs, max_new_tokens=tokens, eos_token_id=[], **kw)

    def ms(seconds: float, count: int = tokens) -> str:
        return f"{1000 * seconds / count:8.2f} ms/token"

    # --- 1. no exit taken ---------------------------------------------------------------------------------------
    runs = {}
    if not args.skip_hf:

        def hf(**kw):
            return model.generate(
                pixel_values=pv, input_ids=ids, attention_mask=mask, max_new_tokens=tokens, do_sample=False, **kw
            )

        with torch.no_grad():
            reference = hf()
            assert torch.equal(reference, ours(threshold=1.0).sequences), "threshold 1.0 must equal HF generate"
            runs["HF generate, eager"] = hf
            try:
                hf(cache_implementation="static")
                runs["HF generate, static cache"] = lambda: hf(cache_implementation="static")
            except Exception as err:
                print(f"   (HF static cache not available here: {type(err).__name__}: {err})")
    runs["freevlm full"] = lambda: ours(mode="full")
    runs["freevlm threshold 1.0"] = lambda: ours(threshold=1.0)
    runs["freevlm threshold 1.0, general engine"] = lambda: ours(threshold=1.0, static=False)
    times = interleaved(runs, args.repeats, args.stat)
    print(f"1. no exit taken (end to end, {args.stat})")
    for name, seconds in times.items():
        print(f"   {name:40s} {ms(seconds)}")
    if "HF generate, eager" in times:
        print(
            f"   time ratio freevlm(threshold 1.0) / HF eager = "
            f"{times['freevlm threshold 1.0'] / times['HF generate, eager']:.3f}  (goal <= 1.0)\n"
        )

    # --- 2. forced schedules -------------------------------------------------------------------------------------
    half = n // 2
    mixed = [exits[0], half, n, exits[2], exits[0], n, half, exits[0]]
    schedules = {
        f"all at {half}": FixedSchedulePolicy(half),
        f"mixed {mixed}": FixedSchedulePolicy(mixed),
        "mixed + checks at every exit": ForcedWithChecks(mixed),
    }
    runs = {"full": lambda: ours(mode="full").stats.seconds_decode}
    stats = {}
    for name, policy in schedules.items():
        for kv in ("recompute", "propagate"):
            stats[(name, kv)] = ours(policy=policy, kv=kv).stats
            runs[(name, kv)] = lambda policy=policy, kv=kv: ours(policy=policy, kv=kv).stats.seconds_decode
    times = interleaved(runs, args.repeats, args.stat)
    decoded = tokens - 1  # the first token comes with the prefill
    print(f"2. forced exit schedules, batch 1 (decode only, {args.stat}); full model {ms(times['full'], decoded)}")
    print(
        f"   {'schedule':34s} {'kv':10s} {'ms/token':>9s} {'measured':>9s} {'ideal':>7s} {'ratio':>7s} "
        f"{'analytic':>9s}  histogram"
    )
    for key, s in stats.items():
        measured = times["full"] / times[key]
        print(
            f"   {key[0]:34s} {key[1]:10s} {1000 * times[key] / decoded:9.2f} {measured:8.2f}x "
            f"{s.ideal_speedup:6.2f}x {measured / s.ideal_speedup:7.2f} {s.analytic_speedup:8.2f}x  "
            f"{s.exit_histogram}"
        )
    print("   ratio = measured / ideal (goal >= 0.9)\n")

    # --- 3. batches ---------------------------------------------------------------------------------------------
    for batch in args.batch_sizes:
        batch_inputs = inputs(model, batch=batch)
        variants = {
            "default, half the rows leave": lambda: {"policy": HalfAtMiddle(half)},
            "per-row compaction, half leave": lambda: {"policy": HalfAtMiddle(half), "batch_policy": "per_row"},
            "default, whole batch alternates": lambda: {"policy": FixedSchedulePolicy([half, n])},
        }
        runs = {"full": lambda b=batch_inputs: ours(b, mode="full").stats.seconds_decode}
        for name, make in variants.items():
            runs[name] = lambda b=batch_inputs, make=make: ours(b, **make()).stats.seconds_decode
        times = interleaved(runs, args.repeats, args.stat)
        print(f"3. batch {batch} (decode only, {args.stat}): full model {ms(times['full'], decoded)} per step")
        for name in variants:
            print(f"   {name:34s} {ms(times[name], decoded)} per step  {times['full'] / times[name]:5.2f}x of full")
        print("   goal: the default >= 1.0x of the full model\n")

    # --- 4. the floor -------------------------------------------------------------------------------------------
    floor, bandwidth = bandwidth_floor_seconds(model, args.device)
    print(
        f"4. floor: the LM's weights read once at the measured {bandwidth / 1e9:.0f} GB/s = {1000 * floor:.2f} ms/token"
    )

    # --- 5. what a window costs -------------------------------------------------------------------------------------
    linears = [m for m in ee.backbone.layers[0].modules() if isinstance(m, torch.nn.Linear)]
    runs = {}
    for slots in (1, 2, 4, 8):
        xs = [torch.randn(1, slots, m.in_features, device=args.device, dtype=model.dtype) for m in linears]
        runs[slots] = lambda xs=xs: [m(x) for m, x in zip(linears, xs) for _ in range(10)]
    with torch.no_grad():
        times = interleaved(runs, args.repeats, args.stat)
    print(
        "5. one LM layer's matmuls over a window of slots, time relative to 1 slot: "
        + ", ".join(f"{slots} -> {times[slots] / times[1]:.2f}" for slots in runs)
    )


if __name__ == "__main__":
    main()
