"""`freevlm calibrate` on a tiny BLIP-2 saved to disk: the calibration JSON, and one clear error per bad input."""

import json
import math
import re
from pathlib import Path

import dataset_files as files
import pytest
from cli_args import cli_args

from freevlm.calibration import CalibrationOptions, calibrate_exits, consistency_losses, never_exits, per_caption_cider
from freevlm.cli import main
from freevlm.errors import UserError
from freevlm.eval.vqa import vqa_accuracy


def _args(checkpoint, tmp_path, *extra):
    q, a = files.vqa(tmp_path)
    options = dict(format="vqav2", files=[q, a], images=tmp_path / "val2014", max_new_tokens=2)
    return cli_args("calibrate", *extra, checkpoint=checkpoint, **options, out=tmp_path / "calib" / "calib.json")


@pytest.mark.parametrize("tolerance", [0.7, 0.99])  # on this model: threshold 0 refused at 0.7, certified at 0.99
def test_calibrate_certifies_by_the_binomial_test_of_the_measured_risk(checkpoint, tmp_path, capsys, tolerance):
    argv = _args(
        checkpoint, tmp_path, "--thresholds", "0.0", "1.0", "--tolerance", str(tolerance), "--confidence", "0.9"
    )
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "calib" / "calib.json").read_text())
    assert report["loss"] == "consistency" and report["method"] == "free" and report["task"] == "vqa"
    assert report["n"] == 3 and report["tolerance"] == tolerance and report["confidence"] == 0.9
    assert report["p_value_method"] == "binomial"
    assert report["tested_order"] == [1.0, 0.0]  # safest first
    top, low = report["per_threshold"]
    # 1.0 never exits early, so it matches the full model on all 3 questions: p = P(Bin(3, tolerance) <= 0)
    assert top["empirical_risk"] == 0.0 and top["p_value"] == pytest.approx((1 - tolerance) ** 3) and top["certified"]
    assert top["analytic_speedup"] == pytest.approx(1.0)
    assert low["analytic_speedup"] == pytest.approx(2.0)  # threshold 0: every token leaves at exit 1 of 4 layers
    # threshold 0's consistency risk, measured apart: `freevlm eval` there beside the full model
    evaluated = tmp_path / "eval"
    argv = _args(checkpoint, tmp_path, "--threshold", "0.0")
    argv[0], argv[argv.index("--out") + 1] = "eval", str(evaluated)
    assert main(argv) == 0
    predictions = json.loads((evaluated / "predictions.json").read_text())
    differ = sum(p["prediction"] != p["full_prediction"] for p in predictions)
    assert low["empirical_risk"] == pytest.approx(differ / 3)
    p_low = sum(math.comb(3, i) * tolerance**i * (1 - tolerance) ** (3 - i) for i in range(differ + 1))
    assert low["p_value"] == pytest.approx(p_low)  # P(Bin(3, tolerance) <= differ)
    certified = [1.0, 0.0] if p_low <= 0.1 else [1.0]  # fixed sequence: 1.0 (p <= 0.027) first, then 0.0
    assert report["certified"] == certified and report["threshold"] == certified[-1]
    assert [row["certified"] for row in report["per_threshold"]] == [True, p_low <= 0.1]
    assert "with probability at most 0.1" in report["guarantee"]
    assert f"certified threshold: {certified[-1]:g}" in printed


def test_calibrate_certifies_nothing_when_the_safest_threshold_fails(checkpoint, tmp_path, capsys):
    """At confidence 0.99 even risk 0 on 3 questions fails (p = 0.3^3 = 0.027 > 0.01): nothing is certified, and
    the threshold that never exits early is returned."""
    code = main(_args(checkpoint, tmp_path, "--thresholds", "0.0", "1.0", "--tolerance", "0.7", "--confidence", "0.99"))
    assert code == 0
    report = json.loads((tmp_path / "calib" / "calib.json").read_text())
    assert report["certified"] == [] and report["threshold"] == 1.0
    assert report["per_threshold"][0]["empirical_risk"] == 0.0 and report["analytic_speedup"] == 1.0
    assert "certified threshold: none; use 1 (never exit early)" in capsys.readouterr().out


