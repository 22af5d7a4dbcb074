"""Engine overhead and real speedup at batch 1, measured side by side in one run.

1. threshold 1.0 (no exit taken) vs Hugging Face `generate` on the same model: time ratio (goal: not slower).
2. forced exit schedules on an OPT-sized LM (default OPT-350m, 24 x 1024) with OPT's vocabulary (random weights):
   measured decode speedup over the full model, divided by the ideal speedup (parameters touched per token,
   full model over early exit: layers, exit layers, every vocabulary head evaluated, catch-up included).
   Goal >= 0.9, for both KV strategies. The paper's analytic speedup is printed beside it.

    python bench/bench_engine.py [--preset opt-350m|opt-1.3b|opt-2.7b] [--tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse

import torch
from common import PRESETS, big_blip2, inputs, interleaved, setup_threads

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
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="opt-350m", help="OPT size (layers x hidden)")
    args = parser.parse_args()
    setup_threads()
    n, hidden, heads = PRESETS[args.preset]
    model = big_blip2(num_layers=n, hidden_size=hidden, num_heads=heads)
    exits = [n // 4, n // 2, 3 * n // 4]
    ee = EarlyExitVLM.from_backbone(model, ExitConfig(exits))
    pv, ids, mask = inputs(model)
    tokens = args.tokens
    layer_params = sum(p.numel() for p in ee.backbone.layers[0].parameters())
    head_params = ee.backbone.head_parameters()
    print(
        f"BLIP-2 with OPT {n} x {hidden} ({args.preset}), vocabulary {model.config.text_config.vocab_size}, "
        f"exits at {exits}, batch 1, {tokens} new tokens, {torch.get_num_threads()} threads"
    )
    print(f"one vocabulary head = {head_params / layer_params:.2f} LM layers of parameters\n")

    def ours(**kw):
        return ee.generate(pv, ids, mask, max_new_tokens=tokens, eos_token_id=[], **kw)

    # --- 1. no exit taken vs Hugging Face generate -------------------------------------------------------------
    with torch.no_grad():
        hf = lambda: model.generate(
            pixel_values=pv,
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=tokens,
            do_sample=False,
        )
        assert torch.equal(hf(), ours(threshold=1.0).sequences), "threshold 1.0 must equal HF generate"
        times = interleaved(
            {"hf": hf, "threshold_1": lambda: ours(threshold=1.0), "full": lambda: ours(mode="full")},
            args.repeats,
        )
    print("1. no exit taken (end-to-end seconds, median)")
    print(
        f"   Hugging Face generate {times['hf']:.3f}s | freevlm threshold 1.0 {times['threshold_1']:.3f}s "
        f"| freevlm full {times['full']:.3f}s"
    )
    print(f"   time ratio freevlm(threshold 1.0) / HF = {times['threshold_1'] / times['hf']:.3f}  (goal <= 1.0)\n")

    # --- 2. forced schedules: measured decode speedup vs ideal --------------------------------------------------
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
            key = (name, kv)
            stats[key] = ours(policy=policy, kv=kv).stats
            runs[key] = lambda policy=policy, kv=kv: ours(policy=policy, kv=kv).stats.seconds_decode
    times = interleaved(runs, args.repeats)
    print("2. forced exit schedules (decode-only seconds, median; speedups against the full model in this run)")
    print(f"   {'schedule':34s} {'kv':10s} {'measured':>9s} {'ideal':>7s} {'ratio':>7s} {'analytic':>9s}  histogram")
    for key, s in stats.items():
        measured = times["full"] / times[key]
        print(
            f"   {key[0]:34s} {key[1]:10s} {measured:8.2f}x {s.ideal_speedup:6.2f}x {measured / s.ideal_speedup:7.2f} "
            f"{s.analytic_speedup:8.2f}x  {s.exit_histogram}"
        )
    print("   ratio = measured / ideal (goal >= 0.9)")


if __name__ == "__main__":
    main()
