"""Early-exit baselines (DeeBLIP, PABEE-BLIP, LeeBLIP, MuE): exit rules, training recipes, parameter counts."""

import json
import math
import random
from functools import partial

import pytest
import torch
from cli_args import cli_args
from training_helpers import make_image_processor, make_tokenizer, write_shapes
from transformers import OPTConfig

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.decoding.baseline_policies import EntropyPolicy, PatiencePolicy, SimilarityPolicy, entropy
from freevlm.methods import METHODS, get_method, trainable_parameters
from freevlm.tiny import tiny_blip2, tiny_inputs
from freevlm.training import CaptionDataset, load_coco_captions, split_records
from freevlm.training import loop as loop_module
from freevlm.training.baselines import BaselineTrainConfig, evaluate_baseline, train_baseline

QUIET = dict(progress=False, checkpoint_every=10_000, log_every=5)


pytestmark = pytest.mark.usefixtures("one_thread")


def one_hot_logits(tokens, vocab=7, peak=5.0):
    logits = torch.zeros(len(tokens), vocab)
    logits[torch.arange(len(tokens)), torch.tensor(tokens)] = peak
    return logits


def run_policy(policy, exit_layers, per_exit, step=0, rows=None):
    """Drive `policy` like the engine: exits in depth order, rows that left compacted out. `per_exit[j]` gives
    (logits, hidden) for ALL rows at exit j. Returns each row's exit layer (None: the final layer)."""
    n = per_exit[0][1].shape[0]
    rows = torch.arange(n) if rows is None else rows
    left = {}
    for layer, (logits, hidden) in zip(exit_layers, per_exit):
        if layer not in policy.live_exits(exit_layers):
            continue
        leave = policy.decide(layer, None if logits is None else logits[rows], step, rows, hidden[rows])
        left.update({int(r): layer for r in rows[leave]})
        rows = rows[~leave]
    return [left.get(r) for r in range(n)]


# --- exit rules ----------------------------------------------------------------------------------------------
def test_entropy_policy_leaves_below_threshold():
    logits = torch.tensor([[0.0] * 4, [10.0, 0, 0, 0], [2.0, 1.0, 0, 0]])
    h = entropy(logits)
    assert h[0] == pytest.approx(math.log(4)) and h[1] < 0.01
    p = logits[2].softmax(-1)
    assert h[2] == pytest.approx(float(-(p * p.log()).sum()))
    rows = torch.arange(3)
    assert EntropyPolicy(0.5).decide(3, logits, 0, rows).tolist() == [False, True, False]
    assert EntropyPolicy(float(h[2]) + 1e-4).decide(3, logits, 0, rows).tolist() == [False, True, True]
    assert EntropyPolicy(0.0).live_exits([1, 2]) == []  # entropy is never < 0: no exit is even run
    with pytest.raises(ValueError, match="entropy threshold"):
        EntropyPolicy(-0.1)


def test_patience_two_leaves_exactly_when_two_consecutive_exits_agree():
    layers = [1, 2, 3, 4]
    #            exit1      exit2      exit3      exit4
    tokens = [[0, 1, 2, 3], [0, 2, 2, 4], [5, 2, 1, 5], [6, 2, 2, 6]]  # per exit, rows 0..3
    per_exit = [(one_hot_logits(t), torch.zeros(4, 2)) for t in tokens]
    # row 0: 0,0 -> leaves at 2; row 1: 1,2,2 -> 3; row 2: 2,2 -> 2; row 3: 3,4,5,6 never agrees
    assert run_policy(PatiencePolicy(2), layers, per_exit) == [2, 3, 2, None]
    assert run_policy(PatiencePolicy(1), layers, per_exit) == [1, 1, 1, 1]
    assert run_policy(PatiencePolicy(3), layers, per_exit) == [None, 4, None, None]
    assert PatiencePolicy(5).live_exits(layers) == []  # a run of 5 cannot happen on 4 exits