def test_calibrate_metric_loss_against_the_full_model(checkpoint, tmp_path):
    """The metric loss is the drop of a question's VQA accuracy below the full model's, clipped at 0: answers are
    rewritten around the outputs of `freevlm eval` at threshold 0 (2 humans give the full model's answer, 1 the early
    exit's), so the drop (0.3 where they differ), 1 - accuracy and the consistency loss all differ."""
    evaluated = tmp_path / "eval"
    argv = _args(checkpoint, tmp_path, "--threshold", "0.0")
    argv[0], argv[argv.index("--out") + 1] = "eval", str(evaluated)
    assert main(argv) == 0
    said = {
        p["id"]: (p["prediction"], p["full_prediction"])
        for p in json.loads((evaluated / "predictions.json").read_text())
    }
    calibrate = _args(checkpoint, tmp_path, "--loss", "metric", "--thresholds", "0.0", "1.0", "--tolerance", "0.5")
    annotations = Path(calibrate[calibrate.index("--files") + 2])  # written again by `_args`: rewritten after it
    data = json.loads(annotations.read_text())
    drops, others = [], []  # the metric loss by hand; the consistency loss and 1 - accuracy, which it is not
    for ann in data["annotations"]:
        early, full = said[ann["question_id"]]
        humans = ([full, full] + ([early] if early != full else []) + ["zebra"] * 10)[:10]
        ann["answers"] = [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(humans)]
        drops.append(max(0.0, vqa_accuracy(full, humans) - vqa_accuracy(early, humans)))
        others.append((float(early != full), 1 - vqa_accuracy(early, humans)))
    annotations.write_text(json.dumps(data))
    assert sum(drops) > 0 and all(drops != list(loss) for loss in zip(*others))

    assert main(calibrate) == 0
    report = json.loads((tmp_path / "calib" / "calib.json").read_text())
    assert report["loss"] == "metric" and "VQA accuracy" in report["loss_definition"]
    top, low = report["per_threshold"]
    assert top["threshold"] == 1.0 and top["empirical_risk"] == 0.0  # the full model loses nothing to itself
    assert low["threshold"] == 0.0 and low["empirical_risk"] == pytest.approx(sum(drops) / 3)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tolerance", "0"], "argument --tolerance: must be a finite number in (0, 1), got '0'"),
        (["--tolerance", "1.2"], "argument --tolerance: must be a finite number in (0, 1), got '1.2'"),
        (["--confidence", "1"], "argument --confidence: must be a finite number in (0, 1), got '1'"),
        (["--confidence", "-0.5"], "argument --confidence: must be a finite number in (0, 1), got '-0.5'"),
        (["--confidence", "nan"], "argument --confidence: must be a finite number in (0, 1), got 'nan'"),
    ],
)
def test_bad_tolerance_or_confidence_fails_before_loading(tmp_path, capsys, extra, message):
    args = _args(tmp_path / "no-such-checkpoint", tmp_path, *extra)
    with pytest.raises(SystemExit) as exit_:  # refused while parsing, as every number is
        main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_empty_calibration_set_is_an_error(checkpoint, tmp_path, capsys):
    q = files.write_json(tmp_path / "questions.json", {"questions": []})
    args = cli_args(
        "calibrate", checkpoint=checkpoint, format="vqav2", files=q, images=tmp_path, out=tmp_path / "c.json"
    )
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "questions.json: no records" in err  # the reader refuses it, naming the file
    assert not (tmp_path / "c.json").exists()


def test_calibrate_exits_refuses_no_records():
    with pytest.raises(ValueError, match="the calibration set is empty"):
        calibrate_exits(None, None, "vqa", [], CalibrationOptions(tolerance=0.1, confidence=0.9))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(tolerance=1.5, confidence=0.9), "tolerance"),
        (dict(tolerance=0.1, confidence=-0.1), "confidence"),
        (dict(tolerance=0.1, confidence=0.9, loss="bleu"), "unknown loss 'bleu'"),
    ],
)
def test_calibration_options_are_checked_when_made(options, message):
    with pytest.raises(ValueError, match=message):
        CalibrationOptions(**options)


def test_metric_loss_needs_labels(checkpoint, tmp_path, capsys):
    q, _ = files.vqa(tmp_path)
    options = dict(format="vqav2", files=q, images=tmp_path / "val2014", loss="metric", thresholds=1.0)
    args = cli_args("calibrate", checkpoint=checkpoint, **options, max_new_tokens=1, out=tmp_path / "c.json")
    assert main(args) == 2
    assert "--loss metric needs an answer for every calibration question" in capsys.readouterr().err


def test_consistency_loss_is_one_where_the_output_differs_from_the_full_models():
    assert consistency_losses(["a red square", "a circle"], ["a red square", "a blue circle"]) == [0.0, 1.0]
    with pytest.raises(ValueError, match="2 outputs but 1 full-model outputs"):
        consistency_losses(["a", "b"], ["a"])


