"""Stage 2 (FREE exit training) on a tiny BLIP-2 fine-tuned on synthetic shapes captions."""

import json
import logging
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from training_helpers import make_image_processor, make_tokenizer, write_shapes

from freevlm import CheckpointMismatchError, EarlyExitVLM, ExitConfig
from freevlm.exits import FeatureDiscriminator
from freevlm.tiny import tiny_blip2
from freevlm.training import (
    CaptionDataset,
    ExitTrainConfig,
    FinetuneConfig,
    TrainingDiverged,
    caption_loss_and_accuracy,
    evaluate_exits,
    finetune,
    load_coco_captions,
    split_records,
    train_exits,
)
from freevlm.training import exits as exits_module
from freevlm.training import loop as loop_module
from freevlm.training.data import CaptionCollator
from freevlm.training.exits import (
    DiscriminatorMonitor,
    adversarial_loss,
    discriminator_loss,
    kd_loss,
    make_discriminators,
)

QUIET = dict(progress=False, checkpoint_every=10_000, log_every=10)


pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A tiny OPT BLIP-2 whose LM was fine-tuned (stage 1, LM trained too) so its final layer is confident: the
    exits then have a real distribution to match. Returns (model, train set, dev set)."""
    folder = tmp_path_factory.mktemp("shapes")
    records = load_coco_captions(write_shapes(folder / "data", 96))
    train, dev = split_records(records, 0.25, seed=0)
    model = tiny_blip2("opt", seed=0)
    tok, proc = make_tokenizer("opt"), make_image_processor()
    train_set, dev_set = (CaptionDataset(r, tok, proc, model.config) for r in (train, dev))
    config = FinetuneConfig(
        output_dir=str(folder / "ft"),
        max_steps=40,
        batch_size=8,
        lr=3e-3,
        warmup_steps=5,
        train_lm=True,
        tensorboard=False,
        **QUIET,
    )
    finetune(model, train_set, config)
    return model, train_set, dev_set


@pytest.fixture(scope="module")
def kd_run(shapes, tmp_path_factory):
    """A few hundred steps of GAN + KD exit training from fresh exits; records what tests compare."""
    model, train_set, dev_set = shapes
    out = tmp_path_factory.mktemp("kd")
    before_backbone = snapshot(model)
    untrained = evaluate_exits(EarlyExitVLM(model, ExitConfig([1, 2], "fresh")), dev_set)
    # adv_weight 0.1: this LM's KL is ~100x smaller than a real captioner's CE, so at weight 1 the adversarial term
    # alone would steer the (Adam-normalised) updates
    config = ExitTrainConfig(
        output_dir=str(out),
        exit_layers=(1, 2),
        init="fresh",
        anchor="kd",
        max_steps=150,
        batch_size=8,
        lr=1e-3,
        disc_lr=1e-3,
        adv_weight=0.1,
        disc_hidden=256,
        warmup_steps=5,
        **QUIET,
    )
    ee = train_exits(model, train_set, config, dev_set=dev_set)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return {
        "ee": ee,
        "model": model,
        "dev_set": dev_set,
        "before_backbone": before_backbone,
        "untrained": untrained,
        "trained": evaluate_exits(ee, dev_set),
        "events": events,
        "out": out,
    }


def test_kd_lowers_heldout_kl_and_logs_discriminator(kd_run):
    untrained, trained = kd_run["untrained"], kd_run["trained"]
    for i in (1, 2):
        before, after = untrained[f"kl/exit_{i}"], trained[f"kl/exit_{i}"]
        assert after < 0.2 * before, f"exit {i}: held-out KL {before:.4f} -> {after:.4f}"
    # D's accuracy in a GAN run depends on who is ahead at that step (bench/bench_discriminator.py): the tests below
    # check that D learns and that the exits' adversarial term moves it; here only that it is measured and logged
    assert len(kd_run["events"].Scalars("train/d_loss")) == 15
    for tag in (
        "train/g_adv_loss",
        "train/anchor_loss",
        "train/lr",
        "train/d_acc/exit_1",
        "dev/kl/exit_1",
        "dev/token_acc/exit_2",
        "dev/d_acc/exit_1",
        "dev/d_loss/exit_2",
    ):
        assert tag in kd_run["events"].Tags()["scalars"]
    # dev_metrics.json holds the trained D's accuracy and loss on the dev split, not the last batch's
    dev = json.loads((kd_run["out"] / "dev_metrics.json").read_text())
    discs = make_discriminators(kd_run["ee"], 256)
    state = torch.load(kd_run["out"] / "checkpoints/step-00000150/state.pt", weights_only=True)
    discs.load_state_dict(state["discriminators"])
    held_out = evaluate_exits(kd_run["ee"], kd_run["dev_set"], 8, discriminators=discs)
    for name in ("d_acc/exit_1", "d_loss/exit_2", "kl/exit_1"):
        assert dev[name] == pytest.approx(held_out[name], rel=1e-5), name


CHANCE = 2 * math.log(2)  # D's loss (BCE on real + on fake) when it cannot tell them apart


@pytest.fixture(scope="module")
def d_alone(shapes, tmp_path_factory):
    """The trainer with nothing to move the exits (adversarial and anchor weights 0): D trains alone on frozen,
    untrained exits. Returns the fresh exits, the trained discriminators and the held-out metrics."""
    model, train_set, dev_set = shapes
    out = tmp_path_factory.mktemp("d_alone")
    config = ExitTrainConfig(
        output_dir=str(out),
        exit_layers=(1, 2),
        init="fresh",
        max_steps=60,
        batch_size=8,
        lr=1e-3,
        disc_lr=1e-3,
        adv_weight=0.0,
        anchor_weight=0.0,
        disc_hidden=256,
        warmup_steps=5,
        schedule="constant",
        **QUIET,
    )
    ee = train_exits(model, train_set, config, dev_set=dev_set)
    discs = make_discriminators(ee, 256)
    discs.load_state_dict(torch.load(out / "checkpoints/step-00000060/state.pt", weights_only=True)["discriminators"])
    return {"ee": ee, "discs": discs, "dev": json.loads((out / "dev_metrics.json").read_text())}


def fresh_exits(model) -> EarlyExitVLM:
    """The exits `d_alone` starts from: the trainer builds them right after seeding with config.seed."""
    torch.manual_seed(0)
    return EarlyExitVLM(model, ExitConfig([1, 2], "fresh"))


def test_discriminator_separates_untrained_exits_from_final_features(d_alone, shapes):
    fresh = fresh_exits(shapes[0]).exits.state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in d_alone["ee"].exits.state_dict().items())  # only D trained
    for i in (1, 2):  # on held-out captions; 100% (loss ~0.3) here with 1 or 2 threads
        assert d_alone["dev"][f"d_acc/exit_{i}"] >= 0.9, d_alone["dev"]
        assert d_alone["dev"][f"d_loss/exit_{i}"] < 0.5 * CHANCE, d_alone["dev"]


def test_adversarial_term_moves_exits_until_a_fixed_discriminator_is_fooled(d_alone, shapes):
    """The G side of the game: descending `adversarial_loss` moves the exit features to where D says "real", and
    D's held-out loss responds (rises past chance). A few exit steps undo what D learned in 60."""
    (model, train_set, dev_set), discs = shapes, d_alone["discs"]
    ee = fresh_exits(model)  # the exits D was trained against, in a copy this test may move
    ee.exits.train()
    batch = CaptionCollator.for_model(ee.backbone.config)([train_set[i] for i in range(16)])
    d_before = {k: v.clone() for k, v in discs.state_dict().items()}
    opt = torch.optim.Adam(ee.exits.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        loss = adversarial_loss(discs, ee(batch).features)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses
    assert all(torch.equal(v, d_before[k]) for k, v in discs.state_dict().items())
    moved = evaluate_exits(ee, dev_set, discriminators=discs)
    for i in (1, 2):
        assert moved[f"d_loss/exit_{i}"] > CHANCE > d_alone["dev"][f"d_loss/exit_{i}"], moved
        assert moved[f"d_acc/exit_{i}"] <= 0.6, moved


def test_discriminator_and_adversarial_losses_train_opposite_sides():
    """Labels and detaching, exactly: D's loss trains D only (h_N real), G's adversarial loss trains the exits only."""
    torch.manual_seed(0)
    discs = torch.nn.ModuleDict({"1": FeatureDiscriminator(4, 8)})
    with torch.no_grad():  # D_1 says "real" iff the first coordinate is positive
        discs["1"].net[0].weight.zero_()
        discs["1"].net[0].weight[0, 0] = 1.0
        discs["1"].net[0].bias.zero_()
        discs["1"].net[2].weight.zero_()
        discs["1"].net[2].weight[0, 0] = 1.0
        discs["1"].net[2].bias.zero_()
    real = torch.tensor([[20.0, 0, 0, 0], [12.0, 1, 0, 0]])
    fake = (-real).requires_grad_(True)
    loss, acc = discriminator_loss(discs, real, {"1": fake})
    assert acc["1"].item() == 1.0 and loss.item() < 0.1
    loss.backward()
    assert fake.grad is None and discs["1"].net[2].weight.grad is not None
    swapped_loss, swapped_acc = discriminator_loss(discs, -real, {"1": real})
    assert swapped_acc["1"].item() == 0.0 and swapped_loss.item() > 5
    discs.zero_grad(set_to_none=True)
    adv = adversarial_loss(discs, {"1": fake})
    adv.backward()
    assert adv.item() > 2  # -log D(fake) is large where D calls the fakes fake
    assert fake.grad[:, 0].lt(0).all()  # descending it raises the coordinate D reads as "real"
    assert all(p.grad is None and p.requires_grad for p in discs.parameters())


def test_backbone_bit_identical_and_only_exit_layers_trainable(kd_run):
    after = snapshot(kd_run["model"])
    assert after.keys() == kd_run["before_backbone"].keys()
    assert all(torch.equal(after[k], kd_run["before_backbone"][k]) for k in after)
    ee = kd_run["ee"]
    one_layer = sum(p.numel() for p in ee.backbone.layers[-1].parameters())
    assert sum(p.numel() for p in ee.parameters() if p.requires_grad) == 2 * one_layer
    assert not any(p.requires_grad for p in kd_run["model"].parameters())


def test_saved_exits_load_and_generate(kd_run, shapes):
    model = shapes[0]
    loaded = EarlyExitVLM.from_pretrained(model, kd_run["out"] / "exits")
    for k, v in kd_run["ee"].exits.state_dict().items():
        assert torch.equal(loaded.exits.state_dict()[k], v)
    pixel_values = shapes[1][0]["pixel_values"][None]
    out = loaded.generate(pixel_values, max_new_tokens=5, threshold=0.5)
    assert out.sequences.shape[0] == 1


def _ce_config(out, **kw):
    base = dict(
        output_dir=str(out),
        exit_layers=(1, 3),
        anchor="ce",
        max_steps=12,
        batch_size=4,
        lr=1e-3,
        disc_hidden=64,
        checkpoint_every=6,
        progress=False,
        log_every=4,
    )
    return ExitTrainConfig(**{**base, **kw})


class Killed(Exception):
    pass


def test_resume_after_kill_equals_uninterrupted_run(shapes, tmp_path, monkeypatch):
    model, train_set, _ = shapes
    full = train_exits(model, train_set, _ce_config(tmp_path / "full"))
    full_state = {k: v.clone() for k, v in full.exits.state_dict().items()}
    full_discs = torch.load(tmp_path / "full/checkpoints/step-00000012/state.pt", weights_only=True)["discriminators"]

    real_save = loop_module.save_checkpoint

    def save_then_die(*args, **kwargs):
        path = real_save(*args, **kwargs)
        raise Killed(path)

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_exits(model, train_set, _ce_config(tmp_path / "killed"))
    monkeypatch.setattr(loop_module, "save_checkpoint", real_save)
    assert (tmp_path / "killed/checkpoints/latest").read_text() == "step-00000006"
    with pytest.raises(FileExistsError, match="resume"):
        train_exits(model, train_set, _ce_config(tmp_path / "killed"))
    resumed = train_exits(model, train_set, _ce_config(tmp_path / "killed", resume=True))

    assert not all(
        torch.equal(full_state[k], v) for k, v in EarlyExitVLM(model, ExitConfig([1, 3])).exits.state_dict().items()
    )
    for k, v in resumed.exits.state_dict().items():
        torch.testing.assert_close(v, full_state[k], rtol=1e-5, atol=1e-6)
    resumed_discs = torch.load(tmp_path / "killed/checkpoints/step-00000012/state.pt", weights_only=True)[
        "discriminators"
    ]
    for k, v in resumed_discs.items():
        torch.testing.assert_close(v, full_discs[k], rtol=1e-5, atol=1e-6)

    with pytest.raises(CheckpointMismatchError, match=r"exits at layers \[1, 3\].*asks for \[1, 2\]"):
        train_exits(model, train_set, _ce_config(tmp_path / "killed", exit_layers=(1, 2), resume=True, max_steps=14))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train_exits(model, train_set, _ce_config(tmp_path / "nothing", resume=True))


def test_without_adversarial_term_discriminators_stay_untouched(shapes, tmp_path):
    model, train_set, _ = shapes
    ee = train_exits(model, train_set, _ce_config(tmp_path, adversarial=False, max_steps=4, checkpoint_every=4))
    state = torch.load(tmp_path / "checkpoints/step-00000004/state.pt", weights_only=True)
    torch.manual_seed(0)  # the trainer builds the discriminators right after seeding with config.seed
    EarlyExitVLM(model, ExitConfig([1, 3]))
    fresh = exits_module.make_discriminators(ee, 64).state_dict()
    assert all(torch.equal(state["discriminators"][k], v) for k, v in fresh.items())
    assert not state["d_opt"]["state"]


def test_nonfinite_losses_are_skipped_then_abort(shapes, tmp_path, monkeypatch, caplog):
    model, train_set, _ = shapes
    monkeypatch.setattr(exits_module, "kd_loss", lambda *a, **k: torch.tensor(float("nan")))
    config = _ce_config(tmp_path, anchor="kd", max_steps=6, max_nonfinite_steps=3)
    with (
        caplog.at_level(logging.WARNING, logger="freevlm.training"),
        pytest.raises(TrainingDiverged, match="4 steps had non-finite losses.*generator loss"),
    ):
        train_exits(model, train_set, config)
    assert "step 0: non-finite generator loss, step skipped (1 skipped so far)" in caplog.text


def test_r1_penalty_is_half_gamma_times_squared_gradient_at_real_features():
    torch.manual_seed(0)
    discs = torch.nn.ModuleDict({"1": FeatureDiscriminator(6, 16)})
    real, fakes = torch.randn(5, 6), {"1": torch.randn(5, 6)}
    plain, _ = discriminator_loss(discs, real, fakes)
    penalised, _ = discriminator_loss(discs, real, fakes, r1=10.0)
    grads = torch.stack([torch.autograd.functional.jacobian(lambda x: discs["1"](x[None])[0], x) for x in real])
    torch.testing.assert_close(penalised - plain, 5.0 * grads.pow(2).sum(-1).mean())
    (penalised - plain).backward()  # the penalty alone trains D: its graph is kept
    assert discs["1"].net[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="disc_r1"):
        ExitTrainConfig(disc_r1=-1.0).validate()


def test_t5_exit_training_keeps_backbone_and_lowers_ce(tmp_path):
    model = tiny_blip2("t5", seed=1)
    records = load_coco_captions(write_shapes(tmp_path / "data", 24, seed=1))
    data = CaptionDataset(records, make_tokenizer("t5"), make_image_processor(), model.config)
    before = snapshot(model)
    config = _ce_config(tmp_path / "run", exit_layers=(1, 2), max_steps=30, lr=3e-3, log_every=5, checkpoint_every=30)
    ee = train_exits(model, data, config)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(model).items())
    one_layer = sum(p.numel() for p in ee.backbone.layers[-1].parameters())
    assert sum(p.numel() for p in ee.exits.parameters()) == 2 * one_layer
    events = EventAccumulator(str(tmp_path / "run/tensorboard"))
    events.Reload()
    ce = [e.value for e in events.Scalars("train/anchor_loss")]
    assert ce[-1] < 0.7 * ce[0], ce


