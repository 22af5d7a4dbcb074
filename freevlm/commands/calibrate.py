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
import copy
import dataclasses
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

from ..calibration import Calibration, calibrate_threshold, check_unit_interval
from ..data.specs import DatasetSpec, read_dataset
from ..eval.evaluate import EvalResult, evaluate
from ..methods import get_method, trainable_parameters
from .evaluate import dataset_arguments, generation_kwargs, load_model

LOSSES = ("consistency", "metric")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="certify an exit threshold: early-exit risk <= tolerance with a confidence")
    _common(p)
    p.add_argument("--out", required=True, help="calibration JSON to write")
    p.set_defaults(func=run_calibrate)

    p = sub.add_parser("place-exits", help="choose exit layers among trained ones: most speedup at a certified risk")
    _common(p)
    p.add_argument("--candidates", type=int, nargs="+", help="trained exit layers to choose from (default: all)")
    p.add_argument("--budget-exits", type=int, help="at most this many exits")
    p.add_argument("--budget-parameters", type=int, help="at most this many trainable exit parameters")
    p.add_argument("--speedup", choices=SPEEDUPS, default="ideal",
                   help="what to maximise: ideal (parameters touched, counted by the engine), analytic (the "
                        "paper's N / layers per token), wallclock (measured here)")  # fmt: skip
    p.add_argument("--max-placements", type=int, default=64, help="refuse budgets that allow more placements")
    p.add_argument("--out", required=True, help="placement JSON to write")
    p.set_defaults(func=run_place_exits)


def _common(p: argparse.ArgumentParser) -> None:
    dataset_arguments(p)
    p.add_argument("--loss", choices=LOSSES, default="consistency",
                   help="consistency: output differs from the full model's (no labels needed); metric: clipped "
                        "per-record drop of VQA accuracy / CIDEr below the full model's")  # fmt: skip
    p.add_argument("--tolerance", type=float, default=0.05, help="the risk (mean loss) to stay under, in (0, 1)")
    p.add_argument("--confidence", type=float, default=0.95, help="probability the guarantee holds, in (0, 1)")
    p.add_argument("--thresholds", type=float, nargs="+", help="grid to certify (default: the --method's grid)")


