"""The `freevlm` commands fuzzed with Hypothesis (issue 26): every option of every command, drawn from its type
(read off the parser itself, so a new option is fuzzed without a line here) and from nearby invalid values
(negative, zero, huge, NaN, text for a number, an unknown choice) and wrong kinds of file (a folder of another model
type, an image that is text, a JSON of another format, an empty file, a symlink loop, a folder for a file).

Each run, in-process through `freevlm.cli.main`, must end with exit code 0, or 2 and a message naming the option
or the file (argparse's usage lines are fine), never a traceback; and a refused run leaves no output behind.
Runs that would do real work are kept cheap by the base command lines (one step, one record, two tokens)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import shutil

import pytest
import torch
from dataset_files import vqa
from fuzzing import fuzz_settings
from hypothesis import event, given
from hypothesis import strategies as st
from training_helpers import save_tiny_blip2, save_tiny_clip, write_shapes

from freevlm import cli
from freevlm.exits import ExitConfig
from freevlm.model import EarlyExitVLM
from freevlm.tiny import tiny_blip2

pytestmark = pytest.mark.usefixtures("one_thread")


class World(dict):
    def __repr__(self) -> str:  # Hypothesis prints the test's arguments with a failing example
        return "<fuzz files>"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Good files for every command, and files of the wrong kind, each by name."""
    root = tmp_path_factory.mktemp("cli")
    w = World(root=root)
    w["backbone"] = save_tiny_blip2(root / "backbone")
    exits = EarlyExitVLM.from_backbone(tiny_blip2("opt", seed=0), ExitConfig(exit_layers=[1, 2]))
    exits.save_exits(root / "exits")
    w["exits"] = root / "exits"
    other = EarlyExitVLM.from_backbone(tiny_blip2("opt", seed=1), ExitConfig(exit_layers=[1, 2]))
    other.save_exits(root / "other_exits")
    w["other backbone's exits"] = root / "other_exits"
    w["captions"] = write_shapes(root / "data", 4)
    w["images"] = w["captions"].parent
    w["image"] = next(w["images"].glob("*.png"))
    w["clip folder"] = save_tiny_clip(root / "clip")
    w["vqa questions"], w["vqa answers"] = vqa(root / "vqa")
    w["vqa images"] = root / "vqa" / "val2014"
    w["empty file"] = root / "empty.json"
    w["empty file"].write_text("")
    w["empty folder"] = root / "empty_folder"
    w["empty folder"].mkdir()
    w["text image"] = root / "text.png"
    w["text image"].write_text("this is not an image")
    w["list json"] = root / "list.json"
    w["list json"].write_text(json.dumps([1, 2, 3]))
    w["binary"] = root / "binary.json"
    w["binary"].write_bytes(bytes(range(256)) * 4)
    (root / "loop_a").symlink_to(root / "loop_b")
    (root / "loop_b").symlink_to(root / "loop_a")
    w["symlink loop"] = root / "loop_a"
    w["missing"] = root / "no_such_file"
    return w


# wrong kinds of path, for any option that takes one
WRONG_PATHS = [
    "missing",
    "empty file",
    "empty folder",
    "text image",
    "list json",
    "binary",
    "symlink loop",
    "clip folder",
    "vqa questions",
    "other backbone's exits",
    "backbone",
    "exits",
    "captions",
]
# where an output may be asked to go, made anew for each example under `scratch`
OUTPUT_PLACES = ["new", "a file", "an empty folder", "a folder with a file", "a file/below it", "a loop"]


def output_places(scratch) -> None:
    (scratch / "a file").write_text("keep")
    (scratch / "an empty folder").mkdir()
    (scratch / "a folder with a file").mkdir()
    (scratch / "a folder with a file" / "keep.txt").write_text("keep")
    (scratch / "a loop").symlink_to(scratch / "a loop")


BAD_INTS = ["0", "-1", "1000000000000", str(2**64), "nan", "1.5", "", "ten"]
BAD_FLOATS = ["0", "-1", "nan", "inf", "-inf", "1e309", "", "half", "2"]
# options whose huge values are legal requests for a long run (a run as long as asked is not a bug): not drawn huge
LONG_RUNS = {"--epochs", "--max-steps", "--timing-repeats", "--warmup-steps", "--eval-every", "--limit"}