def test_patience_matches_the_rule_on_random_runs_and_resets_between_steps():
    rng = random.Random(0)
    layers = [2, 3, 5, 7, 8]
    policy = PatiencePolicy(2)
    for step in range(40):
        tokens = [[rng.randrange(3) for _ in range(6)] for _ in layers]
        expected = []
        for r in range(6):
            run, prev, out = 0, None, None
            for layer, toks in zip(layers, tokens):
                run = run + 1 if toks[r] == prev else 1
                prev = toks[r]
                if run >= 2:
                    out = layer
                    break
            expected.append(out)
        per_exit = [(one_hot_logits(t), torch.zeros(6, 2)) for t in tokens]
        assert run_policy(policy, layers, per_exit, step=step) == expected, step
    # one step's last exit never counts towards the next step's first
    policy = PatiencePolicy(2)
    same = [(one_hot_logits([4]), torch.zeros(1, 2))]
    assert run_policy(policy, [7], same, step=0) == [None]
    assert run_policy(policy, [7], same, step=1) == [None]
    # nor a new generate call starting at step 0 again (reused policy object, row ids past the first call's)
    assert run_policy(policy, [3], [(one_hot_logits([4, 4, 4]), torch.zeros(3, 2))], step=0) == [None] * 3


def test_similarity_leaves_when_consecutive_states_align():
    layers = [1, 2, 3]
    h1 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    h2 = torch.tensor([[2.0, 0.1], [0.0, 1.0], [1.0, 0.0]])  # cos(h1, h2): ~0.999, 0, 0
    h3 = torch.tensor([[1.0, 0.0], [0.1, 3.0], [0.0, 1.0]])  # cos(h2, h3): -, ~0.9994, 0
    per_exit = [(None, h1), (None, h2), (None, h3)]
    assert run_policy(SimilarityPolicy(0.99), layers, per_exit) == [2, 3, None]
    assert run_policy(SimilarityPolicy(0.9995), layers, per_exit) == [None, None, None]
    assert run_policy(SimilarityPolicy(0.0), layers, per_exit) == [2, 2, 2]  # cos 0 >= 0; the first exit cannot leave
    assert SimilarityPolicy(1.0).live_exits(layers) == [] and SimilarityPolicy(0.5).live_exits([4]) == []
    assert not SimilarityPolicy(0.5).needs_logits(2)  # the head runs only for tokens that leave
    # the next step compares nothing with the previous step's state
    policy = SimilarityPolicy(0.5)
    run_policy(policy, [1], [(None, h1)], step=0)
    assert run_policy(policy, [1, 2], [(None, h1), (None, -h1)], step=1) == [None, None, None]


@pytest.mark.parametrize("method", ["pabee", "mue"])
def test_engine_exits_follow_the_rule_on_a_tiny_backbone(method):
    """Generate with the engine, then recompute every exit's state by teacher forcing on the output: each token
    left at the first exit where the method's rule held, with the token that exit's logits pick."""
    model = tiny_blip2("opt", seed=3, num_layers=6)
    kind = get_method(method).exit_kind
    ee = EarlyExitVLM(model, ExitConfig([1, 2, 3, 4, 5], kind=kind))
    if kind == "linear":  # untrained heads equal the LM head: perturb them so exits disagree now and then
        torch.manual_seed(0)
        for e in ee.exits.values():
            e.classifier.weight.data += 0.05 * torch.randn_like(e.classifier.weight)
    policy = PatiencePolicy(2) if method == "pabee" else SimilarityPolicy(0.9)
    pixel_values, input_ids, mask = tiny_inputs(model, batch=1, prompt_len=3, seed=1)
    out = ee.generate(pixel_values, input_ids, mask, max_new_tokens=12, policy=policy, eos_token_id=[])
    exits = out.exit_layers[0].tolist()
    with torch.no_grad():
        states, _, _ = ee.backbone.features(pixel_values, out.sequences, torch.ones_like(out.sequences))
    prompt = out.sequences.shape[1] - len(exits)
    for j, left in enumerate(exits):
        pos = prompt + j - 1
        run, prev, rule_exit = 0, None, 6
        for at in ee.exit_layers:
            h = states[at][0, pos]
            if method == "pabee":
                token = int(ee.exits[str(at)].logits(ee.backbone, h[None]).argmax())
                run = run + 1 if token == prev else 1
                prev, hit = token, run >= 2
            else:
                hit = prev is not None and float(torch.cosine_similarity(h, prev, dim=0)) >= 0.9
                prev = h
            if hit:
                rule_exit = at
                break
        assert left == rule_exit, (j, exits)
        final = states[6][0, pos] if left == 6 else states[left][0, pos]
        logits = ee.backbone.head(final[None]) if left == 6 else ee.exits[str(left)].logits(ee.backbone, final[None])
        assert int(out.sequences[0, prompt + j]) == int(logits.argmax())
    assert len(set(exits)) > 1, exits  # the rule both fired and held back on this input


