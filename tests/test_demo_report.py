"""The demo report: JSON round trip, Markdown numbers equal the results' values, one coloured span per token in the
HTML, and the page rendered by headless Chromium into a non-blank screenshot."""

import json
import re
import shutil
import subprocess

import pytest
from PIL import Image, ImageDraw, ImageStat

from freevlm.colours import FINAL_COLOUR, layer_colours
from freevlm.demo.report import write_report
from freevlm.demo.tables import fmt, fmt_speedup, fmt_threshold

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


def _caption_quality(cider, speedup, layers):
    full = {"BLEU-4": 0.612, "METEOR": 0.401, "CIDEr": 2.345, "ROUGE-L": 0.77, "exact_match": 0.35}
    free = {"BLEU-4": 0.598, "METEOR": 0.395, "CIDEr": cider, "exact_match": 0.33}
    return {
        "full": full,
        "free": free,
        "speed": _speed(speedup, speedup - 0.4) | {"mean_layers_per_token": layers},
        "agreement_with_full": 0.9,
        "spice": "unavailable: stanford-corenlp-3.6.0.jar missing",
    }


def _speed(analytic, decode):
    return {
        "analytic_speedup": analytic,
        "ideal_speedup": analytic - 0.2,
        "decode_speedup": decode,
        "wallclock_speedup": decode - 0.3,
        "mean_layers_per_token": 5.0,
        "exit_histogram": {"3": 120, "6": 30, "9": 10, "12": 50},
    }


def fake_results(out_dir):
    """A results dict in the pipeline's schema (`DemoResults`, serialized), with two drawn sample images."""
    (out_dir / "samples").mkdir(parents=True)
    for i, (colour, shape) in enumerate([((220, 30, 30), "circle"), ((30, 30, 220), "square")]):
        img = Image.new("RGB", (64, 64), (235, 235, 235))
        draw = ImageDraw.Draw(img)
        (draw.ellipse if shape == "circle" else draw.rectangle)((12, 16, 40, 44), fill=colour)
        draw.polygon([(44, 50), (60, 50), (52, 36)], fill=(30, 180, 30))
        img.save(out_dir / f"samples/{i}.png")
    words = [
        ("a", 3),
        ("large", 6),
        ("red", 3),
        ("circle", 12),
        ("to", 3),
        ("the", 3),
        ("left", 9),
        ("of", 3),
        ("a", 3),
        ("small", 12),
        ("green", 6),
        ("triangle", 12),
    ]
    return {
        "config": {"family": "opt", "quick": True, "seed": 0},
        "backbone": {
            "family": "opt",
            "num_layers": 12,
            "hidden_size": 256,
            "train_steps": 900,
            "train_seconds": 240.0,
            "vision_encoder": "EfficientNet-Lite0 (ImageNet weights, frozen)",
            "final_loss": 0.3127,
            "cached": False,
        },
        "exits": {
            "exit_layers": [3, 6, 9],
            "trainable_parameters": 2371584,
            "variants": {
                "free": {"anchor": "kd", "adversarial": True, "steps": 300, "seconds": 60.0},
                "free_no_adversarial": {"anchor": "kd", "adversarial": False, "steps": 300, "seconds": 41.5},
            },
        },
        "sweep": {
            "chosen_threshold": 0.8,
            "points": [
                {"threshold": t, "CIDEr": s, "analytic_speedup": a}
                for t, s, a in [(0.5, 1.9, 3.1), (0.8, 2.31, 2.4), (1.0, 2.35, 1.0)]
            ],
        },
        "captioning": {"test": _caption_quality(2.3311, 2.4, 5.125), "ood": _caption_quality(1.7, 2.2, 5.9)},
        "vqa": {
            "shapes": {"full_accuracy": 0.913, "free_accuracy": 0.905, "speed": _speed(2.6, 2.05)},
            "easyvqa": {"full_accuracy": 0.71, "free_accuracy": 0.7, "speed": _speed(1.9, 1.5)},
        },
        "speculative": {
            "threshold": 0.8,
            "decode_speedup": 1.63,
            "acceptance_rate": 0.912,
            "identical_to_full": True,
        },
        "ablation": [
            {"name": "free", "threshold": 0.8, "CIDEr": 2.31, "speed": _speed(2.4, 1.8), "trainable_parameters": None},
            {
                "name": "free_no_adversarial",
                "threshold": 0.9,
                "CIDEr": 2.2,
                "speed": _speed(1.9, 1.4),
                "trainable_parameters": None,
            },
        ],
        "per_layer": [{"layer": layer, "CIDEr": c} for layer, c in [(3, 0.8), (6, 1.5), (9, 2.0), (12, 2.35)]],
        "targets": [
            {
                "name": "measured decode speedup >= 2.0x at >= 99% of full CIDEr (test)",
                "met": False,
                "value": "2.00x at 99.4%",
            },
            {"name": "speculative >= 1.5x, identical captions", "met": True, "value": "1.63x, identical"},
        ],
        "samples": [
            {
                "image": "samples/0.png",
                "split": "test",
                "tokens": [{"text": w, "layer": la} for w, la in words],
                "full_caption": "a large red circle to the left of a small green triangle",
                "references": ["..."],
            },
            {
                "image": "samples/1.png",
                "split": "ood",
                "tokens": [{"text": w, "layer": la} for w, la in words[:4]],
                "full_caption": "a large blue square",
                "references": ["..."],
            },
        ],
        "speed_protocol": "batch 1, early exit and full model alternating",
        "timing": {"estimate": {"data": 2.0}, "stages": {"data": 3.0}, "total_seconds": 530.0},
        "methods": [
            {
                "name": "free",
                "threshold": 0.8,
                "CIDEr": 2.31,
                "speed": _speed(2.4, 1.8),
                "trainable_parameters": 2371584,
            },
            {"name": "pabee", "threshold": 0.7, "CIDEr": 2.25, "speed": _speed(2.9, 2.6), "trainable_parameters": 4096},
        ],
        "calibration": _calibration(),
        "placement": _placement(),
    }


