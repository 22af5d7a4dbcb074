"""Training exits on tiny Qwen-VLs: prompts laid out by the model's own processor, batches carrying every image's
patches with its grid (`image_grid_thw`: images of different sizes in one batch, so different image-token counts) and
`mm_token_type_ids` as that processor gives them; the recipe is LLaVA's unchanged."""

import pytest
import torch
from PIL import Image
from tiny_processor import tiny_qwen_vl_processor
from training_helpers import assert_kd_training_lowers_held_out_kl, write_shapes

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.model import IGNORE_INDEX
from freevlm.tiny import tiny_model
from freevlm.training import CaptionCollator, CaptionDataset, Record, load_coco_captions, split_records

pytestmark = pytest.mark.usefixtures("one_thread")
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def test_training_inputs_are_the_processor_s_own_on_prompt_and_target(tmp_path, family):
    """Two images of different sizes in one batch, one prompt without its image (it goes in front, as `caption`
    puts it) and one holding it mid-prompt: each row is what the processor gives for prompt + target, then EOS
    (input_ids, mm_token_type_ids, the rows' patches one after another, their grids), right-padded; the targets are
    the target's tokens and EOS, each at the position before it, and IGNORE_INDEX at every image, prompt and padding
    position, so the loss reads the target tokens only."""
    model = tiny_model(family)
    processor = tiny_qwen_vl_processor(model)
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (60, 36), (30, 30, 200)).save(tmp_path / "blue.png")
    records = [
        Record(str(tmp_path / "red.png"), "what color is the square", "red"),
        Record(str(tmp_path / "blue.png"), f"is it {IMAGE} big", "no it is a small blue circle"),
    ]
    texts = [f"{IMAGE}\nwhat color is the square", f"is it {IMAGE} big"]
    layout = EarlyExitVLM(model).backbone.config
    data = CaptionDataset(records, processor.tokenizer, processor.image_processor, layout, processor=processor)
    batch = CaptionCollator.for_model(layout)([data[0], data[1]])
    eos = processor.tokenizer.eos_token_id
    pixels, grids = [], []
    for b, (r, text) in enumerate(zip(records, texts)):
        image = [Image.open(r.image).convert("RGB")]
        whole = processor(images=image, text=[f"{text} {r.target}"], return_tensors="pt")
        prompt = processor(images=image, text=[text], return_tensors="pt")["input_ids"][0].tolist()
        ids = whole["input_ids"][0].tolist() + [eos]
        n, start = len(ids), len(prompt)
        assert ids[:start] == prompt and batch["input_ids"][b, :n].tolist() == ids
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["mm_token_type_ids"][b, : n - 1].tolist() == whole["mm_token_type_ids"][0].tolist()
        assert not batch["mm_token_type_ids"][b, n - 1 :].any()
        targets = [IGNORE_INDEX] * batch["input_ids"].shape[1]
        targets[start - 1 : n - 1] = ids[start:]
        assert batch["targets"][b].tolist() == targets
        pixels.append(whole["pixel_values"])
        grids.append(whole["image_grid_thw"])
    assert torch.equal(batch["pixel_values"], torch.cat(pixels)) and torch.equal(
        batch["image_grid_thw"], torch.cat(grids)
    )
    assert grids[0].prod() != grids[1].prod()  # two image sizes: two image-token counts


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl"])
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
