"""`freevlm calibrate`: run the exits over a calibration set at every threshold of a grid, turn each record into a
loss against the full model, and certify thresholds by Learn-then-Test (`freevlm.calibration`).

Losses are measured against the full model, so the safest threshold (the rule never exits early) has risk 0 and
the guarantee reads "early exit costs at most `tolerance` of X relative to the full model":
  consistency: 1 - [early-exit output == full-model output]   (0/1: exact binomial p-values; needs no labels)
  metric:      the per-record drop of the task metric below the full model's, clipped to [0, 1]: VQA accuracy
               (GQA exact match), or per-caption CIDEr (a drop of 1.0, i.e. 100 on the paper's scale, or more
               counts as a whole loss); gains never offset drops elsewhere.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from ..calibration import Calibration, calibrate_threshold, check_unit_interval
from ..data.specs import FORMATS, DatasetSpec, read_dataset
from ..eval.evaluate import CAPTION_PROMPT, VQA_PROMPT, EvalResult, evaluate
from ..methods import METHODS, get_method

LOSSES = ("consistency", "metric")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="certify an exit threshold: early-exit risk <= tolerance with a confidence")
    p.add_argument("--backbone", required=True, help="folder of a BLIP-2 saved with save_pretrained")
    p.add_argument("--exits", help="folder of exits saved by EarlyExitVLM.save_exits (MuE: optional)")
    p.add_argument("--method", choices=sorted(METHODS), default="free", help="early-exit method (its rule and grid)")
    p.add_argument("--exit-layers", type=int, nargs="+", help="MuE without --exits: LM layers to compare states at")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), help="calibration dataset format")
    p.add_argument("--files", required=True, nargs="+", help="annotation file(s) of the calibration set")
    p.add_argument("--images", required=True, help="folder the dataset's image paths are relative to")
    p.add_argument("--split", help="Karpathy split or NoCaps domain")
    p.add_argument("--limit", type=int, help="use only the first N records")
    p.add_argument("--loss", choices=LOSSES, default="consistency",
                   help="consistency: output differs from the full model's (no labels needed); metric: clipped "
                        "per-record drop of VQA accuracy / CIDEr below the full model's")  # fmt: skip
    p.add_argument("--tolerance", type=float, default=0.05, help="the risk (mean loss) to stay under, in (0, 1)")
    p.add_argument("--confidence", type=float, default=0.95, help="probability the guarantee holds, in (0, 1)")
    p.add_argument("--thresholds", type=float, nargs="+", help="grid to certify (default: the --method's grid)")
    p.add_argument("--out", required=True, help="calibration JSON to write")
    p.add_argument("--prompt", help=f"prompt (captions: {CAPTION_PROMPT!r}; VQA: {VQA_PROMPT!r} with {{question}})")
    p.add_argument("--max-new-tokens", type=int, help="default: 30 for captions, 10 for answers")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--kv", choices=("recompute", "propagate"), default="recompute")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run_calibrate)


def never_exits(method: str) -> tuple[float, bool]:
    """(the threshold at which `method`'s rule never leaves early, whether higher thresholds are safer): each
    method's default grid ends at that value."""
    grid = get_method(method).thresholds
    return float(grid[-1]), grid[-1] > grid[0]


def per_caption_cider(references: Sequence[Sequence[str]] | dict, captions: Sequence[str]) -> list[float]:
    """CIDEr of each caption against its references (pycocoevalcap's CIDEr-D, unscaled: 1.0 is 100 on the
    paper's scale). Document frequencies come from the references alone, so a caption's score does not depend on
    the other captions. `references` may be the PTB-tokenized dict an earlier call built (see `_tokenized`)."""
    from pycocoevalcap.cider.cider import Cider

    gts = references if isinstance(references, dict) else _tokenized(references)
    if len(gts) != len(captions):
        raise ValueError(f"{len(captions)} captions but {len(gts)} reference lists")
    res = _tokenized([[c] for c in captions])
    _, scores = Cider().compute_score(gts, res)  # one score per key, in `gts` order
    return [float(s) for s in scores]


def _tokenized(captions: Sequence[Sequence[str]]) -> dict:
    from ..eval.captions import tokenize

    return tokenize(dict(enumerate(captions)))


def _check_metric_labels(task: str, records: Sequence) -> None:
    if task == "vqa" and not all(r.answers for r in records):
        raise ValueError("--loss metric needs an answer for every calibration question")
    if task == "captions" and not all(r.references for r in records):
        raise ValueError("--loss metric needs reference captions for every calibration image")
    if task not in ("vqa", "captions"):
        raise ValueError(f"--loss metric is not defined for {task} (no per-record score); use --loss consistency")


def _metric_per_record(task: str, labels, texts: list[str], vqa_metric: str) -> list[float]:
    """`labels`: the VQA answer lists, or the captions' tokenized references."""
    if task == "vqa":
        from ..eval.vqa import vqa_scores

        return vqa_scores(texts, labels, metric=vqa_metric).per_question
    return per_caption_cider(labels, texts)


def calibrate_exits(
    ee,
    processor,
    task: str,
    records: Sequence,
    tolerance: float,
    confidence: float,
    loss: str = "consistency",
    thresholds: Sequence[float] | None = None,
    method: str = "free",
    vqa_metric: str = "vqa",
    progress=None,
    **eval_kwargs,
) -> tuple[Calibration, dict[float, EvalResult]]:
    """Run `ee` over `records` at each threshold (safest first; the first run also runs the full model, which
    every loss is measured against) and certify thresholds with `calibrate_threshold`."""
    tolerance = check_unit_interval("tolerance", tolerance)
    confidence = check_unit_interval("confidence", confidence)
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}: one of {LOSSES}")
    if not records:
        raise ValueError("the calibration set is empty: no records to run the exits on")
    labels = None
    if loss == "metric":
        _check_metric_labels(task, records)  # before any model runs
        labels = [r.answers for r in records] if task == "vqa" else _tokenized([r.references for r in records])
    safe, higher_is_safer = never_exits(method)
    grid = sorted({float(t) for t in (get_method(method).thresholds if thresholds is None else thresholds)},
                  reverse=higher_is_safer)  # fmt: skip
    say = progress or (lambda msg: None)
    if task == "captions":
        eval_kwargs.setdefault("only", ["CIDEr"])  # the sweep's score only: METEOR starts a JVM per call
    results: dict[float, EvalResult] = {}
    full_texts: list[str] | None = None
    full_metric: list[float] | None = None
    losses: dict[float, list[float]] = {}
    for t in grid:
        result = evaluate(task, ee, processor, records, t, method=method, compare_full=full_texts is None,
                          **eval_kwargs)  # fmt: skip
        texts = [row["prediction"] for row in result.predictions]
        if full_texts is None:
            full_texts = [row["full_prediction"] for row in result.predictions]
            if loss == "metric":
                full_metric = _metric_per_record(task, labels, full_texts, vqa_metric)
        if loss == "consistency":
            losses[t] = [float(a != b) for a, b in zip(texts, full_texts)]
        else:
            early = _metric_per_record(task, labels, texts, vqa_metric)
            losses[t] = [min(1.0, max(0.0, f - e)) for f, e in zip(full_metric, early)]
        results[t] = result
        say(f"threshold {t:g}: {loss} risk {sum(losses[t]) / len(losses[t]):.4f}, "
            f"analytic speedup {result.speed.analytic_speedup:.2f}x")  # fmt: skip
    calibration = calibrate_threshold(losses, tolerance, confidence, higher_is_safer=higher_is_safer, fallback=safe)
    return calibration, results


