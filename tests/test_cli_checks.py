"""Bad input to the commands (issue 14): one error line that names the problem, exit code 2, before any work.

Most cases fail while the command line is parsed or before any weights load, so they take milliseconds."""

import json
import shutil
import struct
import zlib

import pytest
import torch
from cli_args import cli_args
from PIL import Image
from training_helpers import save_tiny_blip2, write_shapes

from freevlm.cli import main
from freevlm.errors import MissingFileError, UserError


def run(argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of `freevlm argv`, whether argparse exits or the command returns."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks")
    return {"backbone": save_tiny_blip2(root / "backbone"), "captions": write_shapes(root / "data", 6), "root": root}


def train_argv(files, command="finetune", output=None, *extra):
    output = output or files["root"] / "never"
    options = dict(backbone=files["backbone"], captions=files["captions"], output=output)
    return cli_args(command, *extra, **options, no_progress=True, cpu=True, batch_size=2)


EXIT_ARGS = ("--exit-layers", "2", "--disc-hidden", "8")

# (command and its required arguments, the bad option, what the message must say)
PARSE_CASES = [
    ("finetune", ["--lr", "inf"], "argument --lr: must be a finite number > 0, got 'inf'"),
    ("finetune", ["--lr", "0"], "argument --lr: must be a finite number > 0"),
    ("finetune", ["--lr", "nan"], "argument --lr: must be a finite number > 0"),
    ("finetune", ["--epochs", "0"], "argument --epochs: must be a whole number >= 1, got '0'"),
    ("finetune", ["--log-every", "0"], "argument --log-every: must be a whole number >= 1"),
    ("finetune", ["--checkpoint-every", "0"], "argument --checkpoint-every: must be a whole number >= 1"),
    ("finetune", ["--batch-size", "-1"], "argument --batch-size: must be a whole number >= 1"),
    ("finetune", ["--dev-fraction", "-0.1"], "argument --dev-fraction: must be a finite number in [0, 1)"),
    ("finetune", ["--dev-fraction", "1"], "argument --dev-fraction: must be a finite number in [0, 1)"),
    ("finetune", ["--grad-clip", "nan"], "argument --grad-clip: must be a finite number >= 0"),
    ("finetune", ["--weight-decay", "-1"], "argument --weight-decay: must be a finite number >= 0"),
    ("train-exits", ["--adv-weight", "nan", *EXIT_ARGS], "argument --adv-weight: must be a finite number >= 0"),
    (
        "train-exits",
        ["--disc-hidden", "0", "--exit-layers", "2"],
        "argument --disc-hidden: must be a whole number >= 1",
    ),
    ("train-exits", ["--d-warn-window", "0", *EXIT_ARGS], "argument --d-warn-window: must be a whole number >= 1"),
    ("train-exits", ["--temperature", "0", *EXIT_ARGS], "argument --temperature: must be a finite number > 0"),
    ("train-exits", ["--exit-layers", "0"], "argument --exit-layers: must be a whole number >= 1"),
    (
        "train-baseline",
        ["--method", "leeblip", "--exit-layers", "2", "--meta-fraction", "1"],
        "argument --meta-fraction: must be a finite number in (0, 1)",
    ),
]


@pytest.mark.parametrize("command, bad, message", PARSE_CASES)
def test_training_numbers_are_refused_at_parse_time(files, command, bad, message, capsys):
    code, err = run(train_argv(files, command, None, *bad), capsys)
    assert code == 2 and message in err
    assert not (files["root"] / "never").exists()


def eval_argv(files, command="eval", *extra, out=None):
    return [
        command,
        "--backbone",
        str(files["backbone"]),
        "--method",
        "mue",
        "--format",
        "coco",
        "--files",
        str(files["captions"]),
        "--images",
        str(files["captions"].parent),
        "--out",
        str(out or files["root"] / "never"),
        *extra,
    ]


