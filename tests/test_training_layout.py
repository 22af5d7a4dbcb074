"""Training's batches are what the model's own processor gives for prompt + target, for the families whose processor
lays out each image's tokens (`training.data.PROCESSOR_LAYOUT_TYPES`: those whose images are `pixel_values` rows one
after another, `CONCATENATED_PIXELS`, and InstructBLIP, its Q-Former reading the prompt): no hand layout to drift
from the processor's."""

import pytest
import torch
from PIL import Image
from tiny_processor import tiny_processor, tiny_qwen_vl_processor

from freevlm import EarlyExitVLM
from freevlm.model import IGNORE_INDEX
from freevlm.tiny import tiny_model
from freevlm.training import CaptionCollator, CaptionDataset, Record

pytestmark = pytest.mark.usefixtures("one_thread")
QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
# family: (how a prompt writes its image, the processor's per-token input, its per-image input)
FAMILIES = {
    "qwen2-vl": (QWEN_IMAGE, "mm_token_type_ids", "image_grid_thw"),
    "qwen2.5-vl": (QWEN_IMAGE, "mm_token_type_ids", "image_grid_thw"),
    "qwen3-vl": (QWEN_IMAGE, "mm_token_type_ids", "image_grid_thw"),
    "gemma3": ("<start_of_image>", "token_type_ids", None),
    "llama": ("<image>", None, None),  # LLaVA
    "internvl-qwen2": ("<IMG_CONTEXT>", None, None),
    # its query tokens go first, whatever the prompt: none stands in it
    "instructblip-opt": (None, None, None),
    "instructblip-llama": (None, None, None),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_training_inputs_are_the_processor_s_own_on_prompt_and_target(tmp_path, family):
    """Two images of different sizes in one batch, one prompt without its image (it goes in front, as `caption`
    puts it) and one holding it mid-prompt: each row is what the processor gives for prompt + target, then EOS
    (input_ids; token types, 0 at the target's; the rows' pixel rows one after another; Qwen-VL's grids;
    InstructBLIP's instruction, the prompt alone), right-padded; the targets are the target's tokens and EOS, each
    at the position before it, and IGNORE_INDEX at every image, prompt and padding position, so the loss reads the
    target tokens only."""
    image_text, token_key, image_key = FAMILIES[family]
    model = tiny_model(family)
    processor = tiny_qwen_vl_processor(model) if family.startswith("qwen") else tiny_processor(model)
    nested = family == "gemma3"  # its processor takes each prompt's images as a list
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (64, 32), (30, 30, 200)).save(tmp_path / "blue.png")
    records = [
        Record(str(tmp_path / "red.png"), "what color is the square", "red"),
        Record(str(tmp_path / "blue.png"), f"is it {image_text or ''} big", "no it is a small blue circle"),
    ]
    texts = [f"{image_text}\nwhat color is the square", f"is it {image_text} big"]
    if image_text is None:  # InstructBLIP: the prompts as given
        texts = [r.prompt for r in records]
    layout = EarlyExitVLM(model).backbone.config
    data = CaptionDataset(records, processor.tokenizer, processor.image_processor, layout, processor=processor)
    batch = CaptionCollator.for_model(layout)([data[0], data[1]])
    width, eos = batch["input_ids"].shape[1], processor.tokenizer.eos_token_id
    pixels, per_image = [], []
    for b, (r, text) in enumerate(zip(records, texts)):
        image = Image.open(r.image).convert("RGB")
        images = [[image]] if nested else [image]
        whole = processor(images=images, text=[f"{text} {r.target}"], return_tensors="pt")
        prompted = processor(images=images, text=[text], return_tensors="pt")
        prompt = prompted["input_ids"][0].tolist()
        ids = whole["input_ids"][0].tolist() + [eos]
        n, start = len(ids), len(prompt)
        assert ids[:start] == prompt and batch["input_ids"][b, :n].tolist() == ids
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (width - n)
        targets = [IGNORE_INDEX] * width
        targets[start - 1 : n - 1] = ids[start:]
        assert batch["targets"][b].tolist() == targets
        assert (token_key in batch) == (token_key is not None)
        if token_key is not None:
            assert batch[token_key][b, : n - 1].tolist() == whole[token_key][0].tolist()
            assert not batch[token_key][b, n - 1 :].any() and whole[token_key][0].any()
        assert ("qformer_input_ids" in batch) == ("qformer_input_ids" in prompted)
        if "qformer_input_ids" in prompted:  # the prompt alone, not the target, right-padded
            instruction = prompted["qformer_input_ids"][0].tolist()
            assert batch["qformer_input_ids"][b, : len(instruction)].tolist() == instruction
            assert batch["qformer_attention_mask"][b].sum() == len(instruction)
        pixels.append(whole["pixel_values"])
        per_image.append(whole[image_key] if image_key else None)
    assert torch.equal(batch["pixel_values"], torch.cat(pixels))
    if image_key:
        assert torch.equal(batch[image_key], torch.cat(per_image))
    counts = (batch["input_ids"] == layout.image_token_index).sum(dim=1).tolist()
    fixed = family in ("gemma3", "llama") or family.startswith("instructblip")
    assert counts[0] > 0 and (counts[0] != counts[1]) == (not fixed)
