"""Evaluation at dataset scale: predictions.jsonl and `--resume` (with a real kill), and `eval`, `sweep`,
`calibrate`, `place-exits` under `accelerate launch` with 2 CPU processes, identical to one process."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dataset_files as files
import pytest
import torch
from cli_args import cli_args
from tiny_processor import tiny_bundle

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.cli import main
from freevlm.eval.predictions import PredictionLog
from freevlm.tiny import tiny_blip2

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}


def gqa(root: Path, n: int) -> Path:
    """`n` GQA questions over 5 images of different colours."""
    for i in range(5):
        files.write_image(root / "images" / f"im{i}.jpg", (50 * i, 200 - 40 * i, 30 + 20 * i))
    data = {
        str(1000 + q): {"imageId": f"im{q % 5}", "question": f"what is it {q}?", "answer": ["red", "blue"][q % 2]}
        for q in range(n)
    }
    return files.write_json(root / "questions.json", data)


def eval_args(checkpoint, questions: Path, out: Path, *extra: str) -> list[str]:
    options = dict(format="gqa", files=questions, images=questions.parent / "images", out=out)
    # threshold 0.016: this tiny model's tokens leave at every depth there
    return cli_args("eval", *extra, checkpoint=checkpoint, **options, threshold=0.016, max_new_tokens=5, batch_size=2)


def lines(path: Path) -> list[dict]:
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda row: row["index"])


def scored(out: Path) -> dict:
    result = json.loads((out / "results.json").read_text())
    speed = result["speed"]
    return {
        "score": result["score"],
        "quality": result["quality"],
        "agreement": result["agreement_with_full"],
        "tokens": (speed["tokens"], speed["full_tokens"], speed["exit_histogram"], speed["analytic_speedup"]),
    }


def kill_once_written(args: list[str], path: Path, count: int = 2) -> None:
    """Run `freevlm ARGS` as a real process and SIGKILL it once `path` holds `count` lines."""
    argv = [sys.executable, "-m", "freevlm.cli", *args]
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if path.exists() and path.read_text().count("\n") >= count:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"


def test_a_killed_eval_resumes_to_what_an_uninterrupted_run_gives(checkpoint, tmp_path):
    questions = gqa(tmp_path, 20)
    whole = tmp_path / "whole"
    assert main(eval_args(checkpoint, questions, whole)) == 0
    expected = lines(whole / "predictions.jsonl")
    assert len(expected) == 20 and {row["index"] for row in expected} == set(range(20))

    out = tmp_path / "killed"
    path = out / "predictions.jsonl"
    kill_once_written(eval_args(checkpoint, questions, out), path)
    kept = path.read_text().count("\n")
    assert 2 <= kept < 20 and not (out / "results.json").exists()

    assert main(eval_args(checkpoint, questions, out, "--resume")) == 0
    assert lines(path) == expected  # each record once, decoded as the uninterrupted run decoded it
    assert scored(out) == scored(whole)


def visdial_args(checkpoint, root: Path, out: Path, command: str = "eval") -> list[str]:
    """`freevlm eval` (or `sweep`, on a grid) over 5 dialogs of 3 rounds (15 records), dense relevance for one."""
    dialogs, dense = files.visdial(root, dialogs=5)
    options = dict(checkpoint=checkpoint, format="visdial", files=[dialogs, dense], images=root / "images", out=out)
    options.update(max_new_tokens=3, batch_size=2)
    if command == "sweep":
        return cli_args("sweep", **options, thresholds=[0.014, 0.016, 1.0], dev_fraction=0.4)
    return cli_args("eval", **options, threshold=0.016)


@pytest.mark.parametrize("command", ["eval", "sweep"])
def test_a_killed_visdial_run_resumes_without_scoring_its_options_again(checkpoint, tmp_path, monkeypatch, command):
    """Each round's option log-likelihoods are kept in its line: after a real SIGKILL, the resumed run scores the
    options of only the rounds not on disk and ranks every round as the uninterrupted run does."""
    from freevlm.eval import evaluate

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(visdial_args(checkpoint, tmp_path, whole, command)) == 0
    name = "predictions.jsonl" if command == "eval" else "predictions_test.jsonl"
    expected = lines(whole / name)
    assert all(len(row.get("scores") or row["rules"][0]["scores"]) == 4 for row in expected)  # 4 options a round

    path = killed / name
    kill_once_written(visdial_args(checkpoint, tmp_path, killed, command), path)
    kept = len(lines(path))
    assert 2 <= kept < len(expected) and not (killed / "results.json").exists()

    scored_rounds, score = [], evaluate.option_log_likelihoods_many
    monkeypatch.setattr(
        evaluate, "option_log_likelihoods_many", lambda *a, **k: scored_rounds.append(a[3]) or score(*a, **k)
    )
    assert main([*visdial_args(checkpoint, tmp_path, killed, command), "--resume"]) == 0
    assert lines(path) == expected
    if command == "eval":
        assert len(scored_rounds) == len(expected) - (kept - kept % 2)  # whole batches of 2 on disk are not scored
        assert scored(killed) == scored(whole)
    else:  # the dev pass was whole on disk; the test pass resumed; the chosen threshold is timed alone, afresh
        resumed, uninterrupted = (json.loads((out / "results.json").read_text()) for out in (killed, whole))
        untimed = lambda rows: [(r["threshold"], r["layer"], r["score"], r["quality"]) for r in rows]  # noqa: E731
        for key in ("dev", "test", "per_layer"):
            assert untimed(resumed[key]) == untimed(uninterrupted[key]), key
        assert resumed["best_threshold"] == uninterrupted["best_threshold"]
        assert len(scored_rounds) == len(expected) - (kept - kept % 2) + len(expected)


def test_a_visdial_file_without_option_scores_is_refused_on_resume(checkpoint, tmp_path, capsys):
    """A VisDial predictions.jsonl written before its lines carried the option scores (its options file does not
    say they are there) is refused by name, not met with a KeyError deep in the ranking."""
    out = tmp_path / "old"
    assert main(visdial_args(checkpoint, tmp_path, out)) == 0
    options_file = out / "predictions.options.json"
    options = json.loads(options_file.read_text())
    del options["option_scores"]
    options_file.write_text(json.dumps(options))
    capsys.readouterr()
    assert main([*visdial_args(checkpoint, tmp_path, out), "--resume"]) == 2
    assert "option_scores: None in the file, 'in each line' now" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, value, named",
    [
        ("--threshold", "0.5", "threshold: 0.016 in the file, 0.5 now"),
        ("--exits", "other_exits", "exits: '{checkpoint}/exits' in the file, '{tmp}/other_exits' now"),
        ("--backbone", "other_backbone", "backbone: '{checkpoint}/backbone' in the file, '{tmp}/other_backbone' now"),
        ("--limit", "3", "'limit': None}} in the file, {{"),
        ("--kv", "propagate", "kv: 'recompute' in the file, 'propagate' now"),
    ],
)
def test_resume_with_other_options_is_refused_naming_the_difference(checkpoint, tmp_path, capsys, option, value, named):
    """Model, exits, threshold, dataset and decoding: each a difference named (folders compared by their path)."""
    questions = gqa(tmp_path, 4)
    out = tmp_path / "out"
    assert main(eval_args(checkpoint, questions, out, "--no-full")) == 0
    argv = eval_args(checkpoint, questions, out, "--no-full", "--resume")
    if option.endswith(("exits", "backbone")):
        shutil.copytree(checkpoint / option[2:], tmp_path / value)
        value = str(tmp_path / value)
    argv = [*argv, option, value] if option not in argv else argv
    argv[argv.index(option) + 1] = value
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert named.format(checkpoint=checkpoint.resolve(), tmp=tmp_path.resolve()) in err and "--resume" in err
    assert err.count(" in the file, ") == 1  # that difference alone


def test_a_line_cut_short_is_dropped_and_cut_off(tmp_path):
    log = PredictionLog(tmp_path, {"threshold": 0.5})
    log.open()
    log.append([{"index": 0, "prediction": "a"}, {"index": 1, "prediction": "b"}])
    log.close()
    with open(tmp_path / "predictions.jsonl", "a") as f:
        f.write('{"index": 2, "predi')  # a kill in the middle of a line
    resumed = PredictionLog(tmp_path, {"threshold": 0.5}, resume=True)
    assert sorted(resumed.done) == [0, 1]
    resumed.open()
    resumed.append([{"index": 2, "prediction": "c"}])
    resumed.close()
    assert [row["index"] for row in lines(tmp_path / "predictions.jsonl")] == [0, 1, 2]
    assert PredictionLog(tmp_path, {"threshold": 0.5}).done == {}  # without resume: a fresh run


def command_args(checkpoint, questions: Path, out: Path) -> dict[str, list[str]]:
    common = dict(checkpoint=checkpoint, format="gqa", files=questions, images=questions.parent / "images")
    common.update(max_new_tokens=4, batch_size=2)
    grid = dict(common, thresholds=[0.014, 0.016, 1.0])
    return {
        "eval": cli_args("eval", **common, threshold=0.016, out=out / "eval"),
        "sweep": cli_args("sweep", **grid, dev_fraction=0.3, out=out / "sweep"),
        "calibrate": cli_args("calibrate", **grid, tolerance=0.5, out=out / "calib.json"),
        "place-exits": cli_args(
            "place-exits", **grid, tolerance=0.5, budget_exits=1, speedup="analytic", out=out / "place.json"
        ),
    }


@contextlib.contextmanager
def held_port():
    """A port for accelerate's store that no other process can take until the block ends. A port found free, then
    released and handed over, can be taken before the launched store binds it (by anything that binds or connects
    meanwhile: the kernel hands released ports out again as the local end of connections), and the launch then fails
    with EADDRINUSE. Bound with SO_REUSEADDR but not listening, this socket keeps the port out of every other bind
    and connect while a server (the store, which sets SO_REUSEADDR too) may still bind and listen on it."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def test_a_held_port_is_free_to_the_store_and_to_no_one_else():
    import datetime

    from torch.distributed import TCPStore

    with held_port() as port:
        with socket.socket() as other, pytest.raises(OSError, match="in use"):
            other.bind(("127.0.0.1", port))
        store = TCPStore("127.0.0.1", port, 1, True, timeout=datetime.timedelta(seconds=30))
        store.set("key", "value")
        client = TCPStore("127.0.0.1", port, 1, False, timeout=datetime.timedelta(seconds=30))
        assert client.get("key") == b"value"


