"""Exit placement: which of a model's trained exits to keep under a budget (a number of exits or of trainable
parameters), chosen by certifying a threshold (`calibrate_exits`) for every placement within the budget and keeping
the fastest at its certified threshold; Bonferroni over the placements keeps the guarantee for the one picked.
Serves `freevlm place-exits` and the demo."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .calibration import Calibration, CalibrationOptions, calibrate_exits
from .decoding.generate import calls_speedup
from .eval.evaluate import EvalResult
from .eval.predictions import PredictionLog
from .methods import trainable_parameters
from .model import EarlyExitVLM

SPEEDUPS = ("ideal", "analytic", "calls", "wallclock")


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
    sub.exit_config = replace(ee.exit_config, exit_layers=layers)
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
    sets = [
        c
        for k in range(1, most + 1)
        for c in itertools.combinations(layers, k)
        if budget_parameters is None or sum(parameters[i] for i in c) <= budget_parameters
    ]
    if not sets:
        raise ValueError(
            f"no exit fits a budget of {budget_parameters:,} trainable parameters "
            f"(the smallest exit has {min(parameters.values()):,})"
        )
    return sets


@dataclass
class Placement:
    layers: tuple[int, ...]
    parameters: int  # trainable parameters of these exits
    calibration: Calibration
    speedup: float  # at the certified threshold (1.0: nothing certified, the full model runs)
    speedups: dict[str, float | None]  # every kind of speedup at that threshold

    def as_dict(self) -> dict:
        c = self.calibration
        return {
            "layers": list(self.layers),
            "trainable_parameters": self.parameters,
            "threshold": c.threshold,
            "certified": bool(c.certified),
            "risk": c.risks.get(c.threshold),
            "speedup": self.speedup,
            "speedups": self.speedups,
        }


def _speedups(results: dict[float, EvalResult], threshold: float, layers: Sequence[int]) -> dict[str, float | None]:
    if threshold not in results:  # the fallback was not in the grid: it never exits early
        return {"ideal": 1.0, "analytic": 1.0, "calls": 1.0, "wallclock": None}
    s = results[threshold].speed
    tokens = [layer for layer, count in s.exit_histogram.items() for _ in range(count)]
    calls = calls_speedup(tokens, s.num_layers, list(layers))
    return {"ideal": s.ideal_speedup, "analytic": s.analytic_speedup, "calls": calls, "wallclock": s.wallclock_speedup}


def place_exits(
    ee: EarlyExitVLM,
    processor,
    task: str,
    records: Sequence,
    options: CalibrationOptions,
    budget_exits: int | None = None,
    budget_parameters: int | None = None,
    speedup: str = "ideal",
    max_placements: int = 64,
    full_outputs: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    log: Callable[[str], PredictionLog] | None = None,
) -> tuple[Placement | None, list[Placement], float]:
    """Choose where exits go: certify a threshold for every placement (set of `ee`'s trained exits) within the
    budget on `records`, and keep the one with the largest `speedup` at its certified threshold.

    `speedup`: "ideal" (parameters the full model reads over those early exit reads, counted by the engine: exit
    layers and heads included - the cost of a weight-bound decode step; batched runs count rows riding along),
    "analytic" (the paper's N / mean layers per token; blind to the cost of exits a token passes), "calls" (N / LM
    layers plus exit layers consulted per token: the weight-bound cost from each token's exit alone, so batched runs
    give it too) or "wallclock" (measured here; noisy on a shared machine).
    Each placement is certified at 1 - (1 - confidence) / m for m placements (Bonferroni), so the chosen placement's
    threshold keeps the guarantee at the options' `confidence` although it was picked on the same data. `options`,
    `full_outputs`, `progress` and `log`: as `calibrate_exits` takes them, for every placement (`log` names each
    placement's passes "<name>_exits_<layers>").
    Returns (best, all placements, the per-placement confidence); best is None off the main process.
    """
    if speedup not in SPEEDUPS:
        raise ValueError(f"unknown speedup {speedup!r}: one of {SPEEDUPS}")
    parameters = {i: trainable_parameters(m) for i, m in ee.exit_dict().items()}
    sets = candidate_placements(parameters, budget_exits, budget_parameters)
    if len(sets) > max_placements:
        raise ValueError(
            f"{len(sets)} placements fit the budget, more than max_placements={max_placements}: "
            "offer fewer candidate layers or a smaller budget"
        )
    say = progress or (lambda msg: None)
    each = 1.0 - (1.0 - options.confidence) / len(sets)
    placements = []
    for layers in sets:
        calibration, results = calibrate_exits(
            exits_subset(ee, layers),
            processor,
            task,
            records,
            replace(options, confidence=each),
            full_outputs=full_outputs,
            time_every_run=speedup in ("ideal", "wallclock"),
            progress=progress,
            log=_placement_log(log, layers),
        )
        if full_outputs is None:  # the first placement's first (safest) run decoded the full model: reuse it
            first = next(iter(results.values()))
            full_outputs = [row["full_prediction"] for row in first.predictions]
        if calibration is None:  # not the main process (`accelerate launch`): only the main one certifies
            continue
        speeds = _speedups(results, calibration.threshold, layers)
        value = speeds[speedup] if speeds[speedup] is not None else 1.0
        placements.append(Placement(layers, sum(parameters[i] for i in layers), calibration, value, speeds))
        say(
            f"exits {list(layers)}: threshold {calibration.threshold:g} "
            f"({'certified' if calibration.certified else 'none certified'}), {speedup} speedup {value:.2f}x"
        )
    if not placements:
        return None, [], each
    best = max(placements, key=lambda p: (p.speedup, -p.parameters, -len(p.layers)))
    return best, placements, each


def _placement_log(log: Callable[[str], PredictionLog] | None, layers: Sequence[int]):
    """`log` with each name followed by the placement's exits, so that every placement keeps its own files."""
    if log is None:
        return None
    return lambda name: log(f"{name}_exits_{'-'.join(map(str, layers))}")


def placement_guarantee(best: Placement, confidence: float, m: int) -> str:
    c = best.calibration
    if not c.certified:
        return (
            f"no placement could be certified at risk <= {c.tolerance:g} with confidence {confidence:g} "
            f"(each of {m} tested at {c.confidence:.4g}) from {c.n} samples"
        )
    return (
        f"if the {c.n} calibration samples and future inputs are i.i.d. from one distribution, the mean loss of "
        f"exits {list(best.layers)} at threshold {c.threshold:g} exceeds {c.tolerance:g} with probability at "
        f"most {1 - confidence:.3g} over the draw of the calibration set (each of the {m} placements tested at "
        f"{1 - c.confidence:.3g}, Bonferroni)"
    )