@pytest.mark.parametrize(
    "bad, message",
    [
        (["--limit", "0"], "argument --limit: must be a whole number >= 1, got '0'"),
        (["--batch-size", "0"], "argument --batch-size: must be a whole number >= 1, got '0'"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be a whole number >= 1"),
        (["--timing-repeats", "0"], "argument --timing-repeats: must be a whole number >= 1"),
        (["--threshold", "nan"], "argument --threshold: must be a finite number"),
        (["--device", "banana"], "argument --device: unknown device 'banana'"),
    ],
)
def test_eval_numbers_and_devices_are_refused_at_parse_time(files, bad, message, capsys):
    code, err = run(eval_argv(files, "eval", *bad), capsys)
    assert code == 2 and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda(files, capsys):
    code, err = run(eval_argv(files, "eval", "--device", "cuda"), capsys)
    assert code == 2 and "argument --device: 'cuda': CUDA is not available" in err
    code, err = run(["caption", "--backbone", "x", "--image", "x.png", "--device", "cuda:0"], capsys)
    assert code == 2 and "CUDA is not available" in err


def test_eval_out_naming_a_file_is_refused_before_any_work(files, tmp_path, capsys):
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    code, err = run(eval_argv(files, "eval", out=out), capsys)
    assert code == 2 and f"argument --out: {out} is an existing file, not a folder" in err
    assert out.read_text() == "keep me"


def test_sweep_refuses_a_bad_threshold_before_evaluating_any(files, capsys):
    code, err = run(eval_argv(files, "sweep", "--thresholds", "0.5", "1.5"), capsys)
    assert code == 2 and "threshold 1.5 is not valid" in err and "[0, 1]" in err
    code, err = run(eval_argv(files, "sweep", "--dev-fraction", "1"), capsys)
    assert code == 2 and "argument --dev-fraction: must be a finite number in (0, 1)" in err


def test_eval_exit_layers_beyond_the_lm_are_refused_before_loading(files, capsys):
    code, err = run(eval_argv(files, "eval", "--exit-layers", "9"), capsys)
    assert code == 2 and "exit layer 9 is out of range" in err


def test_tiny_run_needs_room_for_exits(capsys):
    code, err = run(["tiny-run", "--layers", "2"], capsys)
    assert code == 2 and "argument --layers: must be a whole number in [4, 64], got '2'" in err


def test_capfilt_output_folder_and_bad_numbers_are_refused_at_parse_time(files, tmp_path, capsys):
    base = ["capfilt", "--backbone", str(files["backbone"]), "--scorer", "clip:/nowhere", "--images", "x.png"]
    code, err = run([*base, "--output", str(tmp_path)], capsys)
    assert code == 2 and f"argument --output: {tmp_path} is a folder" in err
    code, err = run([*base, "--output", str(tmp_path / "o.json"), "--top-p", "0"], capsys)
    assert code == 2 and "argument --top-p: must be a finite number in (0, 1]" in err
    code, err = run([*base, "--output", str(tmp_path / "o.json"), "--num-samples", "2", "--top-k", "3"], capsys)
    assert code == 2 and "top_k must be in 1..num_samples" in err


@pytest.mark.parametrize(
    "error, shown", [(UserError, True), (MissingFileError, True), (ValueError, True), (TypeError, False)]
)
def test_only_input_problems_become_one_line(monkeypatch, capsys, error, shown):
    """A user error or a failed argument check is one line and exit code 2; any other exception (a TypeError from a
    bug) keeps its traceback."""
    from freevlm.commands import generate

    def command(args):
        raise error("what went wrong")

    monkeypatch.setattr(generate, "tiny_run", command)  # `register` binds it when `main` builds the parser
    if shown:
        assert run(["tiny-run"], capsys) == (2, "freevlm tiny-run: error: what went wrong\n")
    else:
        with pytest.raises(error, match="what went wrong"):
            main(["tiny-run"])


# --- files: backbones, exits, checkpoints, captions, images ---------------------------------------------------


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_backbone_weights(files, tmp_path, capsys):
    backbone = shutil.copytree(files["backbone"], tmp_path / "backbone")
    _truncate(backbone / "model.safetensors")
    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(image)
    code, err = run(["caption", "--backbone", str(backbone), "--image", str(image), "--mode", "full"], capsys)
    assert code == 2 and "model.safetensors is damaged" in err
    code, err = run(train_argv({**files, "backbone": backbone}, "finetune"), capsys)
    assert code == 2 and "model.safetensors is damaged" in err


def test_backbone_without_tokenizer_says_so(files, tmp_path, capsys):
    backbone = shutil.copytree(files["backbone"], tmp_path / "backbone")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (backbone / name).unlink(missing_ok=True)
    code, err = run(train_argv({**files, "backbone": backbone}, "finetune"), capsys)
    assert code == 2 and "has no tokenizer files" in err


def test_truncated_exits_weights(files, tmp_path, capsys):
    from freevlm import EarlyExitVLM, ExitConfig
    from freevlm.loading import load_vlm

    EarlyExitVLM(load_vlm(files["backbone"]).model, ExitConfig([2])).save_exits(tmp_path / "exits")
    _truncate(tmp_path / "exits" / "exits.safetensors")
    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(image)
    code, err = run(
        ["caption", "--backbone", str(files["backbone"]), "--exits", str(tmp_path / "exits"), "--image", str(image)],
        capsys,
    )
    assert code == 2 and "exits.safetensors is damaged" in err


def test_prompt_longer_than_the_lm_positions_fails_before_decoding(files, tmp_path, capsys):
    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(image)
    code, err = run(
        [
            "caption",
            "--backbone",
            str(files["backbone"]),
            "--image",
            str(image),
            "--mode",
            "full",
            "--max-new-tokens",
            "600",
        ],
        capsys,
    )  # tiny OPT: 512 positions
    assert code == 2 and "exceeds the language model's 512 positions" in err and "max_new_tokens can be at most" in err


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height (PIL's bomb check reads only the header)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_decompression_bomb_image(files, tmp_path, capsys):
    image = tmp_path / "huge.png"
    _png_header_only(image, 14000, 14000)
    code, err = run(["caption", "--backbone", str(files["backbone"]), "--image", str(image)], capsys)
    assert code == 2 and f"image {image} is too large to decode safely" in err


@pytest.mark.parametrize(
    "caption, message",
    [
        (None, "annotation #1 (id 1) has a caption that is NoneType, not text"),
        ("", "annotation #1 (id 1) has an empty caption"),
        ("  ", "annotation #1 (id 1) has an empty caption"),
        ("missing", "annotation #1 (id 1) has no 'caption' field"),
    ],
)
def test_training_captions_missing_null_or_empty(files, tmp_path, caption, message, capsys):
    data = json.loads(files["captions"].read_text())
    if caption == "missing":
        del data["annotations"][1]["caption"]
    else:
        data["annotations"][1]["caption"] = caption
    bad = files["captions"].parent / f"bad_{len(str(caption))}_{caption is None}.json"
    bad.write_text(json.dumps(data))
    code, err = run(train_argv({**files, "captions": bad}, "finetune", tmp_path / "run"), capsys)
    assert code == 2 and message in err and str(bad) in err


def test_dev_fraction_leaving_no_training_images(files, tmp_path, capsys):
    code, err = run(train_argv(files, "finetune", tmp_path / "run", "--dev-fraction", "0.99"), capsys)
    assert code == 2 and "--dev-fraction 0.99 of the 6 image(s)" in err and "leaves no training images" in err


def test_exit_layers_beyond_the_lm_refused_before_loading(files, tmp_path, capsys):
    code, err = run(train_argv(files, "train-exits", tmp_path / "run", "--exit-layers", "7"), capsys)
    assert code == 2 and "exit layer 7 is out of range: this LM has 4 layers" in err


@pytest.fixture(scope="module")
def finetune_run(files, tmp_path_factory):
    """A finished 2-step finetune run folder (copied by the tests that damage it)."""
    out = tmp_path_factory.mktemp("ft") / "run"
    assert main(train_argv(files, "finetune", out, "--max-steps", "2", "--no-tensorboard")) == 0
    return out


@pytest.mark.parametrize(
    "damage, message",
    [
        ("empty", "state.pt is empty"),
        ("truncate", "state.pt is damaged or not a freevlm checkpoint"),
        ("garbage", "state.pt is damaged or not a freevlm checkpoint"),
    ],
)
def test_resume_from_a_damaged_checkpoint(files, finetune_run, tmp_path, damage, message, capsys):
    run_dir = shutil.copytree(finetune_run, tmp_path / "run")
    state = run_dir / "checkpoints" / "step-00000002" / "state.pt"
    if damage == "empty":
        state.write_bytes(b"")
    elif damage == "truncate":
        _truncate(state)
    else:
        state.write_bytes(b"not a checkpoint at all")
    code, err = run(train_argv(files, "finetune", run_dir, "--max-steps", "3", "--resume"), capsys)
    assert code == 2 and message in err and str(state) in err


def test_train_exits_resume_of_a_finetune_run(files, finetune_run, capsys):
    code, err = run(train_argv(files, "train-exits", finetune_run, "--max-steps", "3", "--resume", *EXIT_ARGS), capsys)
    assert code == 2 and "cannot be resumed by `freevlm train-exits`: it was written by `freevlm finetune`" in err


def test_resume_without_checkpoints(files, tmp_path, capsys):
    code, err = run(train_argv(files, "finetune", tmp_path / "empty", "--resume"), capsys)
    assert code == 2 and "--resume: no checkpoint under" in err


def test_empty_dev_captions_are_named(files, tmp_path, capsys):
    empty = tmp_path / "dev.json"
    empty.write_text(json.dumps({"images": [], "annotations": []}))
    code, err = run(train_argv(files, "finetune", tmp_path / "run", "--dev-captions", str(empty)), capsys)
    assert code == 2 and f"--dev-captions {empty} is empty" in err