def comparable(out: Path) -> dict:
    """What must not depend on the number of processes (timings do)."""
    sweep = json.loads((out / "sweep" / "results.json").read_text())
    calib = json.loads((out / "calib.json").read_text())
    place = json.loads((out / "place.json").read_text())
    visdial = out / "visdial"
    visdial_sweep = json.loads((visdial / "sweep" / "results.json").read_text())
    return {
        "eval": (lines(out / "eval" / "predictions.jsonl"), scored(out / "eval")),
        "sweep": (
            sweep["best_threshold"],
            [(r["threshold"], r["score"], r["speed"]["exit_histogram"]) for r in sweep["dev"] + sweep["test"]],
            [(r["layer"], r["score"]) for r in sweep["per_layer"]],
            json.loads((out / "sweep" / "predictions.json").read_text()),
        ),
        "calibrate": (calib["threshold"], calib["certified"], calib["per_threshold"]),
        "place-exits": (place["chosen"], sorted(json.dumps(a) for a in place["alternatives"])),
        "visdial eval": (lines(visdial / "eval" / "predictions.jsonl"), scored(visdial / "eval")),
        "visdial sweep": (
            visdial_sweep["best_threshold"],
            [
                (r["threshold"], r["layer"], r["quality"])
                for key in ("dev", "test", "per_layer")
                for r in visdial_sweep[key]
            ],
            lines(visdial / "sweep" / "predictions_test.jsonl"),
        ),
    }


