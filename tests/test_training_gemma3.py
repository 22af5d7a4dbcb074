"""Training exits on a tiny Gemma 3: prompts laid out by its processor, the batches carrying its token_type_ids (its
image tokens see each other both ways in training as in decoding), and the recipe is LLaVA's unchanged."""

import pytest
import torch
from tiny_processor import tiny_processor
from training_helpers import assert_kd_training_lowers_held_out_kl, write_shapes

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.tiny import tiny_model
from freevlm.training import CaptionCollator, CaptionDataset, load_coco_captions, split_records

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kd_exit_training_lowers_heldout_kl_on_gemma3(tmp_path):
    """GAN + KD from fresh (global-attention) exits, its final norm sharpened: held-out KL(exit || final) falls, the
    backbone is untouched, and the trained exits decode a prompt laid out as in training."""
    records = load_coco_captions(write_shapes(tmp_path / "data", 48))
    train, dev = split_records(records, 0.25, seed=0)
    model = tiny_model("gemma3", seed=0)
    with torch.no_grad():  # Gemma's RMSNorm scales by 1 + weight: 6x its output
        model.model.language_model.norm.weight.mul_(6).add_(5)
    processor = tiny_processor(model)
    layout = EarlyExitVLM(model, ExitConfig([1])).backbone.config
    train_set, dev_set = (
        CaptionDataset(r, processor.tokenizer, processor.image_processor, layout, processor=processor)
        for r in (train, dev)
    )
    batch = CaptionCollator.for_model(layout)([train_set[0], train_set[1]])
    assert torch.equal(batch["token_type_ids"].bool(), batch["input_ids"] == layout.image_token_index)
    ee = assert_kd_training_lowers_held_out_kl(model, train_set, dev_set, tmp_path / "kd")
    prompt = batch["input_ids"][:1, : int((batch["targets"][0] == -100).cumprod(0).sum()) + 1]
    out = ee.generate(
        batch["pixel_values"][:1],
        prompt,
        token_type_ids=batch["token_type_ids"][:1, : prompt.shape[1]],
        max_new_tokens=5,
        threshold=0.0,
    )
    assert (out.exit_layers[out.exit_layers >= 0] == 1).all()