def test_kd_loss_is_paper_kl_and_zero_on_equal_logits():
    a, b = torch.randn(5, 11), torch.randn(5, 11)
    p, q = a.softmax(-1), b.softmax(-1)
    expected = (p * (p / q).log()).sum(-1).mean()
    torch.testing.assert_close(kd_loss(a, b), expected)
    torch.testing.assert_close(kd_loss(a, b, direction="final_to_exit"), (q * (q / p).log()).sum(-1).mean())
    assert kd_loss(a, a, temperature=2.0).abs() < 1e-6


def test_discriminator_monitor_warns_on_collapse_and_chance(caplog):
    monitor = DiscriminatorMonitor(["3", "6"], window=5)
    with caplog.at_level(logging.WARNING, logger="freevlm.training"):
        for step in range(8):
            monitor.update({"3": 1.0, "6": 0.5 + 0.01 * (step % 2)}, step)
    assert caplog.text.count("exit 3 has been ~100% accurate") == 1
    assert caplog.text.count("exit 6 has been at ~50% accuracy") == 1


@pytest.mark.parametrize("name", ["disc_hidden", "d_warn_window"])
def test_config_refuses_sizes_below_one(name):
    from freevlm.training.exits import ExitTrainConfig

    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        ExitTrainConfig(**{name: 0}).validate()