def progress_bars(err: str) -> list[str]:
    """The last state of each progress bar in `err` ("7/7"), each checked to show the ETA once under way."""
    states = [s for line in err.splitlines() for s in line.split("\r") if s.startswith("records:")]
    for state in states:
        if not re.search(r"\| 0/\d+ ", state):
            assert re.search(r"\| \d+/\d+ \[\d\d:\d\d<\d\d:\d\d", state), state  # [elapsed<remaining
    starts = [i for i, state in enumerate(states) if re.search(r"\| 0/\d+ ", state)]
    return [re.search(r"\d+/\d+", states[end - 1]).group() for end in [*starts[1:], len(states)]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="--multi_gpu would start GPU processes here")
def test_two_processes_give_what_one_gives(checkpoint, tmp_path, capsys):
    """One `accelerate launch --multi_gpu --num_processes 2` (CPU processes on a host without GPUs) runs the four
    commands in a row, then VisDial's `eval` and `sweep`; each process decodes only its share of the batches, and
    scores only its share of the VisDial rounds' options. The main process alone shows the progress bars: one per
    pass over the records, as one process shows, counting every process's records, with the ETA."""
    questions = gqa(tmp_path, 7)  # 4 batches of 2: process 0 gets 2 and process 1 gets 2 (the last one short)
    one, two = tmp_path / "one", tmp_path / "two"

    def commands(out: Path) -> list[list[str]]:
        visdial = [visdial_args(checkpoint, tmp_path, out / "visdial" / c, c) for c in ("eval", "sweep")]
        return [*command_args(checkpoint, questions, out).values(), *visdial]

    for argv in commands(one):
        assert main(argv) == 0
    bars = progress_bars(capsys.readouterr().err)
    assert len(bars) == 11  # eval, sweep (dev, test, the chosen threshold), calibrate, 2 placements, VisDial's 4
    argv_file = tmp_path / "commands.json"
    argv_file.write_text(json.dumps(commands(two)))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    with held_port() as port:  # not 29500: other runs on this host may hold it
        launch += ["--main_process_port", str(port)]
        run = subprocess.run(
            [*launch, str(HERE / "run_commands.py"), str(argv_file)],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert run.returncode == 0, run.stderr[-3000:]
    one, two = comparable(one), comparable(two)
    for command in one:
        assert two[command] == one[command], command
    assert progress_bars(run.stderr) == bars
    counts = json.loads(run.stdout.strip().splitlines()[-1])  # per command, what each process did
    assert {rank: c["decoded"] for rank, c in counts[0].items()} == {"0": 4, "1": 3}  # `eval`'s records
    # VisDial `eval`: 15 rounds in 8 batches of 2, each process's 4 batches decoded and their rounds' options scored
    assert counts[4] == {"0": {"decoded": 8, "scored": 8}, "1": {"decoded": 7, "scored": 7}}


@pytest.mark.parametrize("kv", ["recompute", "propagate"])
def test_a_shared_evaluation_gives_each_rule_what_its_own_eval_gives(tmp_path, kv):
    from freevlm.data.records import VQARecord
    from freevlm.decoding.config import DecodeConfig
    from freevlm.eval.evaluate import evaluate_many, evaluate_vqa
    from freevlm.eval.options import EvalOptions

    model = tiny_blip2("opt", seed=2, num_layers=4)
    ee, bundle = EarlyExitVLM(model, ExitConfig([1, 2], init="fresh")), tiny_bundle(model)
    records = [
        VQARecord(files.write_image(tmp_path / f"{i}.png", (30 * i, 90, 200 - 25 * i)), i, f"what is {i}?", ["a"] * 10)
        for i in range(7)
    ]
    rules = [(0.012, None), (0.014, None), (0.016, None), (1.0, None), (None, 1), (None, 4)]
    options = dict(config=DecodeConfig(max_new_tokens=5, kv=kv), batch_size=3, prompt="q: {question} a:")
    shared = evaluate_many("vqa", ee, bundle, records, rules, EvalOptions(compare_full=False, **options))
    for (threshold, layer), together in zip(rules, shared, strict=True):
        alone = evaluate_vqa(ee, bundle, records, threshold, layer, compare_full=False, **options)
        assert together.predictions == alone.predictions, (threshold, layer)
        assert (together.score, together.quality) == (alone.score, alone.quality)
        assert together.speed.exit_histogram == alone.speed.exit_histogram
        assert (together.threshold, together.layer) == (alone.threshold, alone.layer)
    histograms = [r.speed.exit_histogram for r in shared]
    assert set(histograms[0]) == {1} and len(histograms[2]) > 1 and set(histograms[3]) == {4}  # they differ


def test_shared_caption_scores_tokenize_once_and_score_as_apart(tmp_path):
    from freevlm.data.records import CaptionRecord
    from freevlm.decoding.config import DecodeConfig
    from freevlm.eval.evaluate import evaluate_captioning, evaluate_many
    from freevlm.eval.options import EvalOptions

    calls = []

    def tokenizer(captions):  # a stand-in for PTB (Java): lower-cased words, one call counted per use
        calls.append(len(captions))
        return {k: [" ".join(c.lower().replace(".", " ").split()) for c in v] for k, v in captions.items()}

    model = tiny_blip2("opt", seed=2, num_layers=4)
    ee, bundle = EarlyExitVLM(model, ExitConfig([1, 2], init="fresh")), tiny_bundle(model)
    records = [
        CaptionRecord(files.write_image(tmp_path / f"{i}.png", (40 * i, 60, 90)), i, [f"A thing {i}.", "a thing"])
        for i in range(5)
    ]
    rules = [(0.012, None), (0.016, None), (1.0, None)]
    options = dict(config=DecodeConfig(max_new_tokens=5), batch_size=2, only=["CIDEr"], compare_full=False)
    shared = evaluate_many("captions", ee, bundle, records, rules, EvalOptions(tokenizer=tokenizer, **options))
    assert len(calls) == 1  # every rule's references and captions in one call
    for (threshold, _), together in zip(rules, shared, strict=True):
        alone = evaluate_captioning(ee, bundle, records, threshold, tokenizer=tokenizer, **options)
        assert together.predictions == alone.predictions
        assert together.quality == alone.quality and together.score == alone.score


def test_a_sweep_cut_short_resumes_to_the_same_results(checkpoint, tmp_path, capsys):
    """Each pass of a sweep keeps its own lines; a sweep whose test pass lost its last lines (and never wrote its
    results) resumes to what the whole sweep wrote. Other thresholds are refused by name."""
    questions = gqa(tmp_path, 9)
    argv = command_args(checkpoint, questions, tmp_path / "out")["sweep"]
    out = tmp_path / "out" / "sweep"
    assert main(argv) == 0
    whole = json.loads((out / "results.json").read_text()), json.loads((out / "predictions.json").read_text())
    assert sorted(p.name for p in out.glob("*.jsonl")) == [
        "predictions_best.jsonl",
        "predictions_dev.jsonl",
        "predictions_test.jsonl",
    ]
    test_lines = (out / "predictions_test.jsonl").read_text().splitlines(keepends=True)
    (out / "predictions_test.jsonl").write_text("".join(test_lines[:2]) + test_lines[2][:9])  # cut mid-line
    (out / "predictions_best.jsonl").unlink()
    (out / "results.json").unlink()
    assert main([*argv, "--resume"]) == 0
    resumed = json.loads((out / "results.json").read_text()), json.loads((out / "predictions.json").read_text())
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("speed", "seconds")} for r in rows]  # noqa: E731
    assert resumed[1] == whole[1]
    for key in ("dev", "test", "per_layer"):
        assert strip(resumed[0][key]) == strip(whole[0][key]), key
    assert resumed[0]["best_threshold"] == whole[0]["best_threshold"]
    assert len((out / "predictions_test.jsonl").read_text().splitlines()) == len(test_lines)

    other = list(argv)
    other[other.index("--thresholds") + 1] = "0.013"
    assert main([*other, "--resume"]) == 2
    assert "thresholds: [0.014, 0.016, 1.0] in the file, [0.013, 0.016, 1.0] now" in capsys.readouterr().err


