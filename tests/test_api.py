"""Public API: save/load of exits, and clear errors for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from freevlm import CheckpointMismatchError, EarlyExitVLM, ExitConfig
from freevlm.cli import main
from freevlm.tiny import tiny_blip2, tiny_inputs


def test_save_and_load_exits_round_trip(tmp_path, model):
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 3], init="fresh"))
    ee.save_exits(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exits.safetensors", "exits_config.json"]
    loaded = EarlyExitVLM.from_pretrained(model, tmp_path)
    assert loaded.exit_layers == [1, 3]
    for (name, a), (_, b) in zip(ee.exits.state_dict().items(), loaded.exits.state_dict().items()):
        assert torch.equal(a, b), name
    pv, ids, mask = tiny_inputs(model, batch=2, seed=2)
    a = ee.generate(pv, ids, mask, max_new_tokens=6, threshold=0.0)
    b = loaded.generate(pv, ids, mask, max_new_tokens=6, threshold=0.0)
    assert torch.equal(a.sequences, b.sequences)


def test_exit_parameters_are_one_lm_layer_each(model):
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 2, 3]))
    layer_params = sum(p.numel() for p in ee.backbone.layers[-1].parameters())
    assert sum(p.numel() for p in ee.parameters()) == 3 * layer_params
    assert all(p.requires_grad for p in ee.parameters())


@pytest.mark.parametrize("init", ["copy_last", "copy_next", "fresh"])
def test_exit_inits(model, init):
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([2], init=init))
    exit_state = ee.exits["2"].layer.state_dict()
    source = {"copy_last": -1, "copy_next": 2}.get(init)
    if source is None:
        assert not torch.equal(
            next(iter(exit_state.values())), next(iter(ee.backbone.layers[-1].state_dict().values()))
        )
    else:
        for k, v in ee.backbone.layers[source].state_dict().items():
            if k in exit_state:
                assert torch.equal(exit_state[k], v)
    assert ee.exits["2"].layer is not ee.backbone.layers[-1]


def test_checkpoint_for_another_backbone_is_refused(tmp_path, opt_model):
    ee = EarlyExitVLM.from_backbone(opt_model, ExitConfig([1, 2]))
    ee.save_exits(tmp_path)
    deeper = tiny_blip2("opt", num_layers=6)
    with pytest.raises(CheckpointMismatchError, match="num_layers"):
        EarlyExitVLM.from_pretrained(deeper, tmp_path)
    reseeded = tiny_blip2("opt", seed=123)
    with pytest.raises(CheckpointMismatchError, match="different weights"):
        EarlyExitVLM.from_pretrained(reseeded, tmp_path)
    t5 = tiny_blip2("t5")
    with pytest.raises(CheckpointMismatchError, match="family"):
        EarlyExitVLM.from_pretrained(t5, tmp_path)


def test_checkpoint_survives_a_dtype_cast(tmp_path):
    model = tiny_blip2("opt", seed=3)
    EarlyExitVLM.from_backbone(model, ExitConfig([2])).save_exits(tmp_path)
    loaded = EarlyExitVLM.from_pretrained(model.to(torch.bfloat16), tmp_path)
    assert loaded.exits["2"].layer.fc1.weight.dtype == torch.bfloat16


def test_missing_or_broken_checkpoint(tmp_path, opt_model):
    with pytest.raises(FileNotFoundError, match="exits_config.json"):
        EarlyExitVLM.from_pretrained(opt_model, tmp_path)
    EarlyExitVLM.from_backbone(opt_model, ExitConfig([1])).save_exits(tmp_path)
    (tmp_path / "exits_config.json").write_text("{not json")
    with pytest.raises(CheckpointMismatchError, match="not a freevlm exits config"):
        EarlyExitVLM.from_pretrained(opt_model, tmp_path)


@pytest.mark.parametrize(
    "layers,message",
    [([0], "out of range"), ([4], "out of range"), ([2, 2], "duplicated"), ([], "empty"), ([1.5], "not an integer")],
)
def test_bad_exit_layers(opt_model, layers, message):
    with pytest.raises(ValueError, match=message):
        EarlyExitVLM.from_backbone(opt_model, ExitConfig(layers))


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan"), "0.8"])
def test_threshold_outside_unit_interval(opt_model, threshold):
    ee = EarlyExitVLM.from_backbone(opt_model, ExitConfig([1]))
    pv, ids, mask = tiny_inputs(opt_model)
    with pytest.raises(ValueError, match="threshold must be a number in \\[0, 1\\]"):
        ee.generate(pv, ids, mask, threshold=threshold)


def test_bad_generate_arguments(opt_model):
    ee = EarlyExitVLM.from_backbone(opt_model, ExitConfig([1]))
    pv, ids, mask = tiny_inputs(opt_model, batch=2)
    with pytest.raises(ValueError, match="mode must be one of"):
        ee.generate(pv, ids, mask, mode="fast")
    with pytest.raises(ValueError, match="kv must be one of"):
        ee.generate(pv, ids, mask, kv="magic")
    with pytest.raises(ValueError, match="rows"):
        ee.generate(pv[:1], ids, mask)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ee.generate(pv, ids, mask, max_new_tokens=0)


def test_not_a_blip2_model():
    with pytest.raises(TypeError, match="Blip2ForConditionalGeneration"):
        EarlyExitVLM.from_backbone(nn.Linear(2, 2), ExitConfig([1]))


def test_default_prompt_is_hugging_faces(opt_model):
    ee = EarlyExitVLM.from_backbone(opt_model, ExitConfig([1]))
    pv, _, _ = tiny_inputs(opt_model, batch=2)
    ours = ee.generate(pv, max_new_tokens=5, mode="full")
    theirs = opt_model.generate(pixel_values=pv, max_new_tokens=5, do_sample=False)
    assert torch.equal(ours.sequences, theirs)


def test_cli_reports_missing_and_corrupt_images(tmp_path, capsys):
    missing = tmp_path / "nope.png"
    assert main(["caption", "--backbone", str(tmp_path), "--image", str(missing)]) == 2
    assert f"image not found: {missing}" in capsys.readouterr().err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 definitely not a jpeg")
    assert main(["caption", "--backbone", str(tmp_path), "--image", str(broken)]) == 2
    assert f"cannot read image {broken}" in capsys.readouterr().err


def test_cli_reports_a_missing_or_wrong_backbone(tmp_path, capsys):
    from PIL import Image

    image = tmp_path / "img.png"
    Image.new("RGB", (8, 8)).save(image)
    assert main(["caption", "--backbone", str(tmp_path / "none"), "--image", str(image)]) == 2
    assert "no model at" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt"}))
    assert main(["caption", "--backbone", str(tmp_path), "--image", str(image)]) == 2
    assert "holds a 'opt' model: freevlm loads Blip2ForConditionalGeneration" in capsys.readouterr().err


def test_tiny_run_prints_exit_layers_and_speedup(capsys):
    assert main(["tiny-run", "--layers", "6", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "exit layers [6, 6, 6, 6]" in out and "analytic speedup" in out


def test_linear_and_head_exits(tmp_path, model):
    """A linear exit starts as a copy of the LM head, so before training it answers like the head-only exit."""
    linear = EarlyExitVLM.from_backbone(model, ExitConfig([2], kind="linear"))
    head = EarlyExitVLM.from_backbone(model, ExitConfig([2], kind="head"))
    vocab, hidden = model.get_output_embeddings().weight.shape
    assert sum(p.numel() for p in linear.parameters()) == vocab * hidden
    assert sum(p.numel() for p in head.parameters()) == 0
    pv, ids, mask = tiny_inputs(model, batch=2, seed=4, pad=True)
    a = linear.generate(pv, ids, mask, max_new_tokens=6, threshold=0.0, return_engine=True)
    b = head.generate(pv, ids, mask, max_new_tokens=6, threshold=0.0)
    assert torch.equal(a.sequences, b.sequences)
    assert (a.exit_layers[a.exit_layers >= 0] == 2).all()
    assert a.engine.exit_kv == {}  # no attention in these exits: nothing to cache
    linear.save_exits(tmp_path)
    assert EarlyExitVLM.from_pretrained(model, tmp_path).exit_config.kind == "linear"


@pytest.mark.parametrize("static", [True, False])
def test_generation_uses_no_deprecated_transformers_call(model, static):
    """A deprecated keyword warns now and breaks when transformers removes it: every engine path must be clean."""
    import warnings

    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 2]))
    pv, ids, mask = tiny_inputs(model, batch=2, seed=0, pad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        ee.generate(pv, ids, mask, max_new_tokens=4, threshold=0.0, batch_policy="slowest", static=static)
        ee.generate(pv, ids, mask, max_new_tokens=4, threshold=0.0, batch_policy="per_row", kv="propagate")


def test_a_whole_process_uses_no_deprecated_transformers_call(family):
    """The same under `python -W error::FutureWarning`, from import through building to generating, so a deprecation
    fails here before the transformers release that removes it (pyproject's range is what this passed on)."""
    argv = [
        "-W",
        "error::FutureWarning",
        "-m",
        "freevlm.cli",
        "tiny-run",
        "--family",
        family,
        "--layers",
        "4",
        "--max-new-tokens",
        "3",
    ]
    run = subprocess.run(
        [sys.executable, *argv], cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=600, check=False
    )
    assert run.returncode == 0 and "threshold 0.00" in run.stdout, run.stderr[-3000:]


def test_cli_names_a_language_model_without_an_adapter(tmp_path, capsys):
    """A supported model class around an LM freevlm has no adapter for: one line naming both, exit code 2."""
    from PIL import Image
    from tiny_processor import tiny_processor

    from freevlm.tiny import tiny_model

    model = tiny_model("llama", seed=0)
    model.save_pretrained(tmp_path / "model")
    tiny_processor(model).save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["text_config"]["model_type"] = "gemma"  # Gemma's decoder reads Llama's weights, but has no adapter here
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    argv = ["caption", "--backbone", str(tmp_path / "model"), "--image", str(tmp_path / "img.png"), "--mode", "full"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "unsupported LLaVA language model 'gemma'" in err and "Traceback" not in err
