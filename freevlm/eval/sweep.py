"""Threshold sweeps: pick the threshold on a held-out dev split (as the paper does), report it on the test
records, and trace the per-layer curve; results go to JSON and PNG plots."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..data.records import split_records
from ..methods import get_method, trainable_parameters
from ..model import EarlyExitVLM
from .evaluate import EvalResult, evaluate
from .plots import plot_per_layer, plot_quality_vs_speedup
from .processes import Processes


@dataclass
class SweepResult:
    task: str
    metric: str
    num_layers: int
    best_threshold: float | None  # None on processes other than the main one
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
    dev_fraction: float = 0.2,
    per_layer: bool = True,
    progress=None,
    method: str = "free",
    **eval_kwargs,
) -> SweepResult:
    """Evaluate every threshold of `method`'s exit rule (default: the method's grid) on dev and test records, and
    (with `per_layer`) every exit forced in turn.

    Without `dev_records`, a seeded `dev_fraction` of the images in `records` is held out as dev (with all their
    records) and the rest is the test set.
    Test runs time the full model beside early exit (`compare_full`); dev and per-layer runs only count layers.
    """
    if dev_records is None:
        dev_records, records = split_dev(records, dev_fraction)
    say = progress or (lambda msg: None)
    thresholds = get_method(method).thresholds if thresholds is None else thresholds
    eval_kwargs["method"] = method
    dev, test = [], []
    for t in thresholds:
        dev.append(evaluate(task, ee, processor, dev_records, t, **dict(eval_kwargs, compare_full=False)))
        test.append(evaluate(task, ee, processor, records, t, **eval_kwargs))
        say(
            f"{method} threshold {t:g}: dev {dev[-1].metric} {dev[-1].score}, test {test[-1].score}, "
            f"analytic speedup {test[-1].speed.analytic_speedup:.2f}x, wall-clock {test[-1].speed.wallclock_speedup}"
        )
    layers = []
    if per_layer:
        for layer in ee.exit_layers + [ee.backbone.num_layers]:
            layers.append(evaluate(task, ee, processor, records, layer=layer, **dict(eval_kwargs, compare_full=False)))
            say(f"layer {layer}: {layers[-1].metric} {layers[-1].score}")
    if not Processes.current().is_main:  # under `accelerate launch` the main process scores and chooses
        return SweepResult(task, test[0].metric, ee.backbone.num_layers, None, dev, test, layers, method)
    return SweepResult(task, test[0].metric, ee.backbone.num_layers, choose_threshold(dev), dev, test, layers, method)


def write_sweep(result: SweepResult, out_dir: str | os.PathLike) -> dict[str, Path]:
    """results.json, quality_vs_speedup.png, per_layer.png (when traced) and test predictions per threshold."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json"}
    paths["results"].write_text(json.dumps(result.as_dict(), indent=2))
    preds = {f"{r.threshold:g}": r.predictions for r in result.test}
    paths["predictions"] = out / "predictions.json"
    paths["predictions"].write_text(json.dumps(preds, indent=1))
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