def test_per_caption_cider_scores_each_caption_alone():
    refs = [["a red square", "a square"], ["a blue circle", "a circle"]]
    good = per_caption_cider(refs, ["a red square", "a blue circle"])
    mixed = per_caption_cider(refs, ["a red square", "two green triangles"])
    assert good[0] > 0 and good[1] > 0 and mixed[1] == 0.0
    assert mixed[0] == pytest.approx(good[0])  # document frequencies come from the references only


@pytest.mark.slow
def test_calibrate_captions_with_the_cider_drop(checkpoint, tmp_path):
    path = files.karpathy(tmp_path)
    out = tmp_path / "c.json"
    options = dict(format="coco-karpathy", files=path, images=tmp_path, split="train", loss="metric", thresholds=[0, 1])
    code = main(cli_args("calibrate", checkpoint=checkpoint, **options, max_new_tokens=3, out=out))
    assert code == 0
    report = json.loads(out.read_text())
    assert report["task"] == "captions" and report["n"] == 2 and "CIDEr" in report["loss_definition"]
    assert report["per_threshold"][0]["empirical_risk"] == 0.0
    assert report["certified"] == [] and report["threshold"] == 1.0  # 2 captions cannot certify 5% at 95%


def test_each_method_is_tested_from_its_never_exit_end():
    assert never_exits("free") == (1.0, True)  # max probability >= 1.0 never leaves early
    assert never_exits("deeblip_entropy") == (0.0, False)  # entropy < 0 never holds: lower is safer
    assert never_exits("pabee") == (1000.0, True)


def test_caption_and_serve_take_the_threshold_a_report_certified(checkpoint, tmp_path, capsys):
    """`--threshold calib.json`: the threshold `calibrate` certified for these folders (0.0 at tolerance 0.99, where
    every token leaves at the first exit; at 1.0 none does, so the check can fail); a report for other exits, one
    that does not say which it certified, or a place-exits report is refused, naming why."""
    import argparse
    import shutil

    from freevlm.commands import serve

    argv = _args(checkpoint, tmp_path, "--thresholds", "0.0", "1.0", "--tolerance", "0.99", "--confidence", "0.9")
    assert main(argv) == 0
    report = tmp_path / "calib" / "calib.json"
    assert json.loads(report.read_text())["threshold"] == 0.0
    image = next((tmp_path / "val2014").iterdir())
    capsys.readouterr()

    def caption(threshold, exits=checkpoint / "exits") -> tuple[int, list[str]]:
        argv = cli_args("caption", "--trace", checkpoint=checkpoint, exits=exits, image=image, threshold=threshold)
        argv += ["--max-new-tokens", "4"]
        code = main(argv)
        captured = capsys.readouterr()
        lines = [re.sub(r", [\d.]+s$", "", line) for line in captured.out.splitlines()]  # the time taken aside
        return code, lines if code == 0 else [captured.err]

    code, lines = caption(report)
    assert code == 0 and lines[0] == f"threshold 0, certified by {report}"
    assert lines[1:] == caption(0.0)[1] != caption(1.0)[1]

    other = tmp_path / "other_exits"
    shutil.copytree(checkpoint / "exits", other)
    code, (err,) = caption(report, exits=other)
    assert code == 2 and f"certified its threshold for exits {(checkpoint / 'exits').resolve()}, not for" in err
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"threshold": 0.5, "certified": [1.0, 0.5]}))
    assert "does not say which backbone and exits it certified" in caption(old)[1][0]
    placed = tmp_path / "placed.json"
    placed.write_text(json.dumps({"chosen": {"layers": [1], "threshold": 0.5}}))
    assert "is a `freevlm place-exits` report" in caption(placed)[1][0]
    placed.write_text("[0.5]")
    assert "does not say which backbone and exits it certified" in caption(placed)[1][0]
    placed.write_text("0.5 or so")
    assert "is not a `freevlm calibrate` report (a JSON file)" in caption(placed)[1][0]
    with pytest.raises(SystemExit):
        caption(tmp_path / "missing.json")
    assert "must be a number in [0, 1] or a `freevlm calibrate` report" in capsys.readouterr().err

    parser = argparse.ArgumentParser()
    serve.register(parser.add_subparsers())
    served = cli_args("serve", checkpoint=checkpoint, threshold=report)
    assert serve.server_config(parser.parse_args(served)).threshold == 0.0
    with pytest.raises(UserError, match="needs the --backbone and --exits it certified"):
        serve.server_config(parser.parse_args(["serve", "--threshold", str(report)]))
