"""Exit thresholds with a statistical guarantee: Learn-then-Test (Angelopoulos, Bates et al. 2021), as CALM
(Schuster et al. 2022) applies it to early exits.

Picking the threshold whose mean dev score is best, or the lowest one whose *empirical* risk is under the
tolerance, promises nothing on new data: with a few hundred samples the empirical risk of a slightly too
aggressive threshold is below the tolerance a third of the time. Learn-then-Test instead tests, for each
threshold, the null hypothesis "its true risk exceeds the tolerance" with a valid p-value, and certifies the
thresholds whose null it rejects. Thresholds are tested one at a time from the safest down (fixed-sequence
testing), stopping at the first that fails, so the family-wise error stays at 1 - confidence with no correction
for the number of thresholds.

Guarantee: if the calibration samples are i.i.d. draws from the distribution the model will meet, then
P(true risk of the returned threshold > tolerance) <= 1 - confidence, over the draw of the calibration set. It is
a statement about the mean loss on that distribution, not about any single input, and it says nothing once the
data shift (another dataset, another prompt, other exits or another backbone).

`calibrate_exits` builds the losses by running exits over a calibration set at each threshold of a grid, against
the full model; `placement.place_exits` uses it to choose which of a model's trained exits to keep under a budget.
Both serve `freevlm calibrate` / `freevlm place-exits` and the demo.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from .decoding.config import DecodeConfig
from .eval.evaluate import EvalResult, evaluate, evaluate_many
from .eval.options import BATCH_SIZE, EvalOptions
from .eval.predictions import PredictionLog
from .eval.processes import Processes
from .methods import get_method
from .model import EarlyExitVLM

P_VALUES = ("auto", "binomial", "hoeffding-bentkus")


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space so that large n neither under- nor overflows."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    log_n = math.lgamma(n + 1)
    terms = [log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * math.fsum(math.exp(t - top) for t in terms))


def binomial_p_value(num_losses: int, n: int, tolerance: float) -> float:
    """Exact p-value of "risk > tolerance" for 0/1 losses: P(Binomial(n, tolerance) <= observed losses).

    Valid because under the null the count is Binomial(n, risk), stochastically larger than Binomial(n, tolerance).
    """
    return binomial_cdf(num_losses, n, tolerance)


def hoeffding_bentkus_p_value(risk: float, n: int, tolerance: float) -> float:
    """p-value of "risk > tolerance" for losses in [0, 1] (Bates et al. 2021, RCPS, prop. 3.3): the smaller of
    Hoeffding's exp(-n h(risk ^ tolerance, tolerance)) and Bentkus' e * P(Binomial(n, tolerance) <= ceil(n risk))."""
    a, b = min(risk, tolerance), tolerance
    h = (a * math.log(a / b) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - b))
    hoeffding = math.exp(-n * h)
    bentkus = math.e * binomial_cdf(math.ceil(n * risk - 1e-9), n, tolerance)
    return min(1.0, hoeffding, bentkus)


@dataclass
class Calibration:
    """What `calibrate_threshold` found: `threshold` is the most aggressive threshold certified (the last in the
    tested order), or `fallback` when none is; `certified` lists the certified thresholds, safest first."""

    threshold: float
    certified: list[float]
    tolerance: float
    confidence: float
    n: int
    risks: dict[float, float]  # empirical risk (mean loss) per threshold
    p_values: dict[float, float]
    p_value: str  # "binomial" or "hoeffding-bentkus"
    tested: list[float] = field(default_factory=list)  # the order of the fixed sequence (safest first)
    fallback: float = 1.0

    @property
    def guarantee(self) -> str:
        if not self.certified:
            return (
                f"no threshold could be certified at risk <= {self.tolerance:g} with confidence "
                f"{self.confidence:g} from {self.n} samples; {self.fallback:g} (never exit early) is returned"
            )
        return (
            f"if the {self.n} calibration samples and future inputs are i.i.d. from one distribution, the mean "
            f"loss at threshold {self.threshold:g} exceeds {self.tolerance:g} with probability at most "
            f"{1 - self.confidence:.3g} over the draw of the calibration set"
        )

    def as_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "certified": self.certified,
            "tolerance": self.tolerance,
            "confidence": self.confidence,
            "n": self.n,
            "p_value_method": self.p_value,
            "tested_order": self.tested,
            "fallback": self.fallback,
            "guarantee": self.guarantee,
            "per_threshold": [
                {
                    "threshold": t,
                    "empirical_risk": self.risks[t],
                    "p_value": self.p_values[t],
                    "certified": t in self.certified,
                }
                for t in self.tested
            ],
        }


def check_unit_interval(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value:g}")
    return value


def _as_losses(threshold: float, values) -> list[float]:
    losses = [float(v) for v in (values.tolist() if hasattr(values, "tolist") else values)]
    bad = [v for v in losses if not 0.0 <= v <= 1.0]  # also catches NaN
    if bad:
        raise ValueError(f"losses must lie in [0, 1]: threshold {threshold:g} has {len(bad)} outside (e.g. {bad[0]})")
    return losses


def calibrate_threshold(
    losses: Mapping[float, Sequence[float]],
    tolerance: float,
    confidence: float,
    *,
    higher_is_safer: bool = True,
    fallback: float = 1.0,
    p_value: str = "auto",
) -> Calibration:
    """Certify exit thresholds by Learn-then-Test with fixed-sequence testing.

    `losses` maps each threshold to its per-sample losses in [0, 1], the same samples in the same order under
    every threshold (e.g. 1 - [early-exit output == full output]). Thresholds are tested from the safest
    (highest, or lowest with `higher_is_safer=False`) down; each test rejects "true risk > tolerance" when its
    p-value is <= 1 - confidence, and testing stops at the first threshold that fails. The p-value is the exact
    binomial tail when every loss is 0 or 1 and Hoeffding-Bentkus (valid for any losses in [0, 1], looser)
    otherwise; `p_value` forces one. Returns the last threshold certified; when none is, `fallback`, which the
    caller must know to be safe (1.0 for the confidence rule: no token leaves early).

    Guarantee (samples i.i.d.): P(true risk of the returned threshold > tolerance) <= 1 - confidence. The same
    bound holds jointly for every threshold in `certified`.
    """
    tolerance = check_unit_interval("tolerance", tolerance)
    confidence = check_unit_interval("confidence", confidence)
    if p_value not in P_VALUES:
        raise ValueError(f"p_value must be one of {P_VALUES}, got {p_value!r}")
    if not losses:
        raise ValueError("no thresholds to calibrate: `losses` is empty")
    per_threshold = {float(t): _as_losses(t, v) for t, v in losses.items()}
    counts = {t: len(v) for t, v in per_threshold.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(
            "every threshold needs the same calibration samples, but sample counts differ: "
            + ", ".join(f"{t:g}: {c}" for t, c in sorted(counts.items()))
        )
    n = next(iter(counts.values()))
    if n == 0:
        raise ValueError("the calibration set is empty: no losses to certify a threshold with")
    binary = all(v in (0.0, 1.0) for vals in per_threshold.values() for v in vals)
    if p_value == "binomial" and not binary:
        raise ValueError("the binomial p-value needs 0/1 losses; use 'hoeffding-bentkus' for losses in [0, 1]")
    method = p_value if p_value != "auto" else ("binomial" if binary else "hoeffding-bentkus")

    order = sorted(per_threshold, reverse=higher_is_safer)
    delta = 1.0 - confidence
    risks, p_values, certified = {}, {}, []
    testing = True
    for t in order:
        total = math.fsum(per_threshold[t])
        risks[t] = total / n
        if method == "binomial":
            p_values[t] = binomial_p_value(round(total), n, tolerance)
        else:
            p_values[t] = hoeffding_bentkus_p_value(risks[t], n, tolerance)
        testing = testing and p_values[t] <= delta  # fixed sequence: the first failure ends the certification
        if testing:
            certified.append(t)
    threshold = certified[-1] if certified else float(fallback)
    return Calibration(threshold, certified, tolerance, confidence, n, risks, p_values, method, order, float(fallback))


# --- losses from running the exits over a calibration set ------------------------------------------------------
# Losses are measured against the full model, so the safest threshold (the rule never exits early) has risk 0 and
# the guarantee reads "early exit costs at most `tolerance` of X relative to the full model".
LOSSES = ("consistency", "metric")
LOSS_DEFINITIONS = {
    "consistency": "1 if the early-exit output differs from the full model's, else 0",
    "metric": "per-record drop of the task metric (VQA accuracy, GQA exact match, or CIDEr) below the full "
    "model's, clipped to [0, 1]",
}


def consistency_losses(texts: Sequence[str], full_texts: Sequence[str]) -> list[float]:
    """The consistency loss of each output: 1.0 where it differs from the full model's, else 0.0."""
    if len(texts) != len(full_texts):
        raise ValueError(f"{len(texts)} outputs but {len(full_texts)} full-model outputs")
    return [float(a != b) for a, b in zip(texts, full_texts)]


