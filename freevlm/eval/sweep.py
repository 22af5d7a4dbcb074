"""Threshold sweeps: pick the threshold on a held-out dev split (as the paper does), report it on the test
records, and trace the per-layer curve; results go to JSON and PNG plots."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..model import EarlyExitVLM
from .evaluate import EvalResult, evaluate
from .plots import plot_per_layer, plot_quality_vs_speedup

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class SweepResult:
    task: str
    metric: str
    num_layers: int
    best_threshold: float
    dev: list[EvalResult]
    test: list[EvalResult]
    per_layer: list[EvalResult] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "task": self.task,
            "metric": self.metric,
            "num_layers": self.num_layers,
            "best_threshold": self.best_threshold,
            "selection": "highest dev score; ties go to the higher dev analytic speedup",
            "best_test": next(r.as_dict(predictions=False) for r in self.test if r.threshold == self.best_threshold),
            "dev": [r.as_dict(predictions=False) for r in self.dev],
            "test": [r.as_dict(predictions=False) for r in self.test],
            "per_layer": [r.as_dict(predictions=False) for r in self.per_layer],
        }


def split_dev(records: Sequence, fraction: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """(dev, rest): a seeded random `fraction` of the records held out for choosing the threshold."""
    if not 0 < fraction < 1:
        raise ValueError(f"dev fraction must be in (0, 1), got {fraction}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_dev = max(1, round(fraction * len(records)))
    if n_dev >= len(records):
        raise ValueError(f"{len(records)} records are too few to hold out a dev split")
    dev = sorted(order[:n_dev])
    rest = sorted(order[n_dev:])
    return [records[i] for i in dev], [records[i] for i in rest]


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
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    dev_fraction: float = 0.2,
    per_layer: bool = True,
    progress=None,
    **eval_kwargs,
) -> SweepResult:
    """Evaluate every threshold on dev and test records, and (with `per_layer`) every exit forced in turn.

    Without `dev_records`, a seeded `dev_fraction` of `records` is held out as dev and the rest is the test set.
    Test runs time the full model beside early exit (`compare_full`); dev and per-layer runs only count layers.
    """
    if dev_records is None:
        dev_records, records = split_dev(records, dev_fraction)
    say = progress or (lambda msg: None)
    dev, test = [], []
    for t in thresholds:
        dev.append(evaluate(task, ee, processor, dev_records, t, **dict(eval_kwargs, compare_full=False)))
        test.append(evaluate(task, ee, processor, records, t, **eval_kwargs))
        say(f"threshold {t:g}: dev {dev[-1].metric} {dev[-1].score}, test {test[-1].score}, "
            f"analytic speedup {test[-1].speed.analytic_speedup:.2f}x, wall-clock {test[-1].speed.wallclock_speedup}")  # fmt: skip
    layers = []
    if per_layer:
        for layer in ee.exit_layers + [ee.backbone.num_layers]:
            layers.append(evaluate(task, ee, processor, records, layer=layer, **dict(eval_kwargs, compare_full=False)))
            say(f"layer {layer}: {layers[-1].metric} {layers[-1].score}")
    return SweepResult(task, test[0].metric, ee.backbone.num_layers, choose_threshold(dev), dev, test, layers)


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
        points = [{"threshold": r.threshold, "score": r.score, "analytic_speedup": r.speed.analytic_speedup,
                   "wallclock_speedup": r.speed.wallclock_speedup} for r in scored]  # fmt: skip
        paths["quality_vs_speedup"] = out / "quality_vs_speedup.png"
        plot_quality_vs_speedup(points, result.metric, paths["quality_vs_speedup"],
                                f"{result.task}: {result.metric} vs speedup (best on dev: {result.best_threshold:g})")  # fmt: skip
    layered = [r for r in result.per_layer if r.score is not None]
    if layered:
        paths["per_layer"] = out / "per_layer.png"
        plot_per_layer([{"layer": r.layer, "score": r.score} for r in layered], result.metric, result.num_layers,
                       paths["per_layer"])  # fmt: skip
    return paths