def base_argv(command: str, w: World, out) -> list[str]:
    """A valid and cheap command line (one training step, one or two records, two new tokens)."""
    # VQA: its metric is plain Python, where the caption metrics start a JVM (METEOR) for every evaluation
    questions = [str(w["vqa questions"]), str(w["vqa answers"])]
    data = ["--format", "vqav2", "--files", *questions, "--images", str(w["vqa images"]), "--limit", "2"]
    decode = ["--max-new-tokens", "2"]
    train = ["--backbone", str(w["backbone"]), "--captions", str(w["captions"]), "--output", str(out)]
    train += ["--cpu", "--no-progress", "--no-tensorboard", "--max-steps", "1", "--batch-size", "2"]
    train += ["--dev-fraction", "0", "--max-target-tokens", "8"]
    lines = {
        "caption": ["--backbone", str(w["backbone"]), "--exits", str(w["exits"]), "--image", str(w["image"]), *decode],
        "tiny-run": ["--layers", "4", *decode],
        "eval": ["--backbone", str(w["backbone"]), "--exits", str(w["exits"]), *data, *decode, "--out", str(out)],
        "sweep": [
            *("--backbone", str(w["backbone"]), "--exits", str(w["exits"]), *data, *decode, "--out", str(out)),
            *("--thresholds", "0.5", "0.9", "--no-per-layer", "--dev-files", *questions),
        ],
        "finetune": train,
        "train-exits": [*train, "--exit-layers", "2", "--disc-hidden", "8"],
        "train-baseline": [*train, "--method", "deeblip", "--exit-layers", "2"],
        "capfilt": [
            *("--backbone", str(w["backbone"]), "--scorer", f"clip:{w['clip folder']}", "--images", str(w["image"])),
            *("--output", str(out), "--num-samples", "2", "--top-k", "1", *decode),
        ],
        "calibrate": [
            *("--backbone", str(w["backbone"]), "--exits", str(w["exits"]), *data, *decode),
            *("--thresholds", "0.5", "0.9", "--out", str(out)),
        ],
        "place-exits": [
            *("--backbone", str(w["backbone"]), "--exits", str(w["exits"]), *data, *decode),
            *("--thresholds", "0.5", "0.9", "--budget-exits", "1", "--out", str(out)),
        ],
        "demo": ["--quick", "--out", str(out), "--cache", str(out) + "_cache"],
        "serve": ["--backbone", str(w["backbone"]), "--exits", str(w["exits"]), "--port", "0"],
    }
    return lines[command]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(prog="freevlm")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in cli.COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return dict(sub.choices)


PARSERS = subcommands()


def values_for(action: argparse.Action, w: World) -> list[str] | None:
    """Values to draw for one option, from its type: some in range, the rest nearby out of it; None for a flag."""
    flag = action.option_strings[-1]
    if action.nargs == 0:
        return None
    if action.choices is not None:
        return [str(c) for c in action.choices] + ["bogus", "", "FULL"]
    kind = getattr(action.type, "__name__", None)
    if kind in ("integer", "int"):
        bad = [v for v in BAD_INTS if not (flag in LONG_RUNS and v in ("1000000000000", str(2**64)))]
        return ["1", "2", "3", *bad]
    if kind in ("number", "float"):
        return ["0.5", "0.9", "1", *BAD_FLOATS]
    if kind == "device":
        return ["cpu", "cuda", "cuda:7", "mps", "banana", "", "cpu:0"]
    if kind in ("output_dir", "output_file"):  # written to: only fresh places, never the shared files
        return [str(w["scratch"] / name) for name in OUTPUT_PLACES] + [""]
    paths = [str(w[name]) for name in WRONG_PATHS] + ["", "clip:" + str(w["backbone"]), "itm:" + str(w["backbone"])]
    if flag in ("--prompt", "--split", "--dev-split"):
        return ["", "a photo of", "val", "x" * 2000, "\u00e9\u4e2d\U0001f600", "<image>"]
    return paths


class ReachedPipeline(Exception):
    """Raised in place of the demo's pipeline: the command's checks let the options through."""


def reached_the_pipeline(*args):
    raise ReachedPipeline


def run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


def replace_option(argv: list[str], action: argparse.Action, values: list[str] | None) -> list[str]:
    """`argv` with `action`'s option given `values` (None: the flag alone), replacing any value it had."""
    flags = set(action.option_strings)
    out, i = [], 0
    while i < len(argv):
        if argv[i] in flags:
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                i += 1
            continue
        out.append(argv[i])
        i += 1
    flag = action.option_strings[-1]
    return out + [flag] + (values or [])


def tree(root) -> set[str]:
    """Every path under `root` (links not followed), with each file's size: what a refused run must not change."""
    out = set()
    for folder, dirs, files in os.walk(root):
        out |= {os.path.join(folder, d) for d in dirs}
        out |= {
            f"{os.path.join(folder, f)} {os.path.getsize(os.path.join(folder, f))}"
            for f in files
            if not os.path.islink(os.path.join(folder, f))
        }
    return out


