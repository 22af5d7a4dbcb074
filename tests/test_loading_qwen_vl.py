"""`freevlm caption`, `finetune`, `train-exits`, `eval`, `sweep` and `calibrate` on a local folder holding a Qwen-VL
with its processor (built offline: tests/tiny_processor.py), loaded without its video part (`loading.images_only`: it
needs torchvision). These tests hold the bundle's inputs to the processor's own output, and to the model's own
`generate` and training's layout."""

import json

import pytest
import torch
from PIL import Image
from tiny_processor import tiny_qwen_vl_processor

from freevlm import EarlyExitVLM
from freevlm.cli import main
from freevlm.loading import load_vlm
from freevlm.tiny import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "what color is the square"


@pytest.fixture(params=["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
def folder(request, tmp_path):
    model = tiny_model(request.param, seed=3)
    processor = tiny_qwen_vl_processor(model)
    with torch.no_grad():  # sharper logits, and only ids the tokenizer has words for (so the captions say something)
        model.get_output_embeddings().weight.mul_(8)[len(processor.tokenizer) - 4 :] = 0
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (60, 36), (30, 30, 200)).save(tmp_path / "blue.png")
    return tmp_path


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl"])
@pytest.mark.parametrize("saved", ["processor", "tokenizer and image processor"])
def test_bundle_inputs_are_the_processor_s_own(tmp_path, family, saved):
    """`VLMBundle.inputs` on images of two sizes equals the model's processor called on the prompts as Qwen-VL
    writes an image (`<|vision_start|><|image_pad|><|vision_end|>`), left-padded: from a folder with the processor
    saved, and from one with only its tokenizer and image processor (as Qwen-VL checkpoints ship)."""
    model = tiny_model(family)
    processor = tiny_qwen_vl_processor(model)
    model.save_pretrained(tmp_path)
    parts = (processor,) if saved == "processor" else (processor.tokenizer, processor.image_processor)
    for part in parts:
        part.save_pretrained(tmp_path)
    assert (tmp_path / "processor_config.json").is_file() == (saved == "processor")
    bundle = load_vlm(tmp_path)
    assert type(bundle.processor).__name__ == type(processor).__name__
    images = [Image.new("RGB", (40, 40), (200, 30, 30)), Image.new("RGB", (60, 36), (30, 30, 200))]
    inputs = bundle.inputs(images, [PROMPT, f"is it red <|vision_start|><|image_pad|><|vision_end|> {PROMPT}"])
    processor.tokenizer.padding_side = "left"
    texts = [
        f"<|vision_start|><|image_pad|><|vision_end|>\n{PROMPT}",
        f"is it red <|vision_start|><|image_pad|><|vision_end|> {PROMPT}",
    ]
    ref = processor(images=images, text=texts, return_tensors="pt", padding=True)
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    assert inputs.keys() == set(keys)
    for key in keys:
        assert torch.equal(inputs[key], ref[key]), key
    assert inputs["attention_mask"][0, 0] == 0 and len(set(inputs["image_grid_thw"].prod(-1).tolist())) == 2


def test_caption_command_decodes_as_the_model_s_own_generate(folder, capsys):
    """Two images of different sizes in one batch: the command's full-model captions are the model's own greedy
    `generate` on the bundle's inputs, laid out as Qwen-VL's processor lays them out."""
    bundle = load_vlm(folder / "model")
    images = [Image.open(folder / name).convert("RGB") for name in ("red.png", "blue.png")]
    inputs = bundle.inputs(images, [PROMPT, PROMPT])
    cfg = bundle.model.config
    grid = inputs["image_grid_thw"]
    assert len(set(grid.prod(-1).tolist())) == 2
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for b in range(2):
        row = ids[b][mask[b].bool()].tolist()
        tokens = int(grid[b].prod()) // 4
        assert row[:3] == [2, cfg.vision_start_token_id, *[cfg.image_token_id]]  # BOS, then the image
        assert row[2 : 2 + tokens] == [cfg.image_token_id] * tokens and row[2 + tokens] == cfg.vision_end_token_id
    ref = bundle.model.generate(**inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    expected = [t.strip() for t in bundle.tokenizer.batch_decode(ref[:, ids.shape[1] :], skip_special_tokens=True)]
    command = ["caption", "--backbone", str(folder / "model"), "--prompt", PROMPT, "--mode", "full"]
    images = ["--image", str(folder / "red.png"), str(folder / "blue.png")]
    assert main([*command, *images, "--max-new-tokens", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"{folder / 'red.png'}: {expected[0]}", f"{folder / 'blue.png'}: {expected[1]}"]
    assert all(len(e.split()) >= 3 for e in expected)


def test_training_prompts_are_laid_out_as_caption_lays_them_out(folder):
    from training_helpers import write_shapes

    from freevlm.training import CaptionCollator, CaptionDataset, load_coco_captions

    bundle = load_vlm(folder / "model")
    records = load_coco_captions(write_shapes(folder / "data", 2), prompt=PROMPT)
    layout = EarlyExitVLM(bundle.model).backbone.config
    data = CaptionDataset(records, bundle.tokenizer, bundle.image_processor, layout, processor=bundle.processor)
    batch = CaptionCollator.for_model(layout)([data[0]])
    inputs = bundle.inputs([Image.open(records[0].image).convert("RGB")], [PROMPT])
    prompt_len = inputs["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][:, :prompt_len], inputs["input_ids"])
    assert (batch["targets"][:, : prompt_len - 1] == -100).all() and (batch["targets"][:, prompt_len - 1] >= 0).all()
    for key in ("pixel_values", "image_grid_thw"):
        assert torch.equal(batch[key], inputs[key])
    assert torch.equal(batch["mm_token_type_ids"][:, :prompt_len], inputs["mm_token_type_ids"])


def test_commands_read_the_folder(folder, tmp_path):
    """`finetune` (the patch mergers, as LLaVA's projector) writes a folder that loads back; `train-exits` trains
    from it; `eval` at threshold 0 sends every token out at the first exit, `sweep` too, and `calibrate` finds no
    risk at threshold 1.0 (the full model)."""
    import dataset_files as files
    from training_helpers import write_shapes

    captions = write_shapes(tmp_path / "data", 8)
    common = ["--captions", str(captions), "--dev-fraction", "0", "--no-progress", "--no-tensorboard", "--cpu"]
    common += ["--batch-size", "2", "--max-steps", "2"]
    before = load_vlm(folder / "model").model.model.visual.merger.state_dict()
    assert main(["finetune", "--backbone", str(folder / "model"), "--output", str(tmp_path / "ft"), *common]) == 0
    tuned = tmp_path / "ft" / "model"
    after = load_vlm(tuned).model.model.visual.merger.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    command = ["train-exits", "--backbone", str(tuned), "--output", str(tmp_path / "ex"), "--exit-layers", "1", "2"]
    assert main([*command, *common]) == 0
    exits = tmp_path / "ex" / "exits"
    q, a = files.vqa(tmp_path)
    args = ["--backbone", str(tuned), "--exits", str(exits), "--format", "vqav2", "--files", str(q), str(a)]
    args += ["--images", str(tmp_path / "val2014"), "--max-new-tokens", "2"]
    assert main(["eval", *args, "--threshold", "0.0", "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["speed"]["exit_histogram"].keys() == {"1"}
    sweep = ["sweep", *args, "--dev-files", str(q), str(a), "--thresholds", "0.0", "1.0", "--out", str(tmp_path / "sw")]
    assert main(sweep) == 0
    result = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert result["test"][0]["speed"]["exit_histogram"].keys() == {"1"}
    calib = tmp_path / "calib.json"
    assert main(["calibrate", *args, "--thresholds", "0.0", "1.0", "--tolerance", "0.7", "--out", str(calib)]) == 0
    assert json.loads(calib.read_text())["per_threshold"][0]["empirical_risk"] == 0.0  # 1.0: the full model
