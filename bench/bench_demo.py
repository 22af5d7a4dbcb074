"""The engine at the demo's size, batch 1: measured decode speedup against the ideal and the analytic one.

The model is built like `freevlm demo`'s (`freevlm.demo.backbone.demo_config`: a 12-layer x 256-wide OPT, a
word-level vocabulary of ~100, 16 image tokens; random weights, the demo's exits at 1, 3, 6). Schedules are forced
with `FixedSchedulePolicy`; every run decodes the same 24 new tokens (EOS off) after the demo's caption prompt, and all
runs, the full model among them, are timed round-robin in one process so machine drift hits all alike.

Per schedule and KV mode it prints the decode speedup over the full model (seconds per step), the ideal speedup
(parameters touched, full over early exit: exit layers, every head and catch-up included), the paper's analytic
one (an exit counts as one layer, nothing else), and measured / ideal and measured / analytic.

- "all at 1": every token leaves at the first exit (only that exit is live).
- "mixed": a schedule with the demo's typical caption histogram (most tokens at 1, almost a third at 12).
- "mixed + checks": the same, paying at every exit a token passes what the demo's confidence policy pays there
  (exit layer, head, the max-probability decision): what `freevlm demo` really runs.

`--before DIR` times another copy of the package in the same run, interleaved with this one (DIR holds its
`freevlm/`, e.g. `git archive HEAD~1 freevlm | tar -x -C DIR`), and prints both versions' ratios side by side.

    OMP_NUM_THREADS=1 python bench/bench_demo.py [--repeats 15] [--stat min|median] [--tokens 24] [--before DIR]
                                                 [--threads 1] (the demo times with the threads it chose: 1 or 2)
                                                 [--profile "mixed + checks/recompute"]
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import os
import pstats
import shutil
import sys
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from common import add_timing_args, interleaved
from transformers import Blip2ForConditionalGeneration

from freevlm.backbones import load_backbone
from freevlm.demo.backbone import demo_config

EXITS = [1, 3, 6]  # freevlm demo's FREE exits
# the demo's caption tokens at its chosen threshold (a newcomer's run, test split: 60% at 1, 5% at 3, 5% at 6, 30%
# at 12), in the order a caption has them: 14, 1, 1 and 8 of 24
MIXED = [1, 1, 12, 1, 1, 3, 12, 1, 1, 12, 1, 1, 12, 1, 6, 12, 1, 1, 12, 1, 1, 12, 1, 12]


def forced_with_checks(policies, schedule: list[int]):
    """A forced schedule (`policies`: a freevlm package's policies module) that pays, at every exit a token
    passes, what the confidence policy pays there: the exit layer, the head and the max-probability decision (its
    result is ignored)."""

    class ForcedWithChecks(policies.FixedSchedulePolicy):
        def live_exits(self, exit_layers):
            return list(exit_layers)

        def needs_logits(self, layer):
            return True

        def decide(self, layer, logits, step, rows, hidden=None):
            confident = policies.max_probability(logits) >= 2.0  # never true: the cost, not the answer
            return super().decide(layer, logits, step, rows, hidden) | confident

    return ForcedWithChecks(schedule)


def demo_model() -> Blip2ForConditionalGeneration:
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(demo_config("opt")).eval()
    with torch.no_grad():
        model.query_tokens.normal_(std=0.02)
    for cfg in (model.generation_config, model.language_model.generation_config):
        cfg.eos_token_id = None
    return model


def load_before(path: str):
    """The `freevlm` package under `path`, imported as `freevlm_before` (its imports are relative)."""
    root = tempfile.mkdtemp(prefix="freevlm_before_")
    shutil.copytree(os.path.join(path, "freevlm"), os.path.join(root, "freevlm_before"))
    sys.path.insert(0, root)
    return importlib.import_module("freevlm_before")


def version_runs(package, model, tokens: int, inputs) -> tuple[dict, dict]:
    """Timed runs (decode seconds) of the full model and of every schedule and KV mode, and their stats."""
    policies = importlib.import_module(package.__name__ + ".decoding.policies")
    ee = package.EarlyExitVLM.from_backbone(model, package.ExitConfig(EXITS))

    def ours(**kw):
        return ee.generate(*inputs, max_new_tokens=tokens, eos_token_id=[], **kw)

    schedules = {
        "all at 1": policies.FixedSchedulePolicy(1),
        "mixed": policies.FixedSchedulePolicy(MIXED),
        "mixed + checks": forced_with_checks(policies, MIXED),
    }
    runs, stats = {"full": lambda: ours(mode="full").stats.seconds_decode}, {}
    for name, policy in schedules.items():
        for kv in ("recompute", "propagate"):
            key = f"{name}/{kv}"
            stats[key] = ours(policy=policy, kv=kv).stats
            runs[key] = lambda policy=policy, kv=kv: ours(policy=policy, kv=kv).stats.seconds_decode
    return runs, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=24)
    add_timing_args(parser, repeats=15)
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads")
    parser.add_argument("--before", metavar="DIR", help="also time the freevlm package in DIR/freevlm, interleaved")
    parser.add_argument(
        "--profile",
        metavar="SCHEDULE/KV",
        help="cProfile 20 decodes of one run instead, e.g. 'mixed + checks/recompute' or 'full'",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = demo_model()
    cfg = model.config
    image = torch.randn(1, 3, cfg.vision_config.image_size, cfg.vision_config.image_size)
    # the demo's caption prompt: BOS, "a photo of" (ids of three words), after the 16 image tokens
    text = [cfg.text_config.bos_token_id, 20, 60, 70]
    ids = torch.tensor([[cfg.image_token_index] * cfg.num_query_tokens + text])
    inputs = (image, ids, torch.ones_like(ids))
    versions = {"now": importlib.import_module("freevlm")}
    if args.before:
        versions = {"before": load_before(args.before), **versions}
    runs, stats = {}, {}
    for version, package in versions.items():
        version_runs_, version_stats = version_runs(package, model, args.tokens, inputs)
        runs.update({(version, key): fn for key, fn in version_runs_.items()})
        stats.update({(version, key): s for key, s in version_stats.items()})

    if args.profile:
        fn = runs[("now", args.profile)]
        fn()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(20):
            fn()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return

    with torch.no_grad():
        times = interleaved(runs, args.repeats, args.stat)
    decoded = args.tokens - 1
    backbone = load_backbone(model)
    layer_params = sum(p.numel() for p in backbone.layers[0].parameters())
    print(
        f"demo-size BLIP-2 (OPT {backbone.num_layers} layers x {backbone.hidden_size}, vocabulary "
        f"{cfg.text_config.vocab_size}), exits at {EXITS}, {args.tokens} new tokens, batch 1, "
        f"{torch.get_num_threads()} thread(s), {args.stat} of {args.repeats} interleaved runs; a head = "
        f"{backbone.head_parameters() / layer_params:.2f} layers"
    )
    for version in versions:
        print(f"full model ({version}): {1000 * times[(version, 'full')] / decoded:.2f} ms/token (decode)")
    print(
        f"{'':8s} {'schedule':16s} {'kv':10s} {'ms/token':>8s} {'measured':>9s} {'ideal':>7s} {'analytic':>8s} "
        f"{'/ideal':>7s} {'/analytic':>9s}  histogram"
    )
    for (version, key), s in sorted(stats.items(), key=lambda item: (item[0][1], item[0][0] == "now")):
        name, kv = key.split("/")
        measured = times[(version, "full")] / times[(version, key)]
        print(
            f"{version:8s} {name:16s} {kv:10s} {1000 * times[(version, key)] / decoded:8.2f} {measured:8.2f}x "
            f"{s.ideal_speedup:6.2f}x {s.analytic_speedup:7.2f}x {measured / s.ideal_speedup:7.2f} "
            f"{measured / s.analytic_speedup:9.2f}  {s.exit_histogram}"
        )


if __name__ == "__main__":
    main()