# --- training recipes ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes")
    records = load_coco_captions(write_shapes(folder / "data", 64))
    train, dev = split_records(records, 0.25, seed=0)
    model = tiny_blip2("opt", seed=0)
    tok, proc = make_tokenizer("opt"), make_image_processor()
    return model, *(CaptionDataset(r, tok, proc, model.config) for r in (train, dev))


def _config(out, method, **kw):
    base = dict(
        output_dir=str(out),
        method=method,
        exit_layers=(1, 3),
        max_steps=24,
        batch_size=8,
        lr=3e-3,
        meta_fraction=0.2,
        tensorboard=False,
        **QUIET,
    )
    return BaselineTrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def runs(shapes, tmp_path_factory):
    model, train_set, dev_set = shapes
    before_backbone = {k: v.clone() for k, v in model.state_dict().items()}
    untrained = evaluate_baseline(EarlyExitVLM(model, ExitConfig([1, 3], kind="linear")), dev_set)
    out = {}
    for method in ("deeblip", "pabee", "leeblip"):
        folder = tmp_path_factory.mktemp(method)
        ee = train_baseline(model, train_set, _config(folder, method), dev_set)
        out[method] = {
            "ee": ee,
            "folder": folder,
            "dev": json.loads((folder / "dev_metrics.json").read_text()),
            "info": json.loads((folder / "method.json").read_text()),
        }
    return {"untrained": untrained, "runs": out, "model": model, "before_backbone": before_backbone}


@pytest.mark.parametrize("method", ["deeblip", "pabee", "leeblip"])
def test_training_lowers_heldout_exit_loss(runs, method):
    before, after = runs["untrained"], runs["runs"][method]["dev"]
    for i in (1, 3):
        assert after[f"ce/exit_{i}"] < 0.6 * before[f"ce/exit_{i}"], (method, before, after)
        assert after[f"token_acc/exit_{i}"] > before[f"token_acc/exit_{i}"]
    model = runs["model"]
    assert all(torch.equal(v, runs["before_backbone"][k]) for k, v in model.state_dict().items())


def test_leeblip_learns_its_distillation_weights(runs):
    info = runs["runs"]["leeblip"]["info"]
    assert set(info["kd_weights"]) == {"1", "3"}
    assert all(abs(w - 1.0) > 1e-3 for w in info["kd_weights"].values()), info  # they moved from their start
    assert "kd_weights" not in runs["runs"]["deeblip"]["info"]


@pytest.mark.parametrize("method", ["deeblip", "leeblip"])
def test_baseline_exits_save_load_and_generate(runs, shapes, method):
    run = runs["runs"][method]
    model = shapes[0]
    loaded = EarlyExitVLM.from_pretrained(model, run["folder"] / "exits")
    assert loaded.exit_config.kind == "linear" and loaded.exit_layers == [1, 3]
    for k, v in run["ee"].exits.state_dict().items():
        assert torch.equal(loaded.exits.state_dict()[k], v)
    pixel_values = shapes[1][0]["pixel_values"][None]
    policy = get_method(method).policy(0.5)
    a = loaded.generate(pixel_values, max_new_tokens=4, policy=policy)
    b = run["ee"].generate(pixel_values, max_new_tokens=4, policy=get_method(method).policy(0.5))
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.exit_layers, b.exit_layers)


class Killed(Exception):
    pass


def test_leeblip_resume_after_kill_equals_uninterrupted_run(shapes, tmp_path, monkeypatch):
    model, train_set, _ = shapes
    cfg = dict(max_steps=8, checkpoint_every=4)
    train_baseline(model, train_set, _config(tmp_path / "full", "leeblip", **cfg))
    full = torch.load(tmp_path / "full/checkpoints/step-00000008/state.pt", weights_only=True)

    real_save = loop_module.save_checkpoint

    def save_then_die(*args, **kwargs):
        raise Killed(real_save(*args, **kwargs))

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_baseline(model, train_set, _config(tmp_path / "killed", "leeblip", **cfg))
    monkeypatch.setattr(loop_module, "save_checkpoint", real_save)
    with pytest.raises(FileExistsError, match="resume"):
        train_baseline(model, train_set, _config(tmp_path / "killed", "leeblip", **cfg))
    with pytest.raises(ValueError, match="trained as 'leeblip'"):
        train_baseline(model, train_set, _config(tmp_path / "killed", "deeblip", resume=True, **cfg))
    train_baseline(model, train_set, _config(tmp_path / "killed", "leeblip", resume=True, **cfg))
    resumed = torch.load(tmp_path / "killed/checkpoints/step-00000008/state.pt", weights_only=True)
    for part in ("exits", "weights"):
        for k, v in resumed[part].items():
            torch.testing.assert_close(v, full[part][k], rtol=1e-5, atol=1e-6)
    half = torch.load(tmp_path / "killed/checkpoints/step-00000004/state.pt", weights_only=True)
    assert not torch.equal(half["weights"]["log_weights.1"], resumed["weights"]["log_weights.1"])


