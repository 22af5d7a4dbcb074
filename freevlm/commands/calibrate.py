"""`freevlm calibrate` and `freevlm place-exits`: read a calibration set and a model, run
`freevlm.calibration.calibrate_exits` / `freevlm.placement.place_exits` (which run the exits and certify thresholds by
Learn-then-Test), write the JSON and say what was found. Each run's records go to predictions_*.jsonl files beside
the JSON as they finish (`prediction_logs`), so `--resume` decodes only what a killed run had not.

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
from collections.abc import Callable
from pathlib import Path

from ..argtypes import number, open_fraction, output_file, positive_int
from ..calibration import (
    LOSS_DEFINITIONS,
    LOSSES,
    Calibration,
    CalibrationOptions,
    calibrate_exits,
    certified_model,
    check_unit_interval,
    never_exits,
)
from ..data.specs import DatasetSpec, read_dataset
from ..eval.evaluate import EvalResult
from ..eval.predictions import PredictionLog
from ..eval.processes import Processes
from ..files import write_text_atomic
from ..methods import get_method
from ..placement import SPEEDUPS, exits_subset, place_exits, placement_guarantee
from .evaluate import dataset_arguments, decoding_options, load_model, run_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="certify an exit threshold: early-exit risk <= tolerance with a confidence")
    _common(p)
    p.add_argument("--out", type=output_file, required=True, help="calibration JSON to write")
    p.set_defaults(func=run_calibrate)

    p = sub.add_parser("place-exits", help="choose exit layers among trained ones: most speedup at a certified risk")
    _common(p)
    p.add_argument(
        "--candidates", type=positive_int, nargs="+", help="trained exit layers to choose from (default: all)"
    )
    p.add_argument("--budget-exits", type=positive_int, help="at most this many exits")
    p.add_argument("--budget-parameters", type=positive_int, help="at most this many trainable exit parameters")
    p.add_argument(
        "--speedup",
        choices=SPEEDUPS,
        default="ideal",
        help="what to maximise: ideal (parameters touched, counted by the engine), analytic (the "
        "paper's N / layers per token), calls (N / LM and exit layers run per token: every exit a token consulted "
        "costs a layer), wallclock (measured here)",
    )
    p.add_argument("--max-placements", type=positive_int, default=64, help="refuse budgets that allow more placements")
    p.add_argument("--out", type=output_file, required=True, help="placement JSON to write")
    p.set_defaults(func=run_place_exits)


def _common(p: argparse.ArgumentParser) -> None:
    dataset_arguments(p)
    p.add_argument(
        "--loss",
        choices=LOSSES,
        default="consistency",
        help="consistency: output differs from the full model's (no labels needed); metric: clipped "
        "per-record drop of VQA accuracy / CIDEr below the full model's",
    )
    p.add_argument(
        "--tolerance", type=open_fraction, default=0.05, help="the risk (mean loss) to stay under, in (0, 1)"
    )
    p.add_argument("--confidence", type=open_fraction, default=0.95, help="probability the guarantee holds, in (0, 1)")
    p.add_argument("--thresholds", type=number(), nargs="+", help="grid to certify (default: the --method's grid)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="decode only the records not yet in the predictions_*.jsonl files beside --out (each run appends its "
        "records there); refused if they were made with other options",
    )


def _records(args: argparse.Namespace) -> tuple[DatasetSpec, list]:
    """The calibration records, after checking what can be checked before any weights load."""
    check_unit_interval("--tolerance", args.tolerance)
    check_unit_interval("--confidence", args.confidence)
    spec = DatasetSpec(args.format, list(args.files), args.images, args.split, args.limit)
    records = read_dataset(spec)
    if not records:
        raise ValueError(f"the calibration set is empty: {', '.join(args.files)} has no records")
    return spec, records


def prediction_logs(args: argparse.Namespace, spec: DatasetSpec, **knobs) -> Callable[[str], PredictionLog]:
    """The `PredictionLog` of each pass, beside --out as "<out's stem>_<pass>.jsonl", holding what the records'
    outputs depend on (`run_options` and `knobs`). With --resume, the logs already there are checked now, before
    any weights load: other options are refused, naming each difference."""
    out = Path(args.out)
    options = run_options(args, spec, **knobs)

    def log(name: str) -> PredictionLog:
        return PredictionLog(out.parent, options, args.resume, f"{out.stem}_{name}")

    if args.resume:
        for kept in sorted(out.parent.glob(f"{out.stem}_predictions*.options.json")):
            log(kept.name.removeprefix(f"{out.stem}_").removesuffix(".options.json"))
    return log


def calibration_options(args: argparse.Namespace, spec: DatasetSpec, bundle) -> CalibrationOptions:
    """The command line's `CalibrationOptions` (decode options as `eval` reads them)."""
    config, prompt = decoding_options(args, spec, bundle)
    return CalibrationOptions(
        args.tolerance,
        args.confidence,
        loss=args.loss,
        thresholds=args.thresholds,
        method=args.method,
        vqa_metric=spec.vqa_metric,
        config=config,
        prompt=prompt,
        batch_size=args.batch_size,
    )


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
    log = prediction_logs(args, spec, thresholds=args.thresholds)
    ee, bundle = load_model(args)
    main = Processes.current().is_main
    task = spec.task
    calibration, results = calibrate_exits(
        ee, bundle, task, records, calibration_options(args, spec, bundle), progress=print if main else None, log=log
    )
    if not main:  # the main process certifies and writes (`accelerate launch`)
        return 0
    report = calibration_report(
        calibration,
        results,
        **certified_model(args.backbone, args.exits),
        method=args.method,
        rule=get_method(args.method).rule,
        task=task,
        format=args.format,
        files=list(args.files),
        split=args.split,
        loss=args.loss,
        loss_definition=LOSS_DEFINITIONS[args.loss],
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(report, indent=2))
    if calibration.certified:
        risk = calibration.risks[calibration.threshold]
        print(
            f"certified threshold: {calibration.threshold:g} ({args.loss} risk {risk:.4f} on {calibration.n} "
            f"records, analytic speedup {report['analytic_speedup']:.2f}x)"
        )
    else:
        print(f"certified threshold: none; use {calibration.threshold:g} (never exit early)")
    print(calibration.guarantee)
    print(f"wrote {out}")
    return 0


