"""Training exits on tiny Qwen-VLs: prompts laid out by the model's own processor, batches carrying every image's
patches with its grid (`image_grid_thw`: images of different sizes in one batch, so different image-token counts) and
`mm_token_type_ids` as that processor gives them; the recipe is LLaVA's unchanged."""

import pytest
import torch
from PIL import Image
from tiny_processor import tiny_qwen_vl_processor
from training_helpers import assert_kd_training_lowers_held_out_kl, write_shapes

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.tiny import tiny_model
from freevlm.training import CaptionCollator, CaptionDataset, load_coco_captions, split_records

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_kd_exit_training_lowers_heldout_kl_on_qwen_vl(tmp_path, family):
    """GAN + KD from fresh exits, the final norm sharpened: held-out KL(exit || final) falls, the backbone is
    untouched, and the trained exits decode a prompt laid out as in training."""
    records = load_coco_captions(write_shapes(tmp_path / "data", 48))
    for r in records[::2]:  # half the images wider: another grid, more image tokens
        Image.open(r.image).resize((48, 32)).save(r.image)
    train, dev = split_records(records, 0.25, seed=0)
    model = tiny_model(family, seed=0)
    with torch.no_grad():
        model.model.language_model.norm.weight.mul_(6)
    layout = EarlyExitVLM(model, ExitConfig([1])).backbone.config
    processor = tiny_qwen_vl_processor(model)
    train_set, dev_set = (
        CaptionDataset(r, processor.tokenizer, processor.image_processor, layout, processor=processor)
        for r in (train, dev)
    )
    batch = CaptionCollator.for_model(layout)([train_set[i] for i in range(4)])
    image = batch["input_ids"] == layout.image_token_index
    grid = batch["image_grid_thw"]
    assert len(set(grid.prod(-1).tolist())) == 2  # two image sizes in the batch
    assert (
        image.sum(1).tolist() == (grid.prod(-1) // 4).tolist() and batch["pixel_values"].shape[0] == grid.prod(-1).sum()
    )
    assert torch.equal(batch["mm_token_type_ids"].bool(), image)
    start = batch["input_ids"][0].tolist().index(layout.vision_start_token_id)
    assert batch["input_ids"][0, start + 1 + int(image[0].sum())] == layout.vision_end_token_id
    ee = assert_kd_training_lowers_held_out_kl(model, train_set, dev_set, tmp_path / "kd")
    prompt = batch["input_ids"][:1, : int((batch["targets"][0] == -100).cumprod(0).sum()) + 1]
    patches = int(grid[0].prod())
    out = ee.generate(
        batch["pixel_values"][:patches],
        prompt,
        image_grid_thw=grid[:1],
        mm_token_type_ids=batch["mm_token_type_ids"][:1, : prompt.shape[1]],
        max_new_tokens=5,
        threshold=0.0,
    )
    assert (out.exit_layers[out.exit_layers >= 0] == 1).all()


def test_qwen_vl_without_its_processor_is_refused(tmp_path):
    records = load_coco_captions(write_shapes(tmp_path / "data", 2))
    model = tiny_model("qwen2.5-vl")
    processor = tiny_qwen_vl_processor(model)
    layout = EarlyExitVLM(model).backbone.config
    with pytest.raises(ValueError, match="qwen2_5_vl's processor lays out each image's tokens.*pass processor"):
        CaptionDataset(records, processor.tokenizer, processor.image_processor, layout)
