"""Training exits on families whose processor lays out each image's tokens (Idefics3 / SmolVLM's tiles, LLaVA-NeXT's
and LLaVA-OneVision's patches at the image's best-fitting grid): prompts come from the processor image by image,
batches carry its per-image inputs (tiles padded to the batch's most), and the recipe is LLaVA's unchanged."""

import pytest
import torch
from PIL import Image
from tiny_processor import tiny_processor
from training_helpers import assert_kd_training_lowers_held_out_kl, write_shapes

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.tiny import tiny_model
from freevlm.training import CaptionCollator, CaptionDataset, load_coco_captions, split_records

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["idefics3", "smolvlm", "llava-next-qwen2", "llava-onevision"])
def test_kd_exit_training_lowers_heldout_kl_on_tiled_families(family, tmp_path):
    """Every other image is half as wide (fewer tiles or another grid, so fewer image tokens): a batch's prompts and
    pixel inputs are each image's as the processor gives them alone; GAN + KD from fresh exits lowers held-out
    KL(exit || final) and leaves the backbone as it was."""
    captions = write_shapes(tmp_path / "data", 48)
    records = load_coco_captions(captions)
    for r in records[::2]:
        Image.open(r.image).resize((16, 32)).save(r.image)
    train, dev = split_records(records, 0.25, seed=0)
    model = tiny_model(family, seed=0)
    backbone = EarlyExitVLM(model, ExitConfig([1])).backbone
    with torch.no_grad():  # sharper logits
        backbone.text.norm.weight.mul_(6)
    processor, layout = tiny_processor(model), backbone.config
    train_set, dev_set = (
        CaptionDataset(r, processor.tokenizer, processor.image_processor, layout, processor=processor)
        for r in (train, dev)
    )
    wide, narrow = (next(i for i, r in enumerate(train) if Image.open(r.image).width == w) for w in (32, 16))
    batch = CaptionCollator.for_model(layout)([train_set[wide], train_set[narrow]])
    for b, i in enumerate((wide, narrow)):
        alone = processor(images=[[Image.open(train[i].image)]], text=[train_set.prompts[i]], return_tensors="pt")
        ids = alone["input_ids"][0]
        assert batch["input_ids"][b, : len(ids)].tolist() == ids.tolist()
        tiles = alone["pixel_values"].shape[1]
        assert torch.equal(batch["pixel_values"][b, :tiles], alone["pixel_values"][0])
        assert not batch["pixel_values"][b, tiles:].any()  # padding tiles: zeros, which the image paths drop
        for key in ("pixel_attention_mask", "image_sizes"):
            assert (key in batch) == (key in alone)
            if key in alone:
                assert torch.equal(batch[key][b, : len(alone[key][0])], alone[key][0])
    image = layout.image_token_index
    counts = (batch["input_ids"] == image).sum(dim=1).tolist()
    assert counts[0] > counts[1], counts  # the narrow image has fewer tiles or a smaller grid
    assert_kd_training_lowers_held_out_kl(model, train_set, dev_set, tmp_path / "kd")


def test_a_tiled_family_without_its_processor_is_refused(tmp_path):
    records = load_coco_captions(write_shapes(tmp_path / "data", 2))
    model = tiny_model("idefics3")
    processor = tiny_processor(model)
    layout = EarlyExitVLM(model, ExitConfig([1])).backbone.config
    with pytest.raises(ValueError, match="idefics3's processor lays out each image's tokens.*pass processor"):
        CaptionDataset(records, processor.tokenizer, processor.image_processor, layout)
