"""CapFilt, the training commands end to end, and 2-process training under `accelerate launch`."""

import json
import os
import subprocess
import sys

import pytest
import torch
from cli_args import cli_args
from PIL import Image
from training_helpers import save_tiny_blip2, save_tiny_clip, write_shapes

from freevlm import EarlyExitVLM, training
from freevlm.cli import main
from freevlm.loading import load_vlm
from freevlm.training import caption_loss_and_accuracy, load_coco_captions
from freevlm.training.capfilt import CapFiltConfig, capfilt, load_scorer, rank_captions, sample_captions

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return {
        "backbone": save_tiny_blip2(root / "backbone"),
        "clip": save_tiny_clip(root / "clip"),
        "captions": write_shapes(root / "data", 24),
        "root": root,
    }


class LengthScorer:
    """Prefers short captions: makes the expected ranking obvious."""

    def score(self, image, texts):
        return torch.tensor([-float(len(t)) for t in texts])


def test_rank_captions_keeps_top_k_distinct_best_first():
    image = Image.new("RGB", (32, 32))
    ranked = rank_captions(LengthScorer(), image, ["a red circle", "a dog", "", "a dog", "a big blue square"], top_k=2)
    assert ranked == [("a dog", -5.0), ("a red circle", -12.0)]


def test_capfilt_samples_scores_and_writes_coco(files, tmp_path):
    bundle = load_vlm(files["backbone"])
    records = load_coco_captions(files["captions"])
    paths = list(dict.fromkeys(r.image for r in records))[:3]
    config = CapFiltConfig(num_samples=5, top_k=2, max_new_tokens=6)
    torch.manual_seed(0)
    samples = sample_captions(bundle, [Image.open(p).convert("RGB") for p in paths], config)
    assert [len(s) for s in samples] == [5, 5, 5] and len({c for s in samples for c in s}) > 3  # really sampled
    scorer = load_scorer(f"clip:{files['clip']}")
    out = tmp_path / "pseudo.json"
    entries = capfilt(bundle, paths, scorer, out, config, progress=False)
    assert {e["image"] for e in entries} == set(paths)
    for path in paths:
        mine = [e for e in entries if e["image"] == path]
        assert 1 <= len(mine) <= 2 and mine[0]["score"] >= mine[-1]["score"]
        image = Image.open(path).convert("RGB")
        torch.testing.assert_close(
            scorer.score(image, [e["caption"] for e in mine]),
            torch.tensor([e["score"] for e in mine]),
            rtol=1e-4,
            atol=1e-5,
        )
    assert [(r.image, r.target) for r in load_coco_captions(out)] == [(e["image"], e["caption"]) for e in entries]
    with pytest.raises(ValueError, match="clip:PATH"):
        load_scorer("siglip:/x")
    with pytest.raises(ValueError, match="top_k"):
        capfilt(bundle, paths, scorer, out, CapFiltConfig(num_samples=2, top_k=3))


def test_blip2_itm_scorer(tmp_path):
    from training_helpers import make_image_processor, make_tokenizer
    from transformers import Blip2ForImageTextRetrieval

    from freevlm.tiny import blip2_config

    config = blip2_config("opt")
    config.qformer_config.use_qformer_text_input = True  # the Q-Former's text path, which ITM needs
    torch.manual_seed(0)
    model = Blip2ForImageTextRetrieval(config)
    with torch.no_grad():
        model.query_tokens.normal_(std=0.02)
    model.save_pretrained(tmp_path)
    make_tokenizer("opt").save_pretrained(tmp_path)
    make_image_processor().save_pretrained(tmp_path)
    scorer = load_scorer(f"itm:{tmp_path}")
    image, texts = Image.new("RGB", (32, 32), (200, 0, 0)), ["a red circle", "a blue square on the left"]
    scores = scorer.score(image, texts)
    assert scores.shape == (2,) and ((scores > 0) & (scores < 1)).all() and scores[0] != scores[1]
    for text, score in zip(texts, scores):  # batching and padding do not change a caption's score
        torch.testing.assert_close(scorer.score(image, [text]), score[None], rtol=1e-4, atol=1e-5)


