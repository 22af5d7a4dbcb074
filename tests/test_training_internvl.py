"""Training exits on a tiny InternVL (Qwen2 LM): prompts laid out as its processor lays them out, and the recipe is
LLaVA's unchanged."""

from types import SimpleNamespace

import pytest
import torch
from tiny_processor import tiny_tokenizer
from training_helpers import assert_kd_training_lowers_held_out_kl, make_image_processor, write_shapes
from transformers import InternVLProcessor

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.tiny import tiny_model
from freevlm.training import CaptionCollator, CaptionDataset, load_coco_captions, split_records

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kd_exit_training_lowers_heldout_kl_on_internvl(tmp_path):
    """The prompt is `<img>`, the image's tokens, `</img>`, then the prompt, as `InternVLProcessor` expands
    `<IMG_CONTEXT>` (its own `replace_image_token`, one tile; the processor itself needs torchvision for its video
    part, which this environment lacks); GAN + KD from fresh exits lowers held-out KL(exit || final)."""
    records = load_coco_captions(write_shapes(tmp_path / "data", 48))
    train, dev = split_records(records, 0.25, seed=0)
    model = tiny_model("internvl-qwen2", seed=0)
    with torch.no_grad():
        model.model.language_model.norm.weight.mul_(6)
    tok = tiny_tokenizer(model)
    layout = EarlyExitVLM(model, ExitConfig([1])).backbone.config
    train_set, dev_set = (CaptionDataset(r, tok, make_image_processor(16), layout) for r in (train, dev))
    batch = CaptionCollator.for_model(layout)([train_set[0]])
    processor = SimpleNamespace(
        start_image_token="<img>", end_image_token="</img>", image_token="<IMG_CONTEXT>", image_seq_length=4
    )
    image = InternVLProcessor.replace_image_token(processor, {"num_patches": [1]}, 0)
    expected = tok(f"<IMG_CONTEXT>\n{train[0].prompt}".replace("<IMG_CONTEXT>", image))["input_ids"]
    assert batch["input_ids"][0, : len(expected)].tolist() == expected
    assert expected.count(layout.image_token_index) == 4 and tok.convert_ids_to_tokens(expected[1]) == "<img>"
    assert_kd_training_lowers_held_out_kl(model, train_set, dev_set, tmp_path / "kd")
