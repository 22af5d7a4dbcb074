"""Where the training commands write (issue 14, "work lost"): every combination of the switches that changes it -
TensorBoard on or off, a new, nested or existing --output, the dev split (held out, --dev-captions, none), fewer or
more steps than --checkpoint-every, --resume - ends with the model on disk, and nothing the user had is lost."""

import itertools

import pytest
from cli_args import cli_args
from training_helpers import save_tiny_blip2, write_shapes

from freevlm.cli import main

PRODUCTS = {
    "finetune": ["model/config.json", "model/model.safetensors", "model/tokenizer.json"],
    "train-exits": ["exits/exits.safetensors", "exits/exits_config.json"],
    "train-baseline": ["exits/exits.safetensors", "method.json"],
}
EXTRA = {
    "finetune": [],
    "train-exits": ["--exit-layers", "2", "--disc-hidden", "8"],
    "train-baseline": ["--exit-layers", "2", "--method", "deeblip"],
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_folder")
    return {
        "backbone": save_tiny_blip2(root / "backbone"),
        "captions": write_shapes(root / "data", 10),
        "dev": write_shapes(root / "dev", 3, seed=1),
    }


def train(files, command, output, *args, max_steps=2):
    options = dict(backbone=files["backbone"], captions=files["captions"], output=output, batch_size=2)
    return main(cli_args(command, *EXTRA[command], *args, **options, max_steps=max_steps, no_progress=True, cpu=True))


def assert_finished(output, command, dev: bool, tensorboard: bool):
    for name in PRODUCTS[command]:
        assert (output / name).is_file(), f"{command} finished without {name}"
    assert (output / "checkpoints" / "latest").is_file()
    assert (output / "dev_metrics.json").is_file() == dev
    assert (output / "tensorboard").is_dir() == tensorboard


@pytest.mark.parametrize(
    "command, tensorboard, checkpoint_every, dev, output",
    [
        (c, *rest)
        for c in ("finetune", "train-exits")
        for rest in itertools.product(
            (True, False), (1, 500), ("held-out", "dev-captions", "none"), ("nested", "existing")
        )
    ]
    + [("train-baseline", False, 500, dev, "nested") for dev in ("held-out", "none")],
)
def test_a_finished_run_leaves_its_model_whatever_the_switches(
    files, tmp_path, command, tensorboard, checkpoint_every, dev, output
):
    out = tmp_path / "runs" / "a" / "b" if output == "nested" else tmp_path
    keep = tmp_path / "notes.txt"  # the user's own file in the folder
    keep.write_text("mine")
    args = ["--checkpoint-every", str(checkpoint_every)] + ([] if tensorboard else ["--no-tensorboard"])
    args += {"held-out": [], "dev-captions": ["--dev-captions", str(files["dev"])], "none": ["--dev-fraction", "0"]}[
        dev
    ]
    assert train(files, command, out, *args) == 0
    assert_finished(out, command, dev != "none", tensorboard)
    assert keep.read_text() == "mine"


@pytest.mark.parametrize("command", ["finetune", "train-exits"])
def test_resume_continues_and_leaves_the_model(files, tmp_path, command, capsys):
    out = tmp_path / "new" / "run"
    assert train(files, command, out, "--no-tensorboard") == 0
    assert train(files, command, out, "--no-tensorboard") == 2  # a new run refuses the folder: nothing replaced
    assert "already holds checkpoints" in capsys.readouterr().err
    assert train(files, command, out, "--no-tensorboard", "--resume", max_steps=3) == 0
    assert (out / "checkpoints" / "latest").read_text() == "step-00000003"
    assert_finished(out, command, dev=True, tensorboard=False)


@pytest.mark.parametrize("command", ["finetune", "train-exits"])
def test_a_new_run_refuses_a_folder_holding_a_model(files, tmp_path, command, capsys):
    product = tmp_path / PRODUCTS[command][0]
    product.parent.mkdir(parents=True)
    product.write_text("the user's earlier result")
    assert train(files, command, tmp_path) == 2
    err = capsys.readouterr().err
    assert "already holds" in err and product.parts[-2] in err
    assert product.read_text() == "the user's earlier result"


def test_output_that_is_a_file_is_refused_at_parse_time(files, tmp_path, capsys):
    file = tmp_path / "run"
    file.write_text("x")
    with pytest.raises(SystemExit) as exit_:
        train(files, "finetune", file)
    assert exit_.value.code == 2
    assert "is an existing file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train(files, "finetune", file / "sub")
    assert "is a file, not a folder" in capsys.readouterr().err