def test_cli_finetune_capfilt_train_exits_and_resume(files, tmp_path, capsys, monkeypatch):
    loop = dict(batch_size=4, no_progress=True, dev_fraction=0.25, lr="1e-3")
    data = dict(backbone=files["backbone"], captions=files["captions"])
    held_out, finetune = [], training.finetune
    monkeypatch.setattr(training, "finetune", lambda *a, **kw: held_out.append(a[3]) or finetune(*a, **kw))
    assert main(cli_args("finetune", **data, output=tmp_path / "ft", max_steps=3, **loop)) == 0
    tuned = tmp_path / "ft/model"
    assert load_vlm(tuned).prompt == "a photo of"  # finetune's --prompt, recorded for caption, eval and serve
    # the dev loss written is the saved model's on the held-out images, and lower than the untrained backbone's
    dev_loss = json.loads((tmp_path / "ft/dev_metrics.json").read_text())["loss"]
    tuned_loss, untrained_loss = (
        caption_loss_and_accuracy(load_vlm(folder).model, held_out[0])["loss"] for folder in (tuned, files["backbone"])
    )
    assert dev_loss == pytest.approx(tuned_loss, rel=1e-5) and tuned_loss < untrained_loss, (dev_loss, untrained_loss)

    pseudo = tmp_path / "pseudo.json"
    options = dict(scorer=f"clip:{files['clip']}", captions=files["captions"], output=pseudo, num_samples=3)
    assert main(cli_args("capfilt", backbone=tuned, **options, max_new_tokens=5)) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["images"] == 24

    run = tmp_path / "exits"

    def train_exits(*extra, layers=("1", "2")):
        options = dict(backbone=tuned, captions=pseudo, anchor="capfilt", exit_layers=layers, disc_hidden=32)
        return main(cli_args("train-exits", *extra, **options, checkpoint_every=2, output=run, **loop))

    assert train_exits("--max-steps", "2") == 0
    assert train_exits("--max-steps", "4", "--resume") == 0
    assert (run / "checkpoints/latest").read_text() == "step-00000004"
    EarlyExitVLM.from_pretrained(load_vlm(tuned).model, run / "exits")

    assert train_exits("--max-steps", "6") == 2  # checkpoints there, no --resume
    assert "already holds checkpoints" in capsys.readouterr().err
    assert train_exits("--max-steps", "6", "--resume", layers=("2", "3")) == 2
    assert "exits at layers [1, 2], but this run asks for [2, 3]" in capsys.readouterr().err
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"images": [], "annotations": []}))
    assert main(cli_args("train-exits", backbone=tuned, captions=empty, exit_layers=1, output=tmp_path / "e")) == 2
    assert "empty.json is empty" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_accelerate_run_loads_with_from_pretrained(files, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts ONE process (accelerate 1.15); on a host without GPUs
    `--multi_gpu` is what gives 2 CPU processes (DistributedType.MULTI_CPU). Our own `--cpu` pins the device."""
    out = tmp_path / "ddp"
    options = dict(backbone=files["backbone"], captions=files["captions"], exit_layers=[1, 3], anchor="kd")
    options.update(batch_size=4, max_steps=4, checkpoint_every=2, lr="1e-3", disc_hidden=32, no_progress=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = [*launch, "-m", "freevlm.cli", *cli_args("train-exits", **options, cpu=True, output=out)]
    if torch.cuda.is_available():
        pytest.skip("--multi_gpu would start GPU processes here")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints/step-00000004").glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    model = load_vlm(files["backbone"]).model
    ee = EarlyExitVLM.from_pretrained(model, out / "exits")
    fresh = EarlyExitVLM(model, ee.exit_config)
    assert not all(torch.equal(v, fresh.exits.state_dict()[k]) for k, v in ee.exits.state_dict().items())


def test_options_left_out_keep_the_config_dataclass_defaults():
    """The config dataclasses are the one place defaults live: the CLI builds them from what was given only."""
    import argparse

    from freevlm.commands import train as train_cli
    from freevlm.training import ExitTrainConfig, FinetuneConfig
    from freevlm.training.baselines import BaselineTrainConfig

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers(dest="command"))
    common = ["--backbone", "b", "--captions", "c.json", "--output", "out"]
    for argv, cls, extra in [
        (["finetune"], FinetuneConfig, {}),
        (["train-exits", "--exit-layers", "2"], ExitTrainConfig, {"exit_layers": (2,)}),
        (
            ["train-baseline", "--method", "pabee", "--exit-layers", "2"],
            BaselineTrainConfig,
            {"exit_layers": (2,), "method": "pabee"},
        ),
    ]:
        args = parser.parse_args([*argv, *common])
        assert train_cli._config(cls, args, **extra) == cls(output_dir=args.output_dir, **extra), argv[0]
    args = parser.parse_args(
        ["train-exits", *common, "--exit-layers", "2", "--lr", "0.5", "--no-adversarial", "--grad-clip", "0"]
    )
    config = train_cli._config(ExitTrainConfig, args, exit_layers=(2,))
    assert (config.lr, config.adversarial, config.grad_clip, config.epochs) == (0.5, False, None, 3)


def test_help_shows_each_option_s_config_default(capsys):
    """Defaults live in the config dataclasses; `--help` reads them from there (finetune's weight decay is its own)."""
    from freevlm.training import ExitTrainConfig, FinetuneConfig

    for command, config in (("finetune", FinetuneConfig()), ("train-exits", ExitTrainConfig())):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        assert f"--weight-decay WEIGHT_DECAY (default: {config.weight_decay:g})" in help_text, command
        assert f"--lr LR (default: {config.lr:g})" in help_text, command
    assert f"discriminator hidden size (default: {ExitTrainConfig.disc_hidden})" in help_text
    assert "run folder: checkpoints, tensorboard, result --epochs" in help_text  # required: no default shown
    assert "discriminator learning rate (default: --lr) --disc-r1" in help_text  # None: the help says what it means