def test_dev_evaluation_gives_every_module_its_mode_back(shapes):
    """Dev evaluation runs in eval mode, then each module is as it was: training exits keep their dropout for the
    steps after an `eval_every` evaluation (so a resumed run equals an uninterrupted one), and stage 1's frozen
    parts stay in eval mode while its trained parts train."""
    model, _, dev_set = shapes
    ee = EarlyExitVLM(model, ExitConfig([1, 2]))
    ee.exits.train()
    evaluate_exits(ee, torch.utils.data.Subset(dev_set, range(4)))
    assert all(m.training for m in ee.exits.modules()) and not ee.training
    model.eval()
    model.qformer.train()
    caption_loss_and_accuracy(model, torch.utils.data.Subset(dev_set, range(4)))
    assert all(m.training for m in model.qformer.modules())
    assert not any(m.training for m in model.language_model.modules()) and not model.training
    model.eval()  # the module's other tests share this model


def test_exit_runs_sharing_the_backbone_pass_train_the_same_exits(shapes, tmp_path, monkeypatch):
    """Under `sharing_features` (the demo trains six exit sets in turn on the same batches) the frozen backbone
    runs once per distinct batch, and the exits trained are bit-identical to those trained without it."""
    from freevlm.backbones import load_backbone, sharing_features

    model, train_set, _ = shapes
    model.requires_grad_(False)
    adapter = type(load_backbone(model))
    passes = []
    start = adapter.start

    def counting(self, *args, **kwargs):  # one call per backbone pass over a batch
        passes.append(1)
        return start(self, *args, **kwargs)

    monkeypatch.setattr(adapter, "start", counting)

    def train(name: str, anchor: str) -> tuple[EarlyExitVLM, int]:
        passes.clear()
        config = ExitTrainConfig(
            output_dir=str(tmp_path / name),
            exit_layers=(1, 2),
            init="fresh",
            anchor=anchor,
            max_steps=6,
            batch_size=8,
            warmup_steps=1,
            **QUIET,
        )
        return train_exits(model, train_set, config), len(passes)

    alone = [train("kd_alone", "kd"), train("ce_alone", "ce")]
    with sharing_features(model):
        shared = [train("kd_shared", "kd"), train("ce_shared", "ce")]
    for (a, _), (b, _) in zip(alone, shared, strict=True):
        torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)  # the same keys, equal weights
    assert alone[0][1] == alone[1][1] == shared[0][1] >= 6  # a pass per step (and per held-out batch)...
    assert shared[1][1] == 0  # ...but none in the second run under sharing_features: the same batches, reused
    model.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"), sharing_features(model):
        pass
