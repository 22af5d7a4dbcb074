"""`freevlm train-baseline` end to end on a tiny BLIP-2: trains, resumes, and saves exits that load back."""

import json

import pytest
from cli_args import cli_args
from training_helpers import save_tiny_blip2, write_shapes

from freevlm import EarlyExitVLM
from freevlm.cli import main
from freevlm.loading import load_vlm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline_cli")
    return {"backbone": save_tiny_blip2(root / "backbone"), "captions": write_shapes(root / "data", 24)}


def _train(files, out, method, *extra):
    options = dict(method=method, backbone=files["backbone"], captions=files["captions"], exit_layers=[1, 2])
    options.update(output=out, batch_size=4, lr="1e-3", checkpoint_every=2, dev_fraction=0.25)
    return main(cli_args("train-baseline", *extra, **options, no_progress=True, no_tensorboard=True))


def test_train_baseline_trains_resumes_and_loads(files, tmp_path, capsys):
    run = tmp_path / "deeblip"
    assert _train(files, run, "deeblip", "--max-steps", "2") == 0
    assert _train(files, run, "deeblip", "--max-steps", "4", "--resume") == 0
    assert (run / "checkpoints/latest").read_text() == "step-00000004"
    info = json.loads((run / "method.json").read_text())
    assert info["method"] == "deeblip" and info["exit_layers"] == [1, 2]
    assert "ce/exit_1" in json.loads((run / "dev_metrics.json").read_text())
    ee = EarlyExitVLM.from_pretrained(load_vlm(files["backbone"]).model, run / "exits")
    assert ee.exit_config.kind == "linear"
    assert info["trainable_parameters"] == sum(p.numel() for p in ee.exits.parameters())  # the exits', nothing else

    assert _train(files, run, "pabee", "--max-steps", "6", "--resume") == 2  # another method's checkpoints
    assert "was trained as 'deeblip', not 'pabee'" in capsys.readouterr().err


def test_train_baseline_leeblip_learns_its_weights(files, tmp_path):
    run = tmp_path / "leeblip"
    assert _train(files, run, "leeblip", "--max-steps", "2", "--meta-fraction", "0.25", "--weight-lr", "0.5") == 0
    weights = json.loads((run / "method.json").read_text())["kd_weights"]
    assert set(weights) == {"1", "2"} and all(w != 1.0 for w in weights.values())