def calibration_report(calibration: Calibration, results: dict[float, EvalResult], **context) -> dict:
    """The JSON `freevlm calibrate` writes: the certification, each threshold's speed, and what was run."""
    out = dict(context) | calibration.as_dict()
    for row in out["per_threshold"]:
        speed = results[row["threshold"]].speed
        row["analytic_speedup"] = speed.analytic_speedup
        row["mean_layers_per_token"] = speed.mean_layers_per_token
    chosen = results.get(calibration.threshold)
    out["analytic_speedup"] = chosen.speed.analytic_speedup if chosen is not None else 1.0
    return out


def run_calibrate(args: argparse.Namespace) -> int:
    from .evaluate import _load

    check_unit_interval("--tolerance", args.tolerance)  # fail before any weights load
    check_unit_interval("--confidence", args.confidence)
    spec = DatasetSpec(args.format, list(args.files), args.images, args.split, args.limit)
    records = read_dataset(spec)
    if not records:
        raise ValueError(f"the calibration set is empty: {', '.join(args.files)} has no records")
    ee, bundle = _load(args)
    task = spec.task
    kw = dict(batch_size=args.batch_size, kv=args.kv)
    if args.max_new_tokens:
        kw["max_new_tokens"] = args.max_new_tokens
    if args.prompt is not None:
        kw["prompt"] = args.prompt
    calibration, results = calibrate_exits(
        ee, bundle, task, records, args.tolerance, args.confidence, args.loss, args.thresholds, args.method,
        vqa_metric="exact" if args.format == "gqa" else "vqa", progress=print, **kw,
    )  # fmt: skip
    report = calibration_report(calibration, results, method=args.method, rule=get_method(args.method).rule,
                                task=task, format=args.format, files=list(args.files), split=args.split,
                                loss=args.loss, loss_definition=_LOSS_TEXT[args.loss])  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if calibration.certified:
        risk = calibration.risks[calibration.threshold]
        print(f"certified threshold: {calibration.threshold:g} ({args.loss} risk {risk:.4f} on {calibration.n} "
              f"records, analytic speedup {report['analytic_speedup']:.2f}x)")  # fmt: skip
    else:
        print(f"certified threshold: none; use {calibration.threshold:g} (never exit early)")
    print(calibration.guarantee)
    print(f"wrote {out}")
    return 0


_LOSS_TEXT = {
    "consistency": "1 if the early-exit output differs from the full model's, else 0",
    "metric": "per-record drop of the task metric (VQA accuracy, GQA exact match, or CIDEr) below the full "
              "model's, clipped to [0, 1]",
}  # fmt: skip
