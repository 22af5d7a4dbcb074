"""`freevlm demo --quick` end to end: trains, evaluates, writes the report; the Markdown says what the JSON says,
the threshold certification is Learn-then-Test's, and a second run reuses the cache and measures the same."""

import json
import math

import pytest

from freevlm.cli import main
from freevlm.commands import serve
from freevlm.demo.config import DemoConfig
from freevlm.demo.tables import fmt, fmt_speedup, fmt_threshold
from freevlm.demo.train import PlacementRecord, read_placement, trained_model
from freevlm.eval.evaluate import CAPTION_PROMPT
from freevlm.loading import TrainingPrompt


def certification_errors(c: dict) -> list[str]:
    """Where the results' certification is not Learn-then-Test's, recomputed from its per-threshold risks: the exact
    binomial p-value of each observed risk, fixed-sequence testing from the safest threshold down, and the last
    threshold certified returned (1.0, never exiting early, when none is)."""
    n, tolerance, delta = c["n"], c["tolerance"], 1 - c["confidence"]
    errors, testing, certified = [], True, []
    for row in sorted(c["per_threshold"], key=lambda r: -r["threshold"]):
        k = round(row["empirical_risk"] * n)
        p = sum(math.comb(n, i) * tolerance**i * (1 - tolerance) ** (n - i) for i in range(k + 1))
        testing = testing and p <= delta
        certified += [row["threshold"]] if testing else []
        if not math.isclose(row["p_value"], p, rel_tol=1e-9) or row["certified"] != testing:
            errors.append(f"threshold {row['threshold']}: p {row['p_value']} (expected {p}), certified {testing}")
    expected = certified[-1] if certified else 1.0
    if c["certified_threshold"] != expected or c["certified"] != bool(certified):
        errors.append(f"certified threshold {c['certified_threshold']} (expected {expected})")
    return errors


def times_aside(results: dict) -> dict:
    """The results without what depends on the clock (times, measured speedups, targets) or on the cache."""
    if isinstance(results, dict):
        clock = ("seconds", "decode_speedup", "wallclock_speedup", "timing", "targets", "cached")
        return {k: times_aside(v) for k, v in results.items() if not any(c in k for c in clock)}
    return [times_aside(v) for v in results] if isinstance(results, list) else results


@pytest.mark.slow
def test_quick_demo_writes_a_consistent_report(tmp_path, monkeypatch):
    out, cache = tmp_path / "report", tmp_path / "cache"
    assert main(["demo", "--quick", "--out", str(out), "--cache", str(cache)]) == 0
    for name in ("report.md", "results.json", "index.html", "quality_vs_speedup.png", "per_layer.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    test = results["captioning"]["test"]
    for value in (test["full"]["CIDEr"], test["free"]["CIDEr"], test["free"]["METEOR"], test["free"]["BLEU-4"]):
        assert fmt(value) in report
    for value in (test["speed"]["analytic_speedup"], test["speed"]["decode_speedup"]):
        assert fmt_speedup(value) in report
    assert fmt_speedup(results["speculative"]["decode_speedup"]) in report
    chosen = results["sweep"]["chosen_threshold"]
    assert f"chosen threshold {fmt_threshold(chosen)}" in report
    assert results["speculative"]["identical_to_full"] is True  # lossless, whatever the threshold
    assert set(results["vqa"]) == {"shapes", "easyvqa"}
    assert results["samples"] and (out / results["samples"][0]["image"]).is_file()
    calibration, placement = results["calibration"], results["placement"]  # Learn-then-Test on 48 calibration images
    assert calibration["n"] == placement["n"] == 48 and calibration["loss"] == "consistency"
    assert certification_errors(calibration) == []
    certified = calibration["certified_threshold"]
    assert f"certified {fmt_threshold(certified)} vs best mean dev {fmt_threshold(chosen)}" in report
    assert [(r["rule"], r["threshold"]) for r in calibration["test"]] == [
        ("certified (Learn-then-Test)", certified),
        ("best mean dev CIDEr", chosen),
    ]
    for row in calibration["test"]:  # no caption differs from the full model's: the same CIDEr
        assert row["test_risk"] > 0 or row["test_CIDEr"] == pytest.approx(test["full"]["CIDEr"], abs=1e-9)
    assert placement["placements_tested"] == 7 and placement["fixed"]["layers"] == [1, 3, 6]  # subsets of (1, 3, 6)
    assert fmt_speedup(placement["chosen"]["speedup"]) in report
    # what `freevlm serve` finds in the cache, with the prompt its captions were trained after
    backbone, exits = trained_model(DemoConfig.quick_config(cache=str(cache)))
    assert TrainingPrompt.read(backbone) == CAPTION_PROMPT and (exits / "exits_config.json").is_file()
    # and the exits it serves: those the placement chose (recorded in the cache), not the fixed ones, at the
    # threshold it certified for them
    chosen = placement["chosen"]
    assert read_placement(exits) == PlacementRecord(tuple(chosen["layers"]), chosen["threshold"], chosen["certified"])
    monkeypatch.setenv("FREEVLM_CACHE", str(cache))
    served = serve.demo_model()
    assert served.layers == tuple(chosen["layers"])
    assert served.threshold == (chosen["threshold"] if chosen["certified"] else None)
    # a second run reuses the trained backbone and exits, and measures the same
    assert main(["demo", "--quick", "--out", str(out), "--cache", str(cache)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["backbone"]["cached"] is True
    assert times_aside(again) == times_aside(results)