def run_place_exits(args: argparse.Namespace) -> int:
    if args.budget_exits is None and args.budget_parameters is None:
        raise ValueError("give a budget: --budget-exits N or --budget-parameters P")
    spec, records = _records(args)
    knobs = dict(budget_exits=args.budget_exits, budget_parameters=args.budget_parameters, speedup=args.speedup)
    log = prediction_logs(args, spec, thresholds=args.thresholds, candidates=args.candidates, **knobs)
    ee, bundle = load_model(args)
    main = Processes.current().is_main
    if args.candidates:
        ee = exits_subset(ee, args.candidates)
    best, placements, each = place_exits(
        ee,
        bundle,
        spec.task,
        records,
        calibration_options(args, spec, bundle),
        max_placements=args.max_placements,
        progress=print if main else None,
        log=log,
        **knobs,
    )
    if not main:
        return 0
    report = {
        **certified_model(args.backbone, args.exits),
        "method": args.method,
        "task": spec.task,
        "format": args.format,
        "files": list(args.files),
        "loss": args.loss,
        "loss_definition": LOSS_DEFINITIONS[args.loss],
        "tolerance": args.tolerance,
        "confidence": args.confidence,
        "n": best.calibration.n,
        "candidates": ee.exit_layers,
        "budget": {"exits": args.budget_exits, "trainable_parameters": args.budget_parameters},
        "speedup": args.speedup,
        "placements_tested": len(placements),
        "confidence_per_placement": each,
        "guarantee": placement_guarantee(best, args.confidence, len(placements)),
        "chosen": best.as_dict(),
        "alternatives": sorted((p.as_dict() for p in placements), key=lambda d: -d["speedup"]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(report, indent=2))
    if best.calibration.certified and best.calibration.threshold != never_exits(args.method)[0]:
        print(
            f"chosen exits: {list(best.layers)} at threshold {best.calibration.threshold:g}, {args.speedup} "
            f"speedup {best.speedup:.2f}x ({len(placements)} placements tested)"
        )
    else:
        print(f"no placement certifies a threshold that exits early ({len(placements)} tested): keep the full model")
    print(report["guarantee"])
    print(f"wrote {out}")
    return 0