def names_the_problem(err: str, changed: dict[str, list[str] | None]) -> bool:
    last = err.strip().splitlines()[-1] if err.strip() else ""
    names = set(changed) | {flag.lstrip("-").replace("-", "_") for flag in changed}
    names |= {v for values in changed.values() for v in values or [] if v}
    names |= {v.split(":", 1)[-1] for values in changed.values() for v in values or [] if v}
    return any(name in last for name in names)


@pytest.mark.parametrize("command", sorted(PARSERS))
@fuzz_settings(max_examples=12)
@given(data=st.data())
def test_every_option_of_every_command(world, tmp_path_factory, monkeypatch, command, data):
    parser = PARSERS[command]
    world["scratch"] = scratch = tmp_path_factory.mktemp(command)
    output_places(scratch)
    monkeypatch.chdir(scratch)  # a relative path (a scorer spec given as a folder) lands here
    out = scratch / "out"
    argv = [command, *base_argv(command, world, out)]
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    chosen = data.draw(st.lists(st.sampled_from(options), min_size=1, max_size=2, unique_by=id), label="options")
    changed = {}
    for action in chosen:
        pool = values_for(action, world)
        if pool is None:
            values = None
        else:
            many = action.nargs in ("+", "*")
            count = data.draw(st.integers(1, 2), label="count") if many else 1
            values = [data.draw(st.sampled_from(pool), label=action.option_strings[-1]) for _ in range(count)]
        argv = replace_option(argv, action, values)
        changed[action.option_strings[-1]] = values
    if command == "demo":  # the demo trains for minutes: only its checks run, the pipeline is replaced
        monkeypatch.setattr("freevlm.demo.pipeline.run_demo", reached_the_pipeline)
    if command == "serve":  # the model loads and the app is built; the server would then listen until stopped
        monkeypatch.setattr("uvicorn.Server.run", reached_the_pipeline)
        monkeypatch.setattr("freevlm.server.replicas.run", reached_the_pipeline)  # --replicas: Ray Serve
        monkeypatch.setattr("freevlm.server.replicas.stop", lambda: None)
        monkeypatch.setattr("signal.signal", lambda *args: None)  # the test process keeps its own handlers
    before = tree(scratch)
    try:
        code, err = run(argv)
    except ReachedPipeline:
        code, err = 0, ""
    assert "Traceback" not in err, err
    assert code in (0, 2), f"exit code {code}: {err[-2000:]}"
    if code == 2:
        event("refused")
        assert names_the_problem(err, changed), f"the message names none of {sorted(changed)}: {err[-600:]}"
        assert tree(scratch) == before, f"a refused run left {sorted(tree(scratch) - before)}"
    else:
        event("ran")
    shutil.rmtree(scratch, ignore_errors=True)
    torch.set_num_threads(1)  # a command may set its own


@pytest.mark.parametrize(
    "command, option, value, message",
    [
        ("capfilt", "--scorer", "clip:{backbone}", "holds a Blip2ForConditionalGeneration model, not a CLIPModel"),
        ("capfilt", "--scorer", "itm:{clip folder}", "holds a CLIPModel model, not a Blip2ForImageTextRetrieval"),
        ("capfilt", "--backbone", "", "argument --backbone: must be a path, got an empty one"),
        ("train-exits", "--batch-size", "1000000000000", "fewer than one step needs"),
        ("train-exits", "--seed", str(2**64), "argument --seed: must be a whole number in [0, 1.84467e+19]"),
        ("tiny-run", "--layers", "1000000000000", "argument --layers: must be a whole number in [4, 64]"),
        ("demo", "--threads", "-1", "argument --threads: must be a whole number >= 1"),
        ("calibrate", "--tolerance", "nan", "argument --tolerance: must be a finite number in (0, 1)"),
        ("place-exits", "--budget-exits", "0", "argument --budget-exits: must be a whole number >= 1"),
    ],
)
def test_what_the_fuzzing_found(world, tmp_path, command, option, value, message):
    """The cases the fuzzing above found, kept by name: one line naming the problem, exit code 2, nothing written."""
    action = next(a for a in PARSERS[command]._actions if option in a.option_strings)
    out = tmp_path / "out"
    argv = replace_option([command, *base_argv(command, world, out)], action, [value.format(**world)])
    code, err = run(argv)
    assert code == 2 and message in err, err
    assert "Traceback" not in err and not out.exists()
