"""A threshold sweep that shares its work, against one threshold's eval, on the demo's trained model.

Times, interleaved in one process on the same records: `evaluate` at one threshold as `freevlm eval` runs it (early
exit and the full model, alternated), the shared `sweep` (every threshold, and with --per-layer every forced exit,
decoded together per batch, image and prompt encoded once; the chosen threshold timed again alone), and with
--unshared the sweep as it ran before (each threshold its own dev and test evals). Prints each one's seconds
and the ratio to one eval, beside the issue's goal (a 7-threshold sweep <= 3x one eval).

The model is `freevlm demo`'s, cached where the demo left it (FREEVLM_CACHE, default ~/.cache/freevlm):

    OMP_NUM_THREADS=1 FREEVLM_CACHE=/work/demo_ref/cache python bench/bench_sweep.py [--task vqa|captions|visdial]
                      [--records 60] [--repeats 2] [--per-layer] [--unshared]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from freevlm.data.records import VisDialRecord
from freevlm.data.shapes import IMAGE_NAME
from freevlm.data.specs import DatasetSpec, read_dataset
from freevlm.eval.evaluate import evaluate
from freevlm.eval.options import EvalOptions
from freevlm.eval.sweep import DEV_FRACTION, choose_threshold, split_dev, sweep
from freevlm.loading import load_exits, load_vlm

THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # 7: the paper's grid and one lower


def demo_model(cache: Path):
    backbone = next(p for p in sorted(cache.glob("backbone-opt-*")) if "-exits-" not in p.name)
    exits = next(cache.glob(f"{backbone.name}-exits-free_ce-*")) / "exits"
    bundle = load_vlm(backbone)
    return load_exits(bundle.model, exits), bundle


def demo_records(cache: Path, task: str, n: int) -> list:
    if task == "visdial":  # the demo has no dialogs: each test question a one-round dialog, every answer an option
        questions = demo_records(cache, "vqa", n)
        options = sorted({r.answers[0] for r in questions})
        return [
            VisDialRecord(r.image, i, 1, "shapes", [], r.question, options, options.index(r.answers[0]))
            for i, r in enumerate(questions)
        ]
    shapes = next(cache.glob("data-*")) / "shapes"
    if task == "captions":
        spec = DatasetSpec("coco", [str(shapes / "captions_test.json")], str(shapes), limit=n)
    else:
        files = [str(shapes / "questions_test.json"), str(shapes / "annotations_test.json")]
        spec = DatasetSpec("vqav2", files, str(shapes), limit=n, extra={"image_name": IMAGE_NAME})
    return read_dataset(spec)


def unshared_sweep(ee, bundle, task, records, thresholds, per_layer, options: EvalOptions):
    """The sweep as it ran before it shared its work: each threshold's own dev and test evals."""
    dev_records, test_records = split_dev(records, DEV_FRACTION)
    untimed = replace(options, compare_full=False)
    dev = [evaluate(task, ee, bundle, dev_records, t, options=untimed) for t in thresholds]
    for t in thresholds:
        evaluate(task, ee, bundle, test_records, t, options=options)
    for layer in (ee.exit_layers + [ee.backbone.num_layers]) if per_layer else []:
        evaluate(task, ee, bundle, test_records, layer=layer, options=untimed)
    return choose_threshold(dev)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["vqa", "captions", "visdial"], default="vqa")
    p.add_argument("--records", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--per-layer", action="store_true", help="the sweep also traces every forced exit")
    p.add_argument("--unshared", action="store_true", help="also time the sweep without sharing (slow)")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    cache = Path(os.environ.get("FREEVLM_CACHE", Path.home() / ".cache" / "freevlm"))
    ee, bundle = demo_model(cache)
    records = demo_records(cache, args.task, args.records)
    only = ["CIDEr"] if args.task == "captions" else None  # METEOR and SPICE start a JVM: scoring, not decoding
    options = EvalOptions(batch_size=args.batch_size, only=only)  # each task's default decoding
    runs = {
        "eval (1 threshold, vs full)": lambda: evaluate(args.task, ee, bundle, records, options=options),
        f"shared sweep ({len(THRESHOLDS)} thresholds)": lambda: sweep(
            ee, bundle, args.task, records, thresholds=THRESHOLDS, per_layer=args.per_layer, options=options
        ),
    }
    if args.unshared:
        runs["unshared sweep (before)"] = lambda: unshared_sweep(
            ee, bundle, args.task, records, THRESHOLDS, args.per_layer, options
        )
    seconds = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    base = min(seconds["eval (1 threshold, vs full)"])
    print(f"{args.task}, {len(records)} records, batch {args.batch_size}, per-layer curve: {args.per_layer}")
    for name, times in seconds.items():
        print(f"  {name:34s} {min(times):7.2f} s   {min(times) / base:5.2f}x one eval")
    shared = min(seconds[f"shared sweep ({len(THRESHOLDS)} thresholds)"]) / base
    verdict = "met" if shared <= 3 else "NOT met"
    print(f"goal: a {len(THRESHOLDS)}-threshold sweep <= 3x one eval: {shared:.2f}x, {verdict}")


if __name__ == "__main__":
    main()