def _calibration():
    per = [(0.95, 0.0, 2.7e-05, True, 1.1), (0.9, 0.02, 0.0019, True, 1.6), (0.8, 0.09, 0.45, False, 2.4)]
    return {
        "loss": "consistency",
        "loss_definition": "1 if the early-exit output differs from the full model's",
        "why": "It needs no labels.",
        "split": "calibration",
        "n": 100,
        "tolerance": 0.1,
        "confidence": 0.9,
        "p_value_method": "binomial",
        "guarantee": "the mean loss at threshold 0.9 exceeds 0.1 with probability at most 0.1",
        "certified_threshold": 0.9,
        "certified": True,
        "best_mean_dev_threshold": 0.8,
        "per_threshold": [
            {"threshold": t, "empirical_risk": r, "p_value": pv, "certified": c, "analytic_speedup": a}
            for t, r, pv, c, a in per
        ],
        "test": [
            {
                "rule": "certified (Learn-then-Test)",
                "threshold": 0.9,
                "test_risk": 0.03,
                "test_CIDEr": 2.34,
                "test_analytic_speedup": 1.7,
            },
            {
                "rule": "best mean dev CIDEr",
                "threshold": 0.8,
                "test_risk": 0.12,
                "test_CIDEr": 2.3311,
                "test_analytic_speedup": 2.4,
            },
        ],
        "seconds": 12.5,
    }


def _placement():
    def row(layers, threshold, certified, risk, speedup, **test):
        return {
            "layers": layers,
            "trainable_parameters": 789760 * len(layers),
            "threshold": threshold,
            "certified": certified,
            "risk": risk,
            "speedup": speedup,
            "speedups": {"analytic": speedup},
        } | test

    chosen = row([2, 6], 0.8, True, 0.04, 2.1, test_risk=0.05, test_CIDEr=2.29, test_analytic_speedup=2.05)
    fixed = row([3, 6, 9], 0.8, True, 0.03, 1.8, test_risk=0.04, test_CIDEr=2.3, test_analytic_speedup=1.75)
    alternatives = [{k: v for k, v in r.items() if not k.startswith("test")} for r in (chosen, fixed)]
    return {
        "exits_from": "free_candidates",
        "candidates": [2, 3, 6, 9],
        "budget_exits": 3,
        "speedup": "analytic",
        "thresholds": [0.5, 0.8],
        "n": 100,
        "tolerance": 0.1,
        "confidence": 0.9,
        "placements_tested": 14,
        "confidence_per_placement": 1 - 0.1 / 14,
        "guarantee": "exits [2, 6] at threshold 0.8 ...",
        "chosen": chosen,
        "fixed": fixed,
        "alternatives": [*alternatives, row([2], 1.0, False, None, 1.0)],
        "seconds": 31.0,
    }