def _records(args: argparse.Namespace) -> tuple[DatasetSpec, list]:
    """The calibration records, after checking what can be checked before any weights load."""
    check_unit_interval("--tolerance", args.tolerance)
    check_unit_interval("--confidence", args.confidence)
    spec = DatasetSpec(args.format, list(args.files), args.images, args.split, args.limit)
    records = read_dataset(spec)
    if not records:
        raise ValueError(f"the calibration set is empty: {', '.join(args.files)} has no records")
    return spec, records


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
    full_outputs: Sequence[str] | None = None,
    time_every_run: bool = False,
    **eval_kwargs,
) -> tuple[Calibration, dict[float, EvalResult]]:
    """Run `ee` over `records` at each threshold (safest first) and certify thresholds with `calibrate_threshold`.

    Losses are measured against the full model's outputs: `full_outputs` when given (already decoded, e.g. by an
    earlier call on the same records), otherwise the first run decodes the full model beside the exits.
    `time_every_run` decodes the full model beside every run, for measured (work and wall-clock) speedups."""
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
    full_texts = list(full_outputs) if full_outputs is not None else None
    if full_texts is not None and len(full_texts) != len(records):
        raise ValueError(f"{len(full_texts)} full-model outputs for {len(records)} records")
    full_metric = None
    if full_texts is not None and loss == "metric":
        full_metric = _metric_per_record(task, labels, full_texts, vqa_metric)
    losses: dict[float, list[float]] = {}
    for t in grid:
        result = evaluate(task, ee, processor, records, t, method=method,
                          compare_full=time_every_run or full_texts is None, **eval_kwargs)  # fmt: skip
        texts = [row["prediction"] for row in result.predictions]
        if full_texts is None:  # the first run decoded the full model too
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
    spec, records = _records(args)
    ee, bundle = load_model(args)
    task = spec.task
    calibration, results = calibrate_exits(
        ee, bundle, task, records, args.tolerance, args.confidence, args.loss, args.thresholds, args.method,
        vqa_metric=spec.vqa_metric, progress=print, **generation_kwargs(args, spec),
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


# --- exit placement --------------------------------------------------------------------------------------------
SPEEDUPS = ("ideal", "analytic", "wallclock")


def exits_subset(ee, layers: Sequence[int]):
    """A view of `ee` with only the exits at `layers`: the trained exit modules are shared, nothing is copied, and
    the engine runs exactly what an `EarlyExitVLM` built with those exits alone would run."""
    layers = sorted(int(i) for i in layers)
    missing = sorted(set(layers) - set(ee.exit_layers))
    if missing or not layers:
        raise ValueError(f"no trained exit at layers {missing or layers} (trained exits: {ee.exit_layers})")
    sub = copy.copy(ee)
    sub._modules = dict(ee._modules)  # its own module registry, so replacing `exits` leaves `ee` whole
    sub.exits = type(ee.exits)({str(i): ee.exits[str(i)] for i in layers})
    sub.exit_config = dataclasses.replace(ee.exit_config, exit_layers=layers)
    return sub


def candidate_placements(
    parameters: dict[int, int], budget_exits: int | None = None, budget_parameters: int | None = None
) -> list[tuple[int, ...]]:
    """Every non-empty set of candidate layers (`parameters`: layer -> trainable parameters of its exit) within
    the budget: at most `budget_exits` exits and at most `budget_parameters` trainable parameters."""
    if budget_exits is None and budget_parameters is None:
        raise ValueError("give a budget: a number of exits or of trainable parameters")
    if budget_exits is not None and budget_exits < 1:
        raise ValueError(f"the exit budget must be at least 1, got {budget_exits}")
    layers = sorted(parameters)
    most = len(layers) if budget_exits is None else min(budget_exits, len(layers))
    sets = [c for k in range(1, most + 1) for c in itertools.combinations(layers, k)
            if budget_parameters is None or sum(parameters[i] for i in c) <= budget_parameters]  # fmt: skip
    if not sets:
        raise ValueError(f"no exit fits a budget of {budget_parameters:,} trainable parameters "
                         f"(the smallest exit has {min(parameters.values()):,})")  # fmt: skip
    return sets


@dataclasses.dataclass
class Placement:
    layers: tuple[int, ...]
    parameters: int  # trainable parameters of these exits
    calibration: Calibration
    speedup: float  # at the certified threshold (1.0: nothing certified, the full model runs)
    speedups: dict[str, float | None]  # every kind of speedup at that threshold

    def as_dict(self) -> dict:
        c = self.calibration
        return {"layers": list(self.layers), "trainable_parameters": self.parameters, "threshold": c.threshold,
                "certified": bool(c.certified), "risk": c.risks.get(c.threshold), "speedup": self.speedup,
                "speedups": self.speedups}  # fmt: skip


def _speedups(results: dict[float, EvalResult], threshold: float) -> dict[str, float | None]:
    if threshold not in results:  # the fallback was not in the grid: it never exits early
        return {"ideal": 1.0, "analytic": 1.0, "wallclock": None}
    s = results[threshold].speed
    return {"ideal": s.ideal_speedup, "analytic": s.analytic_speedup, "wallclock": s.wallclock_speedup}


def place_exits(
    ee,
    processor,
    task: str,
    records: Sequence,
    tolerance: float,
    confidence: float,
    budget_exits: int | None = None,
    budget_parameters: int | None = None,
    speedup: str = "ideal",
    max_placements: int = 64,
    progress=None,
    **calibrate_kwargs,
) -> tuple[Placement, list[Placement], float]:
    """Choose where exits go: certify a threshold for every placement (set of `ee`'s trained exits) within the
    budget on `records`, and keep the one with the largest `speedup` at its certified threshold.

    `speedup`: "ideal" (parameters the full model reads over those early exit reads, counted by the engine: exit
    layers and heads included - the cost of a weight-bound decode step), "analytic" (the paper's N / mean layers per token; blind to the
    cost of exits a token passes), or "wallclock" (measured here; noisy on a shared machine). Each placement is
    certified at 1 - (1 - confidence) / m for m placements (Bonferroni), so the chosen placement's threshold keeps
    the guarantee at `confidence` although it was picked on the same data. Returns (best, all placements, the
    per-placement confidence).
    """
    check_unit_interval("tolerance", tolerance)
    check_unit_interval("confidence", confidence)
    if speedup not in SPEEDUPS:
        raise ValueError(f"unknown speedup {speedup!r}: one of {SPEEDUPS}")
    parameters = {i: trainable_parameters(m) for i, m in ee.exit_dict().items()}
    sets = candidate_placements(parameters, budget_exits, budget_parameters)
    if len(sets) > max_placements:
        raise ValueError(f"{len(sets)} placements fit the budget, more than max_placements={max_placements}: "
                         "offer fewer candidate layers or a smaller budget")  # fmt: skip
    say = progress or (lambda msg: None)
    each = 1.0 - (1.0 - confidence) / len(sets)
    placements, full_outputs = [], calibrate_kwargs.pop("full_outputs", None)
    for layers in sets:
        calibration, results = calibrate_exits(exits_subset(ee, layers), processor, task, records, tolerance, each,
                                               full_outputs=full_outputs, time_every_run=speedup != "analytic",
                                               **calibrate_kwargs)  # fmt: skip
        if full_outputs is None:  # the first placement's first run decoded the full model: reuse it
            first = results[calibration.tested[0]]
            full_outputs = [row["full_prediction"] for row in first.predictions]
        speeds = _speedups(results, calibration.threshold)
        value = speeds[speedup] if speeds[speedup] is not None else 1.0
        placements.append(Placement(layers, sum(parameters[i] for i in layers), calibration, value, speeds))
        say(f"exits {list(layers)}: threshold {calibration.threshold:g} "
            f"({'certified' if calibration.certified else 'none certified'}), {speedup} speedup {value:.2f}x")  # fmt: skip
    best = max(placements, key=lambda p: (p.speedup, -p.parameters, -len(p.layers)))
    return best, placements, each


def _placement_guarantee(best: Placement, confidence: float, m: int) -> str:
    c = best.calibration
    if not c.certified:
        return (f"no placement could be certified at risk <= {c.tolerance:g} with confidence {confidence:g} "
                f"(each of {m} tested at {c.confidence:.4g}) from {c.n} samples")  # fmt: skip
    return (f"if the {c.n} calibration samples and future inputs are i.i.d. from one distribution, the mean loss of "
            f"exits {list(best.layers)} at threshold {c.threshold:g} exceeds {c.tolerance:g} with probability at "
            f"most {1 - confidence:.3g} over the draw of the calibration set (each of the {m} placements tested at "
            f"{1 - c.confidence:.3g}, Bonferroni)")  # fmt: skip


def run_place_exits(args: argparse.Namespace) -> int:
    if args.budget_exits is None and args.budget_parameters is None:
        raise ValueError("give a budget: --budget-exits N or --budget-parameters P")
    spec, records = _records(args)
    ee, bundle = load_model(args)
    if args.candidates:
        ee = exits_subset(ee, args.candidates)
    best, placements, each = place_exits(
        ee, bundle, spec.task, records, args.tolerance, args.confidence, args.budget_exits, args.budget_parameters,
        args.speedup, args.max_placements, progress=print, loss=args.loss, thresholds=args.thresholds,
        method=args.method, vqa_metric=spec.vqa_metric, **generation_kwargs(args, spec),
    )  # fmt: skip
    report = {
        "method": args.method, "task": spec.task, "format": args.format, "files": list(args.files),
        "loss": args.loss, "loss_definition": _LOSS_TEXT[args.loss], "tolerance": args.tolerance,
        "confidence": args.confidence, "n": best.calibration.n, "candidates": ee.exit_layers,
        "budget": {"exits": args.budget_exits, "trainable_parameters": args.budget_parameters},
        "speedup": args.speedup, "placements_tested": len(placements), "confidence_per_placement": each,
        "guarantee": _placement_guarantee(best, args.confidence, len(placements)),
        "chosen": best.as_dict(),
        "alternatives": sorted((p.as_dict() for p in placements), key=lambda d: -d["speedup"]),
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    if best.calibration.certified and best.calibration.threshold != never_exits(args.method)[0]:
        print(f"chosen exits: {list(best.layers)} at threshold {best.calibration.threshold:g}, {args.speedup} "
              f"speedup {best.speedup:.2f}x ({len(placements)} placements tested)")  # fmt: skip
    else:
        print(f"no placement certifies a threshold that exits early ({len(placements)} tested): keep the full model")
    print(report["guarantee"])
    print(f"wrote {out}")
    return 0


_LOSS_TEXT = {
    "consistency": "1 if the early-exit output differs from the full model's, else 0",
    "metric": "per-record drop of the task metric (VQA accuracy, GQA exact match, or CIDEr) below the full "
              "model's, clipped to [0, 1]",
}  # fmt: skip