def test_bad_baseline_configs_are_refused(shapes, tmp_path):
    model, train_set, _ = shapes
    with pytest.raises(ValueError, match="MuE trains nothing"):
        train_baseline(model, train_set, _config(tmp_path, "mue"))
    with pytest.raises(ValueError, match="meta split has 5 records"):
        train_baseline(model, train_set, _config(tmp_path, "leeblip", meta_fraction=0.1))


# --- parameter counts ----------------------------------------------------------------------------------------
def exit_parameters_from_config(text_config, kind: str) -> int:
    """Trainable parameters of ONE exit of `kind` on an LM with `text_config`, counted from modules built on the
    meta device, so a 2.7B-sized LM costs no memory: a decoder layer of the LM's class ("layer", FREE), a
    vocabulary-sized head without bias ("linear": DeeBLIP, PABEE-BLIP, LeeBLIP), nothing ("head": MuE)."""
    if kind == "head":
        return 0
    if kind == "linear":
        return text_config.hidden_size * text_config.vocab_size
    with torch.device("meta"):
        if text_config.model_type == "opt":
            from transformers.models.opt.modeling_opt import OPTDecoderLayer

            layer = OPTDecoderLayer(text_config, layer_idx=0)
        else:
            from transformers.models.t5.modeling_t5 import T5Block

            cfg = text_config.__class__(**{**text_config.to_dict(), "is_decoder": True})
            layer = T5Block(cfg, has_relative_attention_bias=False, layer_idx=0)
    return sum(p.numel() for p in layer.parameters())


@pytest.mark.parametrize("family", ["opt", "t5"])
def test_trainable_parameter_counts_match_the_modules_trained(family):
    model = tiny_blip2(family, seed=0)
    text = model.config.text_config
    layers = [1, 2]
    free = EarlyExitVLM(model, ExitConfig(layers))
    linear = EarlyExitVLM(model, ExitConfig(layers, kind="linear"))
    head = EarlyExitVLM(model, ExitConfig(layers, kind="head"))
    one_layer = (
        sum(p.numel() for p in model.language_model.get_decoder().layers[-1].parameters())
        if family == "opt"
        else sum(p.numel() for p in model.language_model.decoder.block[-1].parameters())
    )
    assert trainable_parameters(free) == 2 * one_layer == 2 * exit_parameters_from_config(text, "layer")
    vocab_head = model.language_model.get_output_embeddings().weight.numel()
    assert trainable_parameters(linear) == 2 * vocab_head == 2 * exit_parameters_from_config(text, "linear")
    assert trainable_parameters(head) == 0 == exit_parameters_from_config(text, "head")


def test_reported_counts_equal_the_trained_modules(runs):
    for method, run in runs["runs"].items():
        ee = run["ee"]
        expected = sum(e.classifier.weight.numel() for e in ee.exits.values()) + (2 if method == "leeblip" else 0)
        assert run["info"]["trainable_parameters"] == expected, method


def test_free_exit_is_about_37_percent_smaller_than_a_vocabulary_head_at_opt_2_7b():
    cfg = OPTConfig(hidden_size=2560, ffn_dim=10240, vocab_size=50272, num_attention_heads=32, num_hidden_layers=32)
    layer, head = exit_parameters_from_config(cfg, "layer"), exit_parameters_from_config(cfg, "linear")
    assert head == 2560 * 50272
    assert layer == 4 * (2560 * 2560 + 2560) + 2 * 2 * 2560 + 2 * 2560 * 10240 + 10240 + 2560
    assert 0.35 < 1 - layer / head < 0.42


def test_methods_registry():
    assert set(METHODS) >= {"free", "deeblip", "pabee", "leeblip", "mue"}
    assert isinstance(get_method("pabee").policy(2), PatiencePolicy)
    with pytest.raises(ValueError, match="whole number"):
        get_method("pabee").policy(0.5)
    with pytest.raises(ValueError, match="unknown method"):
        get_method("calm")