def never_exits(method: str) -> tuple[float, bool]:
    """(the threshold at which `method`'s rule never leaves early, whether higher thresholds are safer): each
    method's default grid ends at that value."""
    grid = get_method(method).thresholds
    return float(grid[-1]), grid[-1] > grid[0]


def per_caption_cider(
    references: Sequence[Sequence[str]] | dict, captions: Sequence[str], tokenize: Callable[[dict], dict] | None = None
) -> list[float]:
    """CIDEr of each caption against its references (pycocoevalcap's CIDEr-D, unscaled: 1.0 is 100 on the
    paper's scale). Document frequencies come from the references alone, so a caption's score does not depend on
    the other captions. `references` may be the tokenized dict an earlier call built (see `_tokenized`).
    `tokenize` maps {key: [text, ...]} to the same, tokenized (default: PTB, as the COCO evaluation does)."""
    from pycocoevalcap.cider.cider import Cider

    gts = references if isinstance(references, dict) else _tokenized(references, tokenize)
    if len(gts) != len(captions):
        raise ValueError(f"{len(captions)} captions but {len(gts)} reference lists")
    res = _tokenized([[c] for c in captions], tokenize)
    _, scores = Cider().compute_score(gts, res)  # one score per key, in `gts` order
    return [float(s) for s in scores]


