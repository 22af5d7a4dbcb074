"""Threshold sweeps: pick the threshold on a held-out dev split (as the paper does), report it on the test
records, and trace the per-layer curve; results go to JSON and PNG plots."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..data.records import split_records
from ..files import write_text_atomic
from ..methods import get_method, trainable_parameters
from ..model import EarlyExitVLM
from .evaluate import EvalResult, evaluate, evaluate_many
from .options import EvalOptions
from .plots import plot_per_layer, plot_quality_vs_speedup
from .predictions import PredictionLog
from .processes import Processes


@dataclass
class SweepResult:
    task: str
    metric: str
    num_layers: int
    best_threshold: float
    dev: list[EvalResult]
    test: list[EvalResult]
    per_layer: list[EvalResult] = field(default_factory=list)
    method: str = "free"

    @property
    def best_test(self) -> EvalResult:
        return next(r for r in self.test if r.threshold == self.best_threshold)

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "rule": get_method(self.method).rule,
            "task": self.task,
            "metric": self.metric,
            "num_layers": self.num_layers,
            "best_threshold": self.best_threshold,
            "selection": "highest dev score; ties go to the higher dev analytic speedup",
            "best_test": self.best_test.as_dict(predictions=False),
            "dev": [r.as_dict(predictions=False) for r in self.dev],
            "test": [r.as_dict(predictions=False) for r in self.test],
            "per_layer": [r.as_dict(predictions=False) for r in self.per_layer],
        }


DEV_FRACTION = 0.2  # of the images, held out to choose the threshold on when no dev split is given (paper: 0.2)


def split_dev(records: Sequence, fraction: float) -> tuple[list, list]:
    """(dev, test): a seeded `fraction` of the images held out, with their records, for choosing the threshold."""
    test, dev = split_records(records, fraction)
    if not test:
        raise ValueError(f"{len(records)} records are too few to hold out a dev split")
    return dev, test


def choose_threshold(dev: Sequence[EvalResult]) -> float:
    scored = [r for r in dev if r.score is not None]
    if not scored:
        raise ValueError("the dev split has no labels: cannot choose a threshold")
    best = max(scored, key=lambda r: (r.score, r.speed.analytic_speedup))
    return best.threshold


def sweep(
    ee: EarlyExitVLM,
    processor,
    task: str,
    records: Sequence,
    dev_records: Sequence | None = None,
    thresholds: Sequence[float] | None = None,
    dev_fraction: float = DEV_FRACTION,
    per_layer: bool = True,
    progress: Callable[[str], None] | None = None,
    log: Callable[[str], PredictionLog] | None = None,
    options: EvalOptions | None = None,
) -> SweepResult:
    """Evaluate every threshold of `options.method`'s exit rule (default: the method's grid) on dev and test
    records, and (with `per_layer`) every exit forced in turn.

    Without `dev_records`, a seeded `dev_fraction` of the images in `records` is held out as dev (with all their
    records) and the rest is the test set.
    Each split is decoded once for every threshold and forced layer together (`evaluate_many`), image and prompt
    encoded once per batch (VisDial: each round's options scored by one teacher-forced pass for every rule), each
    rule's outputs those of its own `evaluate`; then, with `options.compare_full`, the threshold chosen on dev is
    evaluated again on test alone, timed against the full model, so its wall-clock speedup is measured as
    `freevlm eval` measures it. The other rows count layers only. `log(name)`: the `PredictionLog` of each pass
    ("predictions_dev", "predictions_test", "predictions_best"), so a sweep killed part-way resumes where it
    stopped (VisDial's option scores are in the lines too).
    """
    options = options or EvalOptions()
    if dev_records is None:
        dev_records, records = split_dev(records, dev_fraction)
    say = progress or (lambda msg: None)
    method = options.method
    thresholds = list(get_method(method).thresholds if thresholds is None else thresholds)
    untimed = replace(options, compare_full=False)
    forced = ee.exit_layers + [ee.backbone.num_layers] if per_layer else []
    passes = {name: log(f"predictions_{name}") if log else None for name in ("dev", "test", "best")}
    dev_rules = [(t, None) for t in thresholds]
    dev = evaluate_many(task, ee, processor, dev_records, dev_rules, untimed, passes["dev"])
    rules = dev_rules + [(None, layer) for layer in forced]
    tested = evaluate_many(task, ee, processor, records, rules, untimed, passes["test"])
    test, layers = tested[: len(thresholds)], tested[len(thresholds) :]
    processes = Processes.current()
    best = processes.broadcast(choose_threshold(dev) if processes.is_main else None)  # the main process scores
    if options.compare_full:
        test[thresholds.index(best)] = evaluate(task, ee, processor, records, best, options=options, log=passes["best"])
    for d, t in zip(dev, test):
        say(
            f"{method} threshold {t.threshold:g}: dev {d.metric} {d.score}, test {t.score}, "
            f"analytic speedup {t.speed.analytic_speedup:.2f}x, wall-clock {t.speed.wallclock_speedup}"
        )
    for r in layers:
        say(f"layer {r.layer}: {r.metric} {r.score}")
    return SweepResult(task, test[0].metric, ee.backbone.num_layers, best, dev, test, layers, method)


def write_sweep(result: SweepResult, out_dir: str | os.PathLike) -> dict[str, Path]:
    """results.json, quality_vs_speedup.png, per_layer.png (when traced) and test predictions per threshold."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json"}
    write_text_atomic(paths["results"], json.dumps(result.as_dict(), indent=2))
    preds = {f"{r.threshold:g}": r.predictions for r in result.test}
    paths["predictions"] = out / "predictions.json"
    write_text_atomic(paths["predictions"], json.dumps(preds, indent=1))
    scored = [r for r in result.test if r.score is not None]
    if scored:
        points = [
            {
                "threshold": r.threshold,
                "score": r.score,
                "analytic_speedup": r.speed.analytic_speedup,
                "wallclock_speedup": r.speed.wallclock_speedup,
            }
            for r in scored
        ]
        paths["quality_vs_speedup"] = out / "quality_vs_speedup.png"
        plot_quality_vs_speedup(
            points,
            result.metric,
            paths["quality_vs_speedup"],
            f"{result.method}, {result.task}: {result.metric} vs speedup (best on dev: {result.best_threshold:g})",
        )
    layered = [r for r in result.per_layer if r.score is not None]
    if layered:
        paths["per_layer"] = out / "per_layer.png"
        plot_per_layer(
            [{"layer": r.layer, "score": r.score} for r in layered],
            result.metric,
            result.num_layers,
            paths["per_layer"],
        )
    return paths


def method_parameters(runs: dict[str, EarlyExitVLM]) -> dict[str, int]:
    """Trainable parameters of each method's exits (LeeBLIP's learned loss weights, a few scalars that only
    training uses, are in its `method.json`)."""
    return {name: trainable_parameters(ee.exits) for name, ee in runs.items()}


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table (every table of the demo's report)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
