"""`Copies`: one batch decoded under several exit policies side by side, image and prompt encoded once, each copy
token for token (and exit for exit) what `generate` gives under its policy alone."""

from dataclasses import replace

import pytest
import torch

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.decoding.config import DecodeConfig
from freevlm.decoding.engine import resolve_batch_policy
from freevlm.decoding.policies import ConfidencePolicy, Copies, FixedSchedulePolicy
from freevlm.methods import exit_rule
from freevlm.tiny import tiny_model, tiny_model_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def rules(num_layers: int, method: str = "free"):
    """Thresholds where this seed's tokens leave at every depth, one that never leaves, and forced exits."""
    thresholds = (0.0, 0.015, 0.02, 1.0) if method == "free" else (1, 2, 1000)
    return [exit_rule(method, t) for t in thresholds] + [FixedSchedulePolicy(1), FixedSchedulePolicy(num_layers)]


@pytest.mark.parametrize(
    "family, kv",
    [
        ("opt", "recompute"),
        ("opt", "propagate"),
        ("t5", "recompute"),
        ("llama", "recompute"),
        ("qwen2-vl", "recompute"),
    ],
)
def test_each_copy_is_what_its_policy_gives_alone(family, kv):
    model = tiny_model(family, seed=1)
    ee = EarlyExitVLM(model, ExitConfig([1, 2], init="fresh"))
    inputs = tiny_model_inputs(model, batch=3, prompt_len=4, seed=3, pad=True)
    exact = lambda rows: resolve_batch_policy("auto", rows) if kv == "recompute" else "per_row"  # noqa: E731
    config = DecodeConfig(max_new_tokens=8, kv=kv)
    alone = [
        ee.generate(**inputs, config=replace(config, policy=p, batch_policy=exact(3)))
        for p in rules(ee.backbone.num_layers)
    ]
    policies = rules(ee.backbone.num_layers)
    out = ee.generate(**inputs, config=replace(config, policy=Copies(policies), batch_policy=exact(3 * len(policies))))
    assert out.sequences.shape[0] == 3 * len(policies)
    for g, single in enumerate(alone):
        length = single.exit_layers.shape[1]
        assert torch.equal(out.sequences[3 * g : 3 * g + 3, : single.sequences.shape[1]], single.sequences), g
        assert torch.equal(out.exit_layers[3 * g : 3 * g + 3, :length], single.exit_layers), g
        assert (out.exit_layers[3 * g : 3 * g + 3, length:] == -1).all()  # nothing after the copy's own end
    histograms = [single.stats.exit_histogram for single in alone]
    if family == "opt" and kv == "recompute":  # the rules really differ here: mixed exits, none, all at 1
        assert len(histograms[1]) > 1 and set(histograms[3]) == {4} and set(histograms[4]) == {1}


def test_image_and_prompt_are_encoded_once_for_every_copy():
    """The vision model sees the batch's images once, and layer 0 runs the prompt (but its last slot) over the
    batch's 2 rows once; only the last slot runs for all 4 copies' 8 rows."""
    model = tiny_model("opt", seed=1)
    ee = EarlyExitVLM(model, ExitConfig([1, 2], init="fresh"))
    inputs = tiny_model_inputs(model, batch=2, prompt_len=4, seed=3)
    images, layer0 = [], []
    model.vision_model.register_forward_hook(lambda m, args, out: images.append(args[0].shape[0]))
    ee.backbone.layers[0].register_forward_hook(lambda m, args, out: layer0.append(tuple(args[0].shape[:2])))
    config = DecodeConfig(max_new_tokens=1, batch_policy="ride_along")
    out = ee.generate(**inputs, config=replace(config, policy=Copies([ConfidencePolicy(0.5)] * 4)))
    prompt_len = out.sequences.shape[1] - 1
    assert images == [2]
    assert layer0 == [(2, prompt_len - 1), (8, 1)]


def test_copies_refuse_beams_and_a_list_of_non_policies():
    model = tiny_model("opt", seed=1)
    ee = EarlyExitVLM(model, ExitConfig([1, 2], init="fresh"))
    with pytest.raises(ValueError, match="Copies needs a list of ExitPolicy"):
        Copies([0.5])
    config = DecodeConfig(num_beams=2, policy=Copies([ConfidencePolicy(0.5)]))
    with pytest.raises(ValueError, match="needs mode='early_exit' and num_beams=1"):
        ee.generate(**tiny_model_inputs(model), config=config)