def md_row(markdown, first_cells):
    """The cells of the Markdown table row that starts with `first_cells`."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[: len(first_cells)] == first_cells:
            return cells
    raise AssertionError(f"no row starting {first_cells}")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    results = fake_results(out)
    return results, write_report(results, out), out


def test_json_round_trips_and_files_exist(report):
    results, paths, out = report
    assert json.loads(paths["json"].read_text()) == results
    plots = {"quality_vs_speedup.png", "per_layer.png", "exit_histogram.png"}  # drawn from the results
    assert {p.name for p in paths.values()} == {"results.json", "report.md", "index.html", *plots}
    assert all(p.stat().st_size > 1000 for p in paths.values())
    assert not list(out.glob(".*.tmp"))


def test_markdown_numbers_are_the_results(report):
    results, paths, _ = report
    md = paths["markdown"].read_text()
    test = results["captioning"]["test"]
    full, free, speed = test["full"], test["free"], test["speed"]
    row = md_row(md, ["test", "FREE @ 0.8"])
    assert row[2:5] == [fmt(free["BLEU-4"]), fmt(free["METEOR"]), "n/a"]  # FREE has no ROUGE-L in the dict
    assert row[5] == fmt(free["CIDEr"]) == "2.331"
    assert row[7] == f"{100 * free['CIDEr'] / full['CIDEr']:.1f}%"
    assert row[8:] == [
        fmt_speedup(speed["analytic_speedup"]),
        fmt_speedup(speed["decode_speedup"]),
        fmt_speedup(speed["wallclock_speedup"]),
        fmt(speed["mean_layers_per_token"]),
    ]
    assert md_row(md, ["test", "full model"])[5] == fmt(full["CIDEr"])
    spec = results["speculative"]
    assert md_row(md, [fmt_threshold(spec["threshold"])]) == ["0.8", "1.63x", "0.912", "yes"]
    assert md_row(md, ["easy-VQA (external)"]) == ["easy-VQA (external)", fmt(0.71), fmt(0.7), "1.90x", "1.50x"]
    assert md_row(md, ["FREE without the adversarial term"]) == [
        "FREE without the adversarial term",
        "0.9",
        "2.200",
        "1.90x",
        "1.40x",
    ]
    assert md_row(md, ["0.8", "2.310"])[-1] == "chosen" and md_row(md, ["1", "2.350"])[-1] == ""
    assert md_row(md, ["12 (final)", "50"]) == ["12 (final)", "50", f"{100 * 50 / 210:.1f}%"]
    assert "2,371,584 trainable parameters" in md and "EfficientNet-Lite0 (ImageNet weights, frozen)" in md
    assert "**NOT met**: measured decode speedup" in md and "**met**: speculative" in md
    assert "SPICE on test: unavailable: stanford-corenlp-3.6.0.jar missing" in md
    assert "![sweep](quality_vs_speedup.png)" in md and "![per layer](per_layer.png)" in md
    assert "![exit histogram](exit_histogram.png)" in md and "[index.html](index.html)" in md
    assert md_row(md, ["pabee"]) == ["pabee", "0.7", "2.250", "2.90x", "2.60x", "4,096"]
    assert f"Measured speedup: {results['speed_protocol']}." in md


def test_certified_threshold_and_placement_beside_the_fixed_choices(report):
    results, paths, _ = report
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    c, p = results["calibration"], results["placement"]
    assert "## Threshold with a guarantee: certified 0.9 vs best mean dev 0.8" in md
    certified, best_mean = c["test"]
    assert md_row(md, ["certified (Learn-then-Test)"])[1:] == [
        "0.9",
        fmt(0.02),
        fmt(certified["test_risk"]),
        "yes",
        fmt(certified["test_CIDEr"]),
        "1.70x",
    ]
    assert md_row(md, ["best mean dev CIDEr"])[1:] == [
        "0.8",
        fmt(0.09),
        fmt(best_mean["test_risk"]),
        "no",
        "2.331",
        "2.40x",
    ]
    assert md_row(md, ["0.95", "0.000"]) == ["0.95", "0.000", "2.7e-05", "yes", "1.10x"]
    assert (
        "tolerance 0.1 and confidence 0.9 (binomial p-values" in md and c["guarantee"] in md and "needs no labels" in md
    )
    assert "## Exit placement: at most 3 exits from layers 2, 3, 6, 9" in md
    assert md_row(md, ["2, 6"]) == ["2, 6", "1,579,520", "0.8", "0.040", "2.10x", "0.050", "2.290", "chosen"]
    assert md_row(md, ["3, 6, 9"])[-3:] == [fmt(p["fixed"]["test_risk"]), "2.300", "the demo's fixed exits"]
    assert md_row(md, ["2"])[2:] == ["1 (none certified: never exit)", "n/a", "1.00x", "", "", ""]
    assert "14 sets of at most 3 exits" in md and "confidence 0.9929 (Bonferroni)" in md and "Added time: 31.0 s." in md
    assert "Exit placement: at most 3 exits" in page and "the demo&#x27;s fixed exits" in page


def test_html_colours_every_token_by_its_layer(report):
    results, paths, _ = report
    page = paths["html"].read_text()
    spans = re.findall(r'<span class="tok[^"]*" data-layer="(\d+)"[^>]*style="background:([^"]+)">([^<]*)</span>', page)
    tokens = [t for s in results["samples"] for t in s["tokens"]]
    assert [(int(layer), text) for layer, _, text in spans] == [(t["layer"], t["text"]) for t in tokens]
    colours = layer_colours([3, 6, 9], 12)
    assert all(colour == colours[int(layer)] for layer, colour, _ in spans)
    assert len(set(colours.values())) == 4 and colours[12] == FINAL_COLOUR
    assert "layer 12 (final: no early exit)" in page and 'src="samples/0.png"' in page
    assert page.count("same as full model") == 1 and page.count("differs from full model") == 1
    assert "http://" not in page and "https://" not in page  # self-contained


@pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary (Debian package `chromium`; scripts/setup.sh installs it as root)"
)
def test_headless_chromium_renders_a_non_blank_page(report, tmp_path):
    _, paths, _ = report
    shot = paths["html"].parent / "screenshot.png"
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,1600",
        paths["html"].resolve().as_uri(),
    ]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 1600)
    assert max(ImageStat.Stat(image).var) > 100  # not a blank page
    assert len(image.getcolors(1 << 24)) > 50  # text, token colours and images, not a flat fill


def test_missing_sections_are_skipped(tmp_path):
    paths = write_report({}, tmp_path / "empty")
    assert set(paths) == {"json", "markdown", "html"} and "## " not in paths["markdown"].read_text()
    partial = {
        "vqa": fake_results(tmp_path / "fake")["vqa"],
        "samples": [
            {
                "image": "a.png",
                "split": "test",
                "tokens": [{"text": "a", "layer": 2}, {"text": "b", "layer": 4}],
                "full_caption": "a b",
                "references": ["a b"],
            }
        ],
    }
    paths = write_report(partial, tmp_path / "partial")
    md, page = paths["markdown"].read_text(), paths["html"].read_text()
    assert md_row(md, ["shapes VQA"])[1] == "0.913" and "## Captioning" not in md and "exit_histogram" not in md
    assert set(paths) == {"json", "markdown", "html"}  # no data for any plot
    assert re.findall(r'data-layer="(\d)"', page) == ["2", "4"] and "final: no early exit" in page  # 4: highest seen