def _tokenized(captions: Sequence[Sequence[str]], tokenize: Callable[[dict], dict] | None = None) -> dict:
    from .eval.captions import tokenize as ptb

    return (tokenize or ptb)(dict(enumerate(captions)))


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
        from .eval.vqa import vqa_scores

        return vqa_scores(texts, labels, metric=vqa_metric).per_question
    return per_caption_cider(labels, texts)


@dataclass(frozen=True)
class CalibrationOptions:
    """How thresholds are certified, and how the records are decoded for it: one set for `calibrate_exits` and for
    `place_exits`, which certifies every placement with it (at its own confidence)."""

    tolerance: float  # the risk a certified threshold stays below
    confidence: float  # with this probability
    loss: str = "consistency"  # see LOSSES
    thresholds: Sequence[float] | None = None  # None: the method's grid
    method: str = "free"
    vqa_metric: str = "vqa"
    config: DecodeConfig | None = None  # None: the task's default (as `evaluate`)
    prompt: str | None = None  # None: the task's
    batch_size: int = BATCH_SIZE

    def __post_init__(self) -> None:
        check_unit_interval("tolerance", self.tolerance)
        check_unit_interval("confidence", self.confidence)
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}: one of {LOSSES}")


def calibrate_exits(
    ee: EarlyExitVLM,
    processor,
    task: str,
    records: Sequence,
    options: CalibrationOptions,
    full_outputs: Sequence[str] | None = None,
    time_every_run: bool = False,
    progress: Callable[[str], None] | None = None,
    log: Callable[[str], PredictionLog] | None = None,
) -> tuple[Calibration | None, dict[float, EvalResult]]:
    """Run `ee` over `records` at each threshold of `options` (safest first) and certify thresholds with
    `calibrate_threshold`.

    Records are decoded as `evaluate` decodes them, with the options' `config`, `prompt` and `batch_size`. Losses
    are measured against the full model's outputs: `full_outputs` when given (already decoded, e.g. by an earlier
    call on the same records), otherwise the first run decodes the full model beside the exits. Captions and VQA
    decode every threshold together, image and prompt encoded once (`evaluate_many`: each threshold's outputs those
    of its own run; speed reports count tokens only), unless `time_every_run`, which decodes each threshold alone
    with the full model beside it, for measured (work and wall-clock) speedups. `log(name)`: the `PredictionLog`
    of each pass ("predictions" when shared, else "predictions_threshold_<t>"), so a run killed part-way resumes
    where it stopped. Under `accelerate launch` every process decodes its share of each run; the main process alone
    computes the losses and certifies (the others get None for the `Calibration`). `progress`: given (the command's
    main process), each threshold's risk is said and each pass shows a progress bar (records done, ETA)."""
    if not isinstance(options, CalibrationOptions):
        raise TypeError(f"options must be a CalibrationOptions, got {type(options).__name__}")
    loss, method, vqa_metric = options.loss, options.method, options.vqa_metric
    if not records:
        raise ValueError("the calibration set is empty: no records to run the exits on")
    labels = None
    if loss == "metric":
        _check_metric_labels(task, records)  # before any model runs
        labels = [r.answers for r in records] if task == "vqa" else _tokenized([r.references for r in records])
    safe, higher_is_safer = never_exits(method)
    grid = sorted(
        {float(t) for t in (get_method(method).thresholds if options.thresholds is None else options.thresholds)},
        reverse=higher_is_safer,
    )
    say = progress or (lambda msg: None)
    bar = progress is not None
    decoding = EvalOptions(
        config=options.config,
        method=method,
        prompt=options.prompt,
        batch_size=options.batch_size,
        progress_bar=bar,
        only=["CIDEr"] if task == "captions" else None,  # the sweep's score only: METEOR starts a JVM per call
    )
    results: dict[float, EvalResult] = {}
    full_texts = list(full_outputs) if full_outputs is not None else None
    if full_texts is not None and len(full_texts) != len(records):
        raise ValueError(f"{len(full_texts)} full-model outputs for {len(records)} records")
    full_metric = None
    main = Processes.current().is_main
    if full_texts is not None and loss == "metric" and main:
        full_metric = _metric_per_record(task, labels, full_texts, vqa_metric)
    losses: dict[float, list[float]] = {}
    runs = _runs(task, ee, processor, records, grid, full_texts is None, time_every_run, decoding, log)
    for t, result in zip(grid, runs):
        results[t] = result
        texts = [row["prediction"] for row in result.predictions]
        if full_texts is None:  # the first run decoded the full model too
            full_texts = [row["full_prediction"] for row in result.predictions]
            if loss == "metric" and main:
                full_metric = _metric_per_record(task, labels, full_texts, vqa_metric)
        if not main:  # under `accelerate launch`, the main process scores and certifies
            continue
        if loss == "consistency":
            losses[t] = consistency_losses(texts, full_texts)
        else:
            early = _metric_per_record(task, labels, texts, vqa_metric)
            losses[t] = [min(1.0, max(0.0, f - e)) for f, e in zip(full_metric, early)]
        say(
            f"threshold {t:g}: {loss} risk {sum(losses[t]) / len(losses[t]):.4f}, "
            f"analytic speedup {result.speed.analytic_speedup:.2f}x"
        )
    if not main:
        return None, results
    calibration = calibrate_threshold(
        losses, options.tolerance, options.confidence, higher_is_safer=higher_is_safer, fallback=safe
    )
    return calibration, results


