"""Training exits on a tiny InternVL (Qwen2 LM): prompts and tiles laid out by its own processor (dynamic tiling, so
rows of a batch hold different numbers of tiles), and the recipe is LLaVA's unchanged."""

import pytest
import torch
from PIL import Image
from tiny_processor import tiny_processor
from training_helpers import assert_kd_training_lowers_held_out_kl, write_shapes

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.training import CaptionCollator, CaptionDataset, load_coco_captions, split_records

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kd_exit_training_lowers_heldout_kl_on_internvl(tmp_path):
    """Every third image is made 2:1 (2 tiles and a thumbnail; the square ones 4 and a thumbnail): a batch's prompts
    are the processor's own (each tile's tokens between `<img>` and `</img>`) and its `pixel_values` all rows' tiles
    one after another; GAN + KD from fresh exits lowers held-out KL(exit || final)."""
    from freevlm.tiny import tiny_model

    records = load_coco_captions(write_shapes(tmp_path / "data", 48))
    for r in records[::3]:
        Image.open(r.image).resize((64, 32)).save(r.image)
    train, dev = split_records(records, 0.25, seed=0)
    model = tiny_model("internvl-qwen2", seed=0)
    with torch.no_grad():
        model.model.language_model.norm.weight.mul_(6)
    processor = tiny_processor(model)
    layout = EarlyExitVLM(model, ExitConfig([1])).backbone.config
    train_set, dev_set = (
        CaptionDataset(r, processor.tokenizer, processor.image_processor, layout, processor=processor)
        for r in (train, dev)
    )
    wide = next(i for i, r in enumerate(train) if Image.open(r.image).size == (64, 32))
    square = next(i for i, r in enumerate(train) if Image.open(r.image).size == (32, 32))
    batch = CaptionCollator.for_model(layout)([train_set[wide], train_set[square]])
    tiles = []
    for b, r in enumerate((train[wide], train[square])):
        expected = processor(
            images=[Image.open(r.image).convert("RGB")], text=[f"<IMG_CONTEXT>\n{r.prompt}"], return_tensors="pt"
        )
        ids = expected["input_ids"][0].tolist()
        assert batch["input_ids"][b, : len(ids)].tolist() == ids
        tiles.append(expected["pixel_values"])
    assert [len(t) for t in tiles] == [3, 5] and torch.equal(batch["pixel_values"], torch.cat(tiles))
    assert (batch["input_ids"] == layout.image_token_index).sum(dim=1).tolist() == [3 * 4, 5 * 4]
    assert_kd_training_lowers_held_out_kl(model, train_set, dev_set, tmp_path / "kd")