# --- sweeps per method, the CLI ------------------------------------------------------------------------------
def _vqa_records(tmp_path, n=10):
    import dataset_files as files

    from freevlm.data.records import VQARecord

    return [
        VQARecord(
            files.write_image(tmp_path / f"{i}.png", (25 * i, 255 - 20 * i, 90)),
            i,
            "what color ?",
            ["red"] * (i % 4) + ["blue"] * (10 - i % 4),
            "other",
        )
        for i in range(n)
    ]


def test_each_method_sweeps_the_same_split_with_its_own_rule(tmp_path):
    from tiny_processor import tiny_bundle

    from freevlm.decoding.config import DecodeConfig
    from freevlm.eval.evaluate import evaluate_vqa
    from freevlm.eval.options import EvalOptions
    from freevlm.eval.sweep import method_parameters, split_dev, sweep

    model = tiny_blip2("opt", seed=1, num_layers=6)
    runs = {
        name: EarlyExitVLM(model, ExitConfig([2, 4], init="fresh", kind=get_method(name).exit_kind))
        for name in ("free", "deeblip", "pabee", "mue")
    }
    bundle, records = tiny_bundle(model), _vqa_records(tmp_path)
    with pytest.raises(ValueError, match="kind 'linear'.*these exits are 'layer'"):
        evaluate_vqa(runs["free"], bundle, records[:1], 0.5, method="deeblip", config=DecodeConfig(max_new_tokens=1))
    thresholds = {"free": (0.0, 1.0), "deeblip": (0.0, 1.0), "pabee": (1, 2, 3), "mue": (0.0, 1.0)}
    dev, test = split_dev(records, 0.2)
    results = {
        name: sweep(
            ee,
            bundle,
            "vqa",
            test,
            dev,
            thresholds[name],
            per_layer=False,
            options=EvalOptions(
                DecodeConfig(max_new_tokens=2), method=name, prompt="question : {question} answer :", batch_size=4
            ),
        )
        for name, ee in runs.items()
    }
    for name, result in results.items():
        assert result.method == name and [r.threshold for r in result.test] == list(thresholds[name])
        assert len(result.dev[0].predictions) == 2 and len(result.test[0].predictions) == 8  # the same split for all
    # the rule's knob reaches the engine: threshold 0 / patience 1 leave at the first exit, 1.0 / 3 never leave
    for name in ("free", "deeblip"):
        assert set(results[name].test[0].speed.exit_histogram) == {2}
    assert set(results["pabee"].test[0].speed.exit_histogram) == {2}
    assert set(results["pabee"].test[2].speed.exit_histogram) == {6}
    assert set(results["mue"].test[0].speed.exit_histogram) == {4}  # cos >= 0 at the second exit (first has no pair)
    assert set(results["mue"].test[1].speed.exit_histogram) == {6}

    params = method_parameters(runs)
    assert params["mue"] == 0 and params["deeblip"] == params["pabee"] == 2 * 99 * 64
    assert params["free"] == 2 * exit_parameters_from_config(model.config.text_config, "layer")


def test_sweep_cli_method_mue_and_pabee(tmp_path):
    import dataset_files as files
    from tiny_processor import tiny_bundle

    from freevlm.cli import main
    from freevlm.loading import load_vlm

    model = tiny_blip2("opt", seed=2, num_layers=4)
    bundle = tiny_bundle(model)
    for part in (model, bundle.tokenizer, bundle.image_processor):
        part.save_pretrained(tmp_path / "backbone")
    EarlyExitVLM(load_vlm(tmp_path / "backbone").model, ExitConfig([1, 2], kind="linear")).save_exits(tmp_path / "ex")
    q, a = files.vqa(tmp_path)
    options = dict(format="vqav2", files=[q, a], images=tmp_path / "val2014", dev_files=[q, a], max_new_tokens=2)
    sweep = partial(cli_args, "sweep", "--no-per-layer", "--no-full", backbone=tmp_path / "backbone", **options)
    assert main(sweep(method="mue", out=tmp_path / "mue")) == 0
    mue = json.loads((tmp_path / "mue/results.json").read_text())
    assert mue["method"] == "mue" and [r["threshold"] for r in mue["test"]] == list(get_method("mue").thresholds)
    assert main(sweep(method="pabee", exits=tmp_path / "ex", thresholds=[1, 3], out=tmp_path / "pabee")) == 0
    pabee = json.loads((tmp_path / "pabee/results.json").read_text())
    assert pabee["rule"].startswith("patience") and set(pabee["test"][0]["speed"]["exit_histogram"]) == {"1"}
    assert main(sweep(method="deeblip", out=tmp_path / "x")) == 2  # no --exits
