"""Learn-then-Test threshold calibration: valid p-values, the guarantee checked by simulation against a naive
empirical rule, fixed-sequence behaviour and input errors."""

import math
import random
import re

import pytest

from freevlm.calibration import (
    binomial_cdf,
    binomial_p_value,
    calibrate_threshold,
    hoeffding_bentkus_p_value,
)

# thresholds of the confidence rule and the true risk (mean loss) of each; risk grows as the threshold drops
TRUE_RISK = {1.0: 0.0, 0.9: 0.02, 0.8: 0.05, 0.7: 0.08, 0.6: 0.12, 0.5: 0.2}
TOLERANCE, CONFIDENCE = 0.1, 0.9


def draw(n: int, rng: random.Random, binary: bool = True) -> dict[float, list[float]]:
    """n samples with the same per-sample draw under every threshold (as real exits share inputs): 0/1 losses
    `u < risk`, or bounded losses (v when u < 2 risk, else 0; v uniform) whose mean is also `risk`."""
    us = [rng.random() for _ in range(n)]
    if binary:
        return {t: [float(u < r) for u in us] for t, r in TRUE_RISK.items()}
    vs = [rng.random() for _ in range(n)]
    return {t: [v if u < 2 * r else 0.0 for u, v in zip(us, vs)] for t, r in TRUE_RISK.items()}


def naive_threshold(losses: dict[float, list[float]], tolerance: float) -> float:
    """The rule with no guarantee: the lowest threshold whose empirical risk is under the tolerance."""
    return min(t for t, v in losses.items() if sum(v) / len(v) <= tolerance)


def violation_rates(n: int, trials: int, binary: bool) -> tuple[float, float]:
    rng = random.Random(0)
    ltt = naive = 0
    for _ in range(trials):
        losses = draw(n, rng, binary)
        ltt += TRUE_RISK[calibrate_threshold(losses, TOLERANCE, CONFIDENCE).threshold] > TOLERANCE
        naive += TRUE_RISK[naive_threshold(losses, TOLERANCE)] > TOLERANCE
    return ltt / trials, naive / trials


@pytest.mark.parametrize("binary", [True, False], ids=["binomial", "hoeffding-bentkus"])
def test_violation_rate_within_one_minus_confidence_while_naive_rule_exceeds_it(binary):
    trials = 1000
    ltt, naive = violation_rates(n=100, trials=trials, binary=binary)
    slack = 3 * math.sqrt((1 - CONFIDENCE) * CONFIDENCE / trials)  # three binomial standard deviations
    assert ltt <= (1 - CONFIDENCE) + slack
    # threshold 0.6 (true risk 0.12) has empirical risk <= 0.1 about a quarter of the time at n=100
    assert naive > (1 - CONFIDENCE) + slack


def test_many_samples_certify_below_the_top_threshold():
    result = calibrate_threshold(draw(3000, random.Random(1)), TOLERANCE, CONFIDENCE)
    assert result.threshold == 0.7  # the most aggressive threshold whose true risk (0.08) is under 0.1
    assert result.certified == [1.0, 0.9, 0.8, 0.7]
    assert result.p_value == "binomial" and result.n == 3000
    bounded = calibrate_threshold(draw(3000, random.Random(1), binary=False), TOLERANCE, CONFIDENCE)
    assert bounded.p_value == "hoeffding-bentkus" and bounded.threshold <= 0.8


def test_binomial_tail_matches_closed_forms():
    assert binomial_cdf(0, 10, 0.2) == pytest.approx(0.8**10)
    assert binomial_cdf(3, 10, 0.5) == pytest.approx(sum(math.comb(10, i) for i in range(4)) / 2**10)
    assert binomial_cdf(10, 10, 0.3) == 1.0 and binomial_cdf(-1, 10, 0.3) == 0.0
    assert 0 < binomial_cdf(50, 100_000, 0.001) < 1e-7  # far tail at large n, no underflow to an error


def test_p_values_are_super_uniform_at_the_boundary():
    """At true risk == tolerance, P(p <= delta) <= delta: the p-values do not reject more often than allowed."""
    rng, n, delta, trials = random.Random(3), 60, 0.1, 2000
    hits_bin = hits_hb = 0
    for _ in range(trials):
        k = sum(rng.random() < TOLERANCE for _ in range(n))
        hits_bin += binomial_p_value(k, n, TOLERANCE) <= delta
        hits_hb += hoeffding_bentkus_p_value(k / n, n, TOLERANCE) <= delta
    slack = 3 * math.sqrt(delta * (1 - delta) / trials)
    assert hits_bin / trials <= delta + slack and hits_hb / trials <= delta + slack
    assert hits_hb <= hits_bin  # Hoeffding-Bentkus is the looser of the two on 0/1 losses


def test_fixed_sequence_stops_at_the_first_failure():
    n = 400
    losses = {1.0: [0.0] * n, 0.9: [1.0] * 80 + [0.0] * 320, 0.8: [0.0] * n}  # 0.9 fails; 0.8 alone would pass
    result = calibrate_threshold(losses, TOLERANCE, CONFIDENCE)
    assert result.certified == [1.0] and result.threshold == 1.0
    assert result.p_values[0.8] <= 1 - CONFIDENCE  # passes its own test, but comes after a failure
    assert [row["certified"] for row in result.as_dict()["per_threshold"]] == [True, False, False]


def test_nothing_certified_returns_the_fallback():
    losses = {1.0: [1.0, 0.0], 0.5: [1.0, 1.0]}
    result = calibrate_threshold(losses, 0.05, 0.95)
    assert result.certified == [] and result.threshold == 1.0
    assert "no threshold could be certified" in result.as_dict()["guarantee"]


def test_lower_is_safer_orders_tests_upwards():
    # an entropy rule: a token leaves when entropy < threshold, so 0 never exits early
    losses = {0.0: [0.0] * 200, 0.5: [0.0] * 200, 2.0: [1.0] * 200}
    result = calibrate_threshold(losses, 0.1, 0.9, higher_is_safer=False, fallback=0.0)
    assert result.tested == [0.0, 0.5, 2.0] and result.threshold == 0.5


@pytest.mark.parametrize(
    "losses, tolerance, confidence, message",
    [
        ({1.0: [0.0]}, 0.0, 0.9, "tolerance must be in (0, 1), got 0"),
        ({1.0: [0.0]}, 1.5, 0.9, "tolerance must be in (0, 1), got 1.5"),
        ({1.0: [0.0]}, 0.1, 1.0, "confidence must be in (0, 1), got 1"),
        ({1.0: [0.0]}, 0.1, -0.2, "confidence must be in (0, 1), got -0.2"),
        ({}, 0.1, 0.9, "no thresholds to calibrate"),
        ({1.0: [], 0.5: []}, 0.1, 0.9, "the calibration set is empty"),
        ({1.0: [0.0, 0.0], 0.5: [0.0]}, 0.1, 0.9, "sample counts differ: 0.5: 1, 1: 2"),
        ({1.0: [0.0, 1.2]}, 0.1, 0.9, "losses must lie in [0, 1]: threshold 1 has 1 outside"),
        ({1.0: [float("nan")]}, 0.1, 0.9, "losses must lie in [0, 1]"),
    ],
)
def test_bad_input_gets_one_clear_error(losses, tolerance, confidence, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        calibrate_threshold(losses, tolerance, confidence)


def test_binomial_p_value_refuses_bounded_losses():
    with pytest.raises(ValueError, match="binomial p-value needs 0/1 losses"):
        calibrate_threshold({1.0: [0.5]}, 0.1, 0.9, p_value="binomial")
