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
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
            return (f"no threshold could be certified at risk <= {self.tolerance:g} with confidence "
                    f"{self.confidence:g} from {self.n} samples; {self.fallback:g} (never exit early) is returned")  # fmt: skip
        return (f"if the {self.n} calibration samples and future inputs are i.i.d. from one distribution, the mean "
                f"loss at threshold {self.threshold:g} exceeds {self.tolerance:g} with probability at most "
                f"{1 - self.confidence:.3g} over the draw of the calibration set")  # fmt: skip

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
            "per_threshold": [{"threshold": t, "empirical_risk": self.risks[t], "p_value": self.p_values[t],
                               "certified": t in self.certified} for t in self.tested],  # fmt: skip
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
        raise ValueError("every threshold needs the same calibration samples, but sample counts differ: "
                         + ", ".join(f"{t:g}: {c}" for t, c in sorted(counts.items())))  # fmt: skip
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
