"""Speculative mode vs the full model: speedup and acceptance rate as a function of the exit threshold.

Measured side by side in one run (interleaved), greedy, batch 1; every run's output is checked identical to the
full model's. Without `--backbone`, a random-weight BLIP-2 with an OPT-350m-sized LM (acceptance there says little
about trained exits); with `--backbone DIR --exits DIR`, a trained one (e.g. the demo's cache) on its own images.

    python bench/bench_speculative.py [--backbone DIR --exits DIR] [--tokens 24]
"""

from __future__ import annotations

import argparse

import torch
from common import big_blip2, inputs, interleaved, setup_threads

from freevlm import EarlyExitVLM, ExitConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", help="folder of a trained BLIP-2 (save_pretrained / the demo's cache)")
    parser.add_argument("--exits", help="folder of its trained exits")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95, 1.0])
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--max-draft", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    setup_threads()
    if args.backbone:
        from freevlm.loading import load_vlm
        from freevlm.tiny import tiny_inputs

        bundle = load_vlm(args.backbone)
        ee = EarlyExitVLM.from_pretrained(bundle.model, args.exits)
        pv, ids, mask = tiny_inputs(bundle.model, batch=1, prompt_len=1)
        eos = None
        name = args.backbone
    else:
        model = big_blip2()
        ee = EarlyExitVLM.from_backbone(model, ExitConfig([6, 12, 18]))
        pv, ids, mask = inputs(model)
        eos = []
        name = "random BLIP-2, OPT 24 x 1024"
    print(f"{name}: exits {ee.exit_layers}, batch 1, {args.tokens} new tokens, max draft {args.max_draft}")

    def run(**kw):
        return ee.generate(pv, ids, mask, max_new_tokens=args.tokens, eos_token_id=eos, **kw)

    full = run(mode="full")
    runs = {"full": lambda: run(mode="full").stats.seconds_decode}
    stats = {}
    for t in args.thresholds:
        out = run(mode="speculative", threshold=t, max_draft=args.max_draft)
        assert torch.equal(out.sequences, full.sequences), f"speculative output differs at threshold {t}"
        stats[t] = out.stats
        runs[t] = lambda t=t: run(mode="speculative", threshold=t, max_draft=args.max_draft).stats.seconds_decode
    times = interleaved(runs, args.repeats)
    print(
        f"{'threshold':>9s} {'speedup':>8s} {'accept':>7s} {'drafted':>8s} {'accepted':>9s} {'verify':>7s}  (identical "
        "output: checked)"
    )
    for t, s in stats.items():
        spec = s.speculative
        print(
            f"{t:9.2f} {times['full'] / times[t]:7.2f}x {spec['acceptance_rate']:7.2f} {spec['drafted']:8d} "
            f"{spec['accepted_drafts']:9d} {spec['verifications']:7d}"
        )
    print("speedup: decode-only time of the full model over speculative mode, medians, same run")


if __name__ == "__main__":
    main()
