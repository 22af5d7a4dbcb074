"""Stage 4b, calibrating and placing (`freevlm.calibration`) on a split of their own: FREE's threshold certified by
Learn-then-Test, and exits placed by measurement under a budget; each checked on test beside the dev-chosen
threshold and the fixed exits, where the risk observed says whether the guarantee held."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from ..calibration import LOSS_DEFINITIONS, CalibrationOptions, calibrate_exits, consistency_losses, never_exits
from ..decoding.config import DecodeConfig
from ..model import EarlyExitVLM
from ..placement import exits_subset, place_exits, placement_guarantee
from .config import DemoConfig
from .evaluate import SplitRuns
from .runs import Runner
from .train import save_placement

CONSISTENCY_WHY = (
    "Chosen over the per-caption CIDEr drop because it needs no labels, its 0/1 losses get the "
    "exact binomial p-value (the tightest at this size; CIDEr drops would need "
    "Hoeffding-Bentkus), and shapes captions follow one template, so a caption that differs from "
    "the full model's is almost always a worse one."
)


@dataclass
class Certified:
    loss: str
    loss_definition: str
    why: str
    split: str
    n: int
    tolerance: float
    confidence: float
    p_value_method: str
    guarantee: str
    certified_threshold: float
    certified: bool
    best_mean_dev_threshold: float
    per_threshold: list[dict]  # `Calibration.as_dict()`'s rows, each with its analytic speedup
    test: list[dict]  # per rule: {rule, threshold} and `OnTest.check`'s test_risk, test_CIDEr, test_analytic_speedup
    seconds: float


@dataclass
class Placement:
    exits_from: str
    candidates: list[int]
    budget_exits: int
    speedup: str
    thresholds: list[float]
    n: int
    tolerance: float
    confidence: float
    placements_tested: int
    confidence_per_placement: float
    guarantee: str
    chosen: dict  # `Placement.as_dict()` and its test columns
    fixed: dict | None  # the fixed `exit_layers` (None when over the budget)
    alternatives: list[dict]  # every placement, fastest first
    seconds: float


@dataclass
class CalibrationSet:
    records: list  # the calibration split, references dropped: the consistency loss reads none
    full_outputs: list[str]  # the full model's captions
    batch_size: int
    config: DecodeConfig

    def options(self, cfg: DemoConfig, thresholds: list[float]) -> CalibrationOptions:
        """The demo's certification (consistency loss, FREE's rule) at `thresholds`, decoding as the demo does."""
        return CalibrationOptions(
            cfg.tolerance, cfg.confidence, thresholds=thresholds, config=self.config, batch_size=self.batch_size
        )


class OnTest:
    """Consistency risk (captions that differ from the full model's), CIDEr and analytic speedup of a set of exits
    at a threshold on test; each (exits, threshold) is decoded once, FREE's at the chosen threshold not again."""

    def __init__(self, runner: Runner, test, main: SplitRuns, chosen: float):
        self.runner, self.test = runner, test
        self.seen = {("free", tuple(runner.cfg.exit_layers), chosen): main.free}  # by (source, exits, threshold)
        self.full = [p["prediction"] for p in main.full.predictions]

    def check(self, source: str, ee: EarlyExitVLM, threshold: float) -> dict:
        key = (source, tuple(ee.exit_layers), threshold)
        if key not in self.seen:
            name = f"test {source} {list(ee.exit_layers)} threshold {threshold:g}"
            self.seen[key] = self.runner.captions(name, ee, self.test, threshold, **self.runner.cider)
        run = self.seen[key]
        losses = consistency_losses([p["prediction"] for p in run.predictions], self.full)
        risk = sum(losses) / len(losses)
        return {"test_risk": risk, "test_CIDEr": run.score, "test_analytic_speedup": run.speed.analytic_speedup}


def calibration_set(runner: Runner, ee: EarlyExitVLM, records) -> CalibrationSet:
    """Without references no run scores CIDEr (two JVM starts per run)."""
    records = [replace(r, references=[]) for r in records]
    full = [p["prediction"] for p in runner.full("calibration", ee, records).predictions]
    return CalibrationSet(records, full, runner.cfg.eval_batch, runner.decoding)


def certify(runner: Runner, ee: EarlyExitVLM, calib: CalibrationSet, on_test: OnTest, chosen: float) -> Certified:
    """FREE's threshold certified on the calibration split (`calibrate_exits`) beside the best-mean-dev one, both
    then decoded on test. The loss is consistency, for the reasons in `CONSISTENCY_WHY`."""
    cfg, t0 = runner.cfg, time.perf_counter()
    never, _ = never_exits("free")
    grid = [t for t in cfg.thresholds if t != never]  # the fallback: never exiting early has risk 0
    with runner.progress.ticking(runner.bundle, "calibration FREE", len(grid) * len(calib.records)) as processor:
        calibration, runs = calibrate_exits(
            ee,
            processor,
            "captions",
            calib.records,
            calib.options(cfg, grid),
            full_outputs=calib.full_outputs,
        )
    per_threshold = calibration.as_dict()["per_threshold"]
    for row in per_threshold:
        row["analytic_speedup"] = runs[row["threshold"]].speed.analytic_speedup
    rules = [("certified (Learn-then-Test)", calibration.threshold), ("best mean dev CIDEr", chosen)]
    out = Certified(
        loss="consistency",
        loss_definition=LOSS_DEFINITIONS["consistency"],
        why=CONSISTENCY_WHY,
        split="calibration",
        n=calibration.n,
        tolerance=cfg.tolerance,
        confidence=cfg.confidence,
        p_value_method=calibration.p_value,
        guarantee=calibration.guarantee,
        certified_threshold=calibration.threshold,
        certified=bool(calibration.certified),
        best_mean_dev_threshold=chosen,
        per_threshold=per_threshold,
        test=[{"rule": rule, "threshold": t} | on_test.check("free", ee, t) for rule, t in rules],
        seconds=time.perf_counter() - t0,
    )
    runner.progress.say(
        f"calibration: certified threshold {calibration.threshold:g} vs best mean dev {chosen:g}; test "
        + ", ".join(f"{r['rule']} risk {r['test_risk']:.3f}" for r in out.test)
    )
    return out


def place(runner: Runner, candidates: EarlyExitVLM, calib: CalibrationSet, on_test: OnTest) -> Placement:
    """Exits chosen by measurement (`place_exits`): every set of at most `exit_budget` of the `candidates` exits
    (FREE's recipe, `free_candidates`), certified on the calibration split; the fastest certified one against the
    fixed `exit_layers`, both then checked on test. Speedup is "calls" (LM and exit layers per token, from each
    token's exit layer): batched runs cannot count one request's work, and the paper's analytic speedup counts an
    exit a token passes as free, so it would keep exits that cost more calls than they save."""
    cfg, t0, source = runner.cfg, time.perf_counter(), "free_candidates"
    total = cfg.placements() * len(cfg.placement_thresholds) * len(calib.records)
    with runner.progress.ticking(runner.bundle, "exit placement", total) as processor:
        best, placements, each = place_exits(
            candidates,
            processor,
            "captions",
            calib.records,
            calib.options(cfg, cfg.placement_thresholds),
            budget_exits=cfg.exit_budget,
            speedup="calls",
            full_outputs=calib.full_outputs,
        )
    fixed = next((p for p in placements if p.layers == tuple(sorted(cfg.exit_layers))), None)  # None: over budget

    def checked(p) -> dict:
        return p.as_dict() | on_test.check(source, exits_subset(candidates, p.layers), p.calibration.threshold)

    out = Placement(
        exits_from=source,
        candidates=cfg.candidates(),
        budget_exits=cfg.exit_budget,
        speedup="calls",
        thresholds=list(cfg.placement_thresholds),
        n=best.calibration.n,
        tolerance=cfg.tolerance,
        confidence=cfg.confidence,
        placements_tested=len(placements),
        confidence_per_placement=each,
        guarantee=placement_guarantee(best, cfg.confidence, len(placements)),
        chosen=checked(best),
        fixed=checked(fixed) if fixed else None,
        alternatives=sorted((p.as_dict() for p in placements), key=lambda d: -d["speedup"]),
        seconds=time.perf_counter() - t0,
    )
    save_placement(cfg, best.layers, best.calibration.threshold, best.calibration.certified)
    line = (
        f"placement: chosen exits {list(best.layers)} at threshold {best.calibration.threshold:g} "
        f"({best.speedup:.2f}x), {len(placements)} placements in {out.seconds:.0f}s"
    )
    if fixed:
        line += f"; fixed {list(fixed.layers)}: {fixed.calibration.threshold:g} ({fixed.speedup:.2f}x)"
    runner.progress.say(line)
    return out
