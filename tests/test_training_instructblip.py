"""Training a tiny InstructBLIP: the Q-Former reads the prompt as its instruction, as InstructBlipProcessor gives
it, and FREE exit training (the BLIP-2 recipe, unchanged) lowers held-out KL."""

import pytest
import torch
from tiny_processor import tiny_processor
from training_helpers import assert_kd_training_lowers_held_out_kl, write_shapes

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.data.images import load_image
from freevlm.tiny import tiny_instructblip
from freevlm.training import (
    CaptionCollator,
    CaptionDataset,
    Record,
    load_coco_captions,
    split_records,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_collate_gives_the_qformer_the_prompt_as_the_processor_does(tmp_path):
    records = load_coco_captions(write_shapes(tmp_path / "data", 4), prompt="what shape is it")
    records[1] = Record(records[1].image, "a photo of", records[1].target)  # rows of unequal length
    model = tiny_instructblip("opt")
    processor = tiny_processor(model)
    with pytest.raises(ValueError, match="instructblip's processor .*pass processor"):
        CaptionDataset(records, processor.tokenizer, processor.image_processor, model.config)
    data = CaptionDataset(records, processor.tokenizer, processor.image_processor, model.config, processor=processor)
    batch = CaptionCollator.for_model(model.config)([data[0], data[1]])
    expected = processor(
        images=[load_image(r.image) for r in records[:2]],
        text=[r.prompt for r in records[:2]],
        padding=True,
        return_tensors="pt",
    )
    assert torch.equal(batch["qformer_input_ids"], expected["qformer_input_ids"])
    assert torch.equal(batch["qformer_attention_mask"], expected["qformer_attention_mask"])


def test_kd_exit_training_lowers_heldout_kl_on_instructblip(tmp_path):
    """GAN + KD from fresh exits on a Vicuna (Llama) InstructBLIP: held-out KL(exit || final) falls, the backbone
    is untouched, and the exits decode with the instruction."""
    records = load_coco_captions(write_shapes(tmp_path / "data", 48))
    train, dev = split_records(records, 0.25, seed=0)
    model = tiny_instructblip("llama", seed=0)
    ee = EarlyExitVLM(model, ExitConfig([1]))
    with torch.no_grad():  # a sharper final layer: a distribution worth matching
        ee.backbone.text.norm.weight.mul_(6)
    processor = tiny_processor(model)
    tok, images = processor.tokenizer, processor.image_processor
    train_set, dev_set = (CaptionDataset(r, tok, images, model.config, processor=processor) for r in (train, dev))
    ee = assert_kd_training_lowers_held_out_kl(model, train_set, dev_set, tmp_path / "kd")
    item = train_set[0]
    image = torch.full((1, model.config.num_query_tokens), model.config.image_token_index)
    prompt = torch.cat([image, torch.tensor([[2]])], dim=1)
    instruction = torch.tensor([item["qformer_ids"]])
    out = ee.generate(item["pixel_values"][None], prompt, qformer_input_ids=instruction, max_new_tokens=5, threshold=0)
    assert (out.exit_layers[out.exit_layers >= 0] == 1).all()
