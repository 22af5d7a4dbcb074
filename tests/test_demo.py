"""`freevlm demo --quick` end to end: trains, evaluates, writes the report; the Markdown says what the JSON says."""

import json

import pytest

from freevlm.cli import main
from freevlm.demo.report import fmt, fmt_speedup, fmt_threshold


@pytest.mark.slow
def test_quick_demo_writes_a_consistent_report(tmp_path):
    out, cache = tmp_path / "report", tmp_path / "cache"
    assert main(["demo", "--quick", "--out", str(out), "--cache", str(cache)]) == 0
    for name in ("report.md", "results.json", "index.html", "quality_vs_speedup.png", "per_layer.png"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    test = results["captioning"]["test"]
    for value in (test["full"]["CIDEr"], test["free"]["CIDEr"], test["free"]["METEOR"], test["free"]["BLEU-4"]):
        assert fmt(value) in report
    for value in (
        test["free"]["analytic_speedup"],
        test["free"]["measured_decode_speedup"],
        results["speculative"]["measured_decode_speedup"],
    ):
        assert fmt_speedup(value) in report
    assert f"chosen threshold {fmt_threshold(results['sweep']['chosen_threshold'])}" in report
    assert results["speculative"]["identical_to_full"] is True  # lossless, whatever the threshold
    assert set(results["vqa"]) == {"shapes", "easyvqa"}
    assert results["samples"] and (out / results["samples"][0]["image"]).is_file()
    calibration, placement = results["calibration"], results["placement"]  # Learn-then-Test on 48 calibration images
    assert calibration["n"] == placement["n"] == 48 and calibration["loss"] == "consistency"
    assert (
        f"certified {fmt_threshold(calibration['certified_threshold'])} vs best mean dev "
        f"{fmt_threshold(results['sweep']['chosen_threshold'])}"
    ) in report
    assert all(0.0 <= row["test_risk"] <= 1.0 for row in calibration["test"])
    assert placement["placements_tested"] == 7 and placement["fixed"]["layers"] == [1, 3, 6]  # subsets of (1, 3, 6)
    assert fmt_speedup(placement["chosen"]["speedup"]) in report
    # a second run reuses the trained backbone and exits
    assert main(["demo", "--quick", "--out", str(out), "--cache", str(cache)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["backbone"]["cached"] is True
    assert again["captioning"]["test"]["free"]["CIDEr"] == test["free"]["CIDEr"]
