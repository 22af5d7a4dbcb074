"""`freevlm eval` and `freevlm sweep` on a tiny BLIP-2 saved to disk, with fixture datasets in public formats."""

import argparse
import json
from types import SimpleNamespace

import dataset_files as files
import pytest
from cli_args import cli_args

from freevlm.cli import main
from freevlm.commands import evaluate as command
from freevlm.data.specs import DatasetSpec
from freevlm.decoding.config import DecodeConfig
from freevlm.eval.options import EvalOptions


@pytest.mark.slow
def test_eval_captions_cli(checkpoint, tmp_path, capsys):
    path = files.karpathy(tmp_path)
    out = tmp_path / "out"
    options = dict(format="coco-karpathy", files=path, images=tmp_path, split="train", out=out, threshold="0.0")
    code = main(cli_args("eval", checkpoint=checkpoint, **options, max_new_tokens=4, prompt="a photo of"))
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert result["task"] == "captions" and result["metric"] == "CIDEr"
    assert set(result["quality"]["all"]) >= {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"}
    assert result["speed"]["exit_histogram"] == {"1": result["speed"]["tokens"]}  # threshold 0: first exit
    assert result["speed"]["analytic_speedup"] == pytest.approx(2.0)
    assert len(json.loads((out / "predictions.json").read_text())) == 2  # train + restval
    assert "analytic speedup 2.00x" in capsys.readouterr().out


def test_sweep_vqa_cli(checkpoint, tmp_path):
    q, a = files.vqa(tmp_path)
    out = tmp_path / "out"
    options = dict(format="vqav2", files=[q, a], images=tmp_path / "val2014", dev_files=[q, a], thresholds=[0.5, 1.0])
    code = main(cli_args("sweep", checkpoint=checkpoint, **options, out=out, max_new_tokens=2))
    assert code == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["threshold"] for r in result["test"]] == [0.5, 1.0]
    assert [r["layer"] for r in result["per_layer"]] == [1, 2, 4]
    assert (out / "quality_vs_speedup.png").is_file() and (out / "per_layer.png").is_file()


def test_cli_names_a_broken_dataset(checkpoint, tmp_path, capsys):
    q, a = files.vqa(tmp_path)
    (tmp_path / "val2014" / "COCO_val2014_000000000073.jpg").unlink()
    options = dict(format="vqav2", files=[q, a], images=tmp_path / "val2014", out=tmp_path / "out")
    code = main(cli_args("eval", checkpoint=checkpoint, **options))
    assert code == 2
    err = capsys.readouterr().err
    assert "question #2 (id 730)" in err and "COCO_val2014_000000000073.jpg" in err


def test_each_flag_reaches_its_evaluation_option(tmp_path):
    """`eval`'s decode and run flags each land in their own `EvalOptions` field (the dataset's VQA metric too)."""
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    q, _ = files.vqa(tmp_path)
    required = ["--backbone", str(tmp_path), "--format", "gqa", "--files", str(q), "--images", str(tmp_path)]
    args = parser.parse_args(["eval", *required, "--out", str(tmp_path / "out")])
    gqa, recorded = DatasetSpec("gqa", [str(q)], str(tmp_path)), SimpleNamespace(prompt="a photo of")
    default = EvalOptions(DecodeConfig(max_new_tokens=10), progress_bar=True, metric="exact")  # answers: 10 tokens
    assert command.evaluation_options(args, gqa, recorded) == default
    given = ["--method", "pabee", "--max-new-tokens", "3", "--kv", "propagate", "--batch-size", "5", "--no-full"]
    given += ["--timing-repeats", "4", "--prompt", "q: {question}"]
    args = parser.parse_args(["eval", *required, "--out", str(tmp_path / "out"), *given])
    config = DecodeConfig(max_new_tokens=3, kv="propagate")
    expected = EvalOptions(config, "pabee", "q: {question}", 5, False, 4, progress_bar=True, metric="exact")
    assert command.evaluation_options(args, gqa, recorded) == expected