def test_a_killed_calibration_resumes_to_what_an_uninterrupted_run_gives(checkpoint, tmp_path):
    """A real SIGKILL part-way through `calibrate` (every threshold of the grid decoded together, one line per
    record); resumed, it decodes only the records not on disk and certifies what the uninterrupted run certifies."""
    questions = gqa(tmp_path, 20)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(command_args(checkpoint, questions, whole)["calibrate"]) == 0
    expected = lines(whole / "calib_predictions.jsonl")
    assert len(expected) == 20

    path = killed / "calib_predictions.jsonl"
    kill_once_written(command_args(checkpoint, questions, killed)["calibrate"], path)
    kept = lines(path)
    assert 2 <= len(kept) < 20 and not (killed / "calib.json").exists()

    assert main([*command_args(checkpoint, questions, killed)["calibrate"], "--resume"]) == 0
    assert lines(path)[: len(kept)] == kept  # what was on disk stayed, nothing before it decoded again
    assert lines(path) == expected
    assert json.loads((killed / "calib.json").read_text()) == json.loads((whole / "calib.json").read_text())


def test_a_placement_that_failed_resumes_decoding_only_what_it_had_not(checkpoint, tmp_path, monkeypatch):
    """`place-exits --speedup ideal` times each threshold of each placement apart (a file per run); after a failure
    injected part-way, the resumed run decodes every other batch once and
    chooses as an uninterrupted run does (the ideal speedup counts every batch's parameters, a resumed one's too).
    4 batches of 2 per run, 3 runs per placement (thresholds 1.0, 0.016, 0.014): the failure at the 11th batch leaves
    the first placement's first two runs whole on disk and half of the third, whose threshold it certifies."""
    from freevlm.eval import generate

    questions = gqa(tmp_path, 7)
    whole, failed = tmp_path / "whole", tmp_path / "failed"
    decode_batch, calls = generate._decode_batch, []

    def counting(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("injected failure")
        return decode_batch(*args, **kwargs)

    monkeypatch.setattr(generate, "_decode_batch", counting)

    def argv(out: Path) -> list[str]:
        args = command_args(checkpoint, questions, out)["place-exits"]
        args[args.index("--speedup") + 1] = "ideal"
        return args

    fail_at = 0
    assert main(argv(whole)) == 0
    total = len(calls)
    calls.clear()
    fail_at = 11
    with pytest.raises(RuntimeError, match="injected failure"):
        main(argv(failed))
    calls.clear()
    fail_at = 0
    assert main([*argv(failed), "--resume"]) == 0
    assert len(calls) == total - 10  # the 10 batches on disk were not decoded again

    def untimed(report: dict) -> dict:
        for placement in [report["chosen"], *report["alternatives"]]:
            placement["speedups"].pop("wallclock")
        return report

    got, want = (json.loads((out / "place.json").read_text()) for out in (failed, whole))
    assert untimed(got) == untimed(want)
    assert want["alternatives"][0]["speedups"]["ideal"] is not None


def test_a_calibration_resumed_with_other_options_is_refused_naming_them(checkpoint, tmp_path, capsys):
    questions = gqa(tmp_path, 4)
    out = tmp_path / "out"
    assert main(command_args(checkpoint, questions, out)["calibrate"]) == 0
    argv = [*command_args(checkpoint, questions, out)["calibrate"], "--resume"]
    argv[argv.index("--thresholds") + 1 : argv.index("--thresholds") + 4] = ["0.5", "1.0"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "thresholds: [0.014, 0.016, 1.0] in the file, [0.5, 1.0] now" in err and "--resume" in err