def _runs(task, ee, processor, records, grid, need_full: bool, time_every_run: bool, decoding: EvalOptions, log):
    """Each threshold's `EvalResult`, in `grid` order: decoded all together (`evaluate_many`), unless
    `time_every_run`, which decodes them one by one, each timed against the full model; with `need_full` the full
    model's outputs come with the first."""
    if not time_every_run:
        rules = [(t, None) for t in grid]
        passes = log("predictions") if log else None
        yield from evaluate_many(task, ee, processor, records, rules, replace(decoding, compare_full=need_full), passes)
        return
    for t in grid:
        passes = log(f"predictions_threshold_{t:g}") if log else None
        yield evaluate(task, ee, processor, records, t, options=decoding, log=passes)


def certified_model(backbone: str | os.PathLike, exits: str | os.PathLike | None) -> dict[str, str | None]:
    """The folders a calibration ran, as its report records them (`reported_threshold` compares them so)."""
    return {
        name: None if path is None else str(Path(path).resolve())
        for name, path in (("backbone", backbone), ("exits", exits))
    }


def reported_threshold(
    report: str | os.PathLike, backbone: str | os.PathLike, exits: str | os.PathLike | None
) -> float:
    """The threshold a `freevlm calibrate` report (`--out`) certified for `backbone`'s `exits` (its fallback, which
    never exits early, where it certified none). A `ValueError` names the problem where the report is not one, or
    certified other folders: its guarantee holds for the model it ran, not for another."""
    try:
        fields = json.loads(Path(report).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{report} is not a `freevlm calibrate` report (a JSON file): {err}") from None
    if isinstance(fields, dict) and "chosen" in fields:
        raise ValueError(
            f"{report} is a `freevlm place-exits` report: its threshold is certified for the exits it chose, not for "
            "a folder of exits; give `freevlm calibrate`'s report for the exits you run"
        )
    if not isinstance(fields, dict) or not {"threshold", "certified", "backbone", "exits"} <= fields.keys():
        raise ValueError(
            f"{report} does not say which backbone and exits it certified (a report from before freevlm recorded "
            "them, or not `freevlm calibrate`'s): run `freevlm calibrate` again, or give the threshold as a number"
        )
    for name, path in certified_model(backbone, exits).items():
        if path != fields[name]:
            raise ValueError(
                f"{report} certified its threshold for {name} {fields[name]}, not for {path or 'none'}: its "
                "guarantee is for the model it ran; calibrate this one, or give the threshold as a number"
            )
    return float(fields["threshold"])
