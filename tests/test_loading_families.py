"""`freevlm caption` and `loading.load_vlm` on local folders holding a LLaVA, an InstructBLIP, a Gemma 3, an Idefics3,
a SmolVLM, a LLaVA-NeXT, a LLaVA-OneVision or an InternVL with its processor (built offline: tests/tiny_processor.py;
SmolVLM's, OneVision's and InternVL's without their video part, which needs torchvision), and what the loader
refuses."""

import json

import pytest
import torch
from cli_args import cli_args
from PIL import Image
from tiny_processor import WORDS, tiny_processor

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.cli import main
from freevlm.errors import UserError
from freevlm.loading import check_vlm_folder, load_vlm
from freevlm.tiny import tiny_inputs, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "what color is the square"


@pytest.fixture(
    params=[
        "llama",
        "instructblip-llama",
        "gemma3",
        "idefics3",
        "smolvlm",
        "llava-next-qwen2",
        "llava-onevision",
        "internvl-qwen2",
    ]
)
def folder(request, tmp_path):
    """A model and its processor saved side by side, as a Hugging Face checkpoint ships them."""
    model = tiny_model(request.param, seed=3)
    processor = tiny_processor(model)
    with torch.no_grad():  # sharper logits, and only words (so the captions say something and do not end at once)
        words = processor.tokenizer.convert_tokens_to_ids(WORDS)
        head = model.get_output_embeddings().weight.mul_(8)
        head[[i for i in range(len(head)) if i not in words]] = 0
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "red.png")
    return tmp_path


def test_caption_command_decodes_as_the_model_s_own_generate(folder, capsys):
    """The command's full-model caption is Hugging Face's greedy `generate` on the processor's inputs (LLaVA: the
    prompt gets `<image>` in front, expanded to one token per feature; InstructBLIP: the Q-Former reads it)."""
    bundle = load_vlm(folder / "model")
    image = Image.open(folder / "red.png").convert("RGB")
    model_type = bundle.model.config.model_type
    text = PROMPT if model_type == "instructblip" else f"{bundle.processor.image_token}\n{PROMPT}"
    nested = model_type in ("gemma3", "idefics3", "smolvlm")  # their processors take each prompt's images as a list
    images = [[image]] if nested else [image]
    hf_inputs = bundle.processor(images=images, text=[text], return_tensors="pt")
    ref = bundle.model.generate(**hf_inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    expected = bundle.tokenizer.decode(ref[0, hf_inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert (
        main(
            [
                "caption",
                "--backbone",
                str(folder / "model"),
                "--image",
                str(folder / "red.png"),
                "--prompt",
                PROMPT,
                "--mode",
                "full",
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{folder / 'red.png'}: {expected}" and len(expected.split()) >= 3
    inputs = bundle.inputs([image], [PROMPT])
    assert sorted(inputs) == sorted(hf_inputs)  # InstructBLIP: with the Q-Former's instruction
    assert all(torch.equal(inputs[k], hf_inputs[k]) for k in inputs)


def test_unsupported_and_incomplete_folders_are_named(folder):
    (folder / "model" / "processor_config.json").unlink()
    with pytest.raises(
        FileNotFoundError,
        match="no preprocessor_config.json or processor_config.json: save the processor beside the model",
    ):
        check_vlm_folder(folder / "model")
    config = json.loads((folder / "model" / "config.json").read_text())
    (folder / "model" / "config.json").write_text(json.dumps({**config, "model_type": "idefics2"}))
    with pytest.raises(
        ValueError,
        match="holds a 'idefics2' model: freevlm loads Blip2ForConditionalGeneration "
        r"\('blip-2'\), InstructBlipForConditionalGeneration",
    ):
        load_vlm(folder / "model")


def test_train_commands_read_the_folder(folder, tmp_path):
    """`finetune` then `train-exits` on the folder: the datasets get the prompt layout (InstructBLIP's: and the
    Q-Former's instruction) from the loaded processor, and the fine-tuned folder loads back with its processor."""
    from training_helpers import write_shapes

    captions = write_shapes(tmp_path / "data", 8)
    common = [
        "--captions",
        str(captions),
        "--no-progress",
        "--no-tensorboard",
        "--cpu",
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--dev-fraction",
        "0",
    ]
    assert main(["finetune", "--backbone", str(folder / "model"), "--output", str(tmp_path / "ft"), *common]) == 0
    tuned = tmp_path / "ft" / "model"
    assert load_vlm(tuned).processor is not None
    assert (
        main(["train-exits", "--backbone", str(tuned), "--output", str(tmp_path / "ex"), "--exit-layers", "1", *common])
        == 0
    )
    assert (tmp_path / "ex" / "exits").is_dir()


def test_a_qformer_instruction_for_a_model_without_one_is_refused():
    model = tiny_model("llama")
    ee = EarlyExitVLM(model, ExitConfig([1]))
    with pytest.raises(TypeError, match="'qformer_input_ids'.*LlavaForConditionalGeneration"):
        ee.generate(*tiny_inputs(model), qformer_input_ids=torch.ones(1, 3, dtype=torch.long), mode="full")


def test_training_prompts_are_laid_out_as_the_processor_lays_them_out(folder):
    """What training feeds the LM before the target is what `caption` feeds it (LLaVA: BOS, the image tokens, then
    the prompt; InstructBLIP: the image tokens first, the Q-Former reading the prompt; Idefics3: each tile's tokens
    and markers; LLaVA-NeXT: as many image tokens as the image's size gives), with the processor's image inputs."""
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
    for key in ("qformer_input_ids", "pixel_values", "pixel_attention_mask", "image_sizes"):
        assert (key in batch) == (key in inputs) and (key not in batch or torch.equal(batch[key], inputs[key]))
    assert ("token_type_ids" in batch) == ("token_type_ids" in inputs)  # Gemma 3's
    if "token_type_ids" in batch:
        assert torch.equal(batch["token_type_ids"][:, :prompt_len], inputs["token_type_ids"])
        assert not batch["token_type_ids"][:, prompt_len:].any()


def test_sweep_command_reads_the_folder(folder, tmp_path):
    """Evaluation batches the processor's inputs (InstructBLIP's instruction included) through `generate`."""
    import dataset_files as files

    EarlyExitVLM(load_vlm(folder / "model").model, ExitConfig([1, 2], init="fresh")).save_exits(tmp_path / "exits")
    q, a = files.vqa(tmp_path)
    out = tmp_path / "out"
    options = dict(format="vqav2", files=[q, a], images=tmp_path / "val2014", dev_files=[q, a], thresholds=[0.0, 1.0])
    saved = dict(backbone=folder / "model", exits=tmp_path / "exits")
    assert main(cli_args("sweep", **saved, **options, out=out, max_new_tokens=2)) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["test"][0]["speed"]["exit_histogram"].keys() == {"1"}  # threshold 0: every token at the first exit


@pytest.mark.parametrize(
    "folder",
    ["instructblip-llama", "gemma3", "idefics3", "smolvlm", "llava-next-qwen2", "llava-onevision", "internvl-qwen2"],
    indirect=True,
)
def test_eval_and_calibrate_commands_read_the_folder(folder, tmp_path):
    """The processor's own inputs (InstructBLIP's instruction, Gemma 3's token_type_ids, Idefics3's and SmolVLM's
    pixel_attention_mask, LLaVA-NeXT's image_sizes, OneVision's batch_num_images too) reach every request of `eval`
    and `calibrate` (without them InstructBLIP's, Gemma 3's, LLaVA-NeXT's and OneVision's requests are refused)."""
    import dataset_files as files

    EarlyExitVLM(load_vlm(folder / "model").model, ExitConfig([1, 2], init="fresh")).save_exits(tmp_path / "exits")
    q, a = files.vqa(tmp_path)
    common = ["--backbone", str(folder / "model"), "--exits", str(tmp_path / "exits"), "--format", "vqav2"]
    data = ["--files", str(q), str(a), "--images", str(tmp_path / "val2014"), "--max-new-tokens", "2"]
    assert main(["eval", *common, *data, "--threshold", "0.0", "--out", str(tmp_path / "eval")]) == 0
    result = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert result["speed"]["exit_histogram"].keys() == {"1"}
    calib = tmp_path / "calib.json"
    assert (
        main(["calibrate", *common, *data, "--thresholds", "0.0", "1.0", "--tolerance", "0.7", "--out", str(calib)])
        == 0
    )
    assert json.loads(calib.read_text())["per_threshold"][0]["empirical_risk"] == 0.0  # 1.0: the full model


def test_llava_onevision_bundle_inputs_decode_as_the_model_s_own_generate():
    """`VLMBundle.inputs` with LLaVA-OneVision's processor gives `image_sizes` and `batch_num_images` with the
    prompts; `generate` on them equals the model's own, images of two sizes side by side."""
    from tiny_processor import tiny_onevision_processor

    from freevlm.loading import VLMBundle

    model = tiny_model("llava-onevision", seed=3)
    processor = tiny_onevision_processor(model)
    bundle = VLMBundle(model, processor.tokenizer, processor.image_processor, processor)
    images = [Image.new("RGB", (30, 20), (200, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 200))]
    inputs = bundle.inputs(images, [PROMPT, f"<image> {PROMPT}"])
    assert {"image_sizes", "batch_num_images"} <= inputs.keys()
    image_tokens = (inputs["input_ids"] == model.config.image_token_index).sum(dim=1).tolist()
    assert image_tokens[0] != image_tokens[1]  # sizes decide the token counts
    ref = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    out = EarlyExitVLM(model, ExitConfig([1])).generate(**inputs, max_new_tokens=5, mode="full")
    assert torch.equal(out.sequences, ref)


def test_internvl_folder_with_images_in_several_tiles_decodes_as_the_model_s_own_generate(tmp_path, capsys):
    """InternVL's processor cuts each image into tiles (dynamic tiling: 2 tiles and a thumbnail for a 2:1 image, 4
    and a thumbnail for a square one): from the saved folder, `caption`, and `generate` at mode full and at threshold
    1.0, give exactly Hugging Face's greedy `generate` on the processor's own output for both images in one
    left-padded batch (whose output each tile changes)."""
    model = tiny_model("internvl-qwen2", seed=3)
    processor = tiny_processor(model)
    with torch.no_grad():  # sharper logits, and only words (so the captions say something)
        words = processor.tokenizer.convert_tokens_to_ids(WORDS)
        head = model.get_output_embeddings().weight.mul_(8)
        head[[i for i in range(len(head)) if i not in words]] = 0
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    files = [tmp_path / "wide.png", tmp_path / "square.png"]
    Image.new("RGB", (64, 32), (200, 30, 30)).save(files[0])
    Image.new("RGB", (40, 40), (30, 30, 200)).save(files[1])
    images = [Image.open(f).convert("RGB") for f in files]
    processor.tokenizer.padding_side = "left"
    hf_inputs = processor(images=images, text=[f"<IMG_CONTEXT>\n{PROMPT}"] * 2, return_tensors="pt", padding=True)
    tokens = (hf_inputs["input_ids"] == model.config.image_token_id).sum(dim=1)
    assert hf_inputs["pixel_values"].shape[0] == 8 and tokens.tolist() == [3 * 4, 5 * 4]  # image_seq_length 4
    ref = model.generate(**hf_inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    bundle = load_vlm(tmp_path / "model")
    inputs = bundle.inputs(images, [PROMPT, PROMPT])
    assert inputs.keys() == hf_inputs.keys() and all(torch.equal(inputs[k], hf_inputs[k]) for k in inputs)
    ee = EarlyExitVLM(bundle.model, ExitConfig([1, 2]))
    assert torch.equal(ee.generate(**inputs, max_new_tokens=5, mode="full").sequences, ref)
    assert torch.equal(ee.generate(**inputs, max_new_tokens=5, threshold=1.0).sequences, ref)
    expected = bundle.decode(ref[:, hf_inputs["input_ids"].shape[1] :])
    command = ["caption", "--backbone", str(tmp_path / "model"), "--prompt", PROMPT, "--mode", "full"]
    assert main([*command, "--image", *map(str, files), "--max-new-tokens", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"{f}: {e}" for f, e in zip(files, expected)]
    changed = hf_inputs["pixel_values"].clone()
    changed[1] = 0  # the wide image's second tile
    logits = [model(**dict(hf_inputs, pixel_values=p)).logits[0, -1] for p in (hf_inputs["pixel_values"], changed)]
    assert not torch.allclose(*logits, atol=1e-4)  # every tile reaches the output


def test_a_processor_loaded_without_its_video_part_saves_its_video_settings_back(tmp_path):
    """OneVision's processor loads without its video processor (which needs torchvision), under its own class name,
    with the settings its `__init__` takes; saved again, the folder keeps the video processor's settings, so it
    still loads whole where torchvision works."""
    from freevlm.loading import load_processor

    model = tiny_model("llava-onevision")
    tiny_processor(model).save_pretrained(tmp_path / "a")
    file = tmp_path / "a" / "processor_config.json"
    video = {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": 16, "width": 16}}
    file.write_text(json.dumps({**json.loads(file.read_text()), "video_processor": video}))
    processor = load_processor(tmp_path / "a")
    assert type(processor).__name__ == "LlavaOnevisionProcessor" and not hasattr(processor, "video_processor")
    assert (processor.num_image_tokens, processor.vision_aspect_ratio) == (4, model.config.vision_aspect_ratio)
    processor.save_pretrained(tmp_path / "b")
    saved = json.loads((tmp_path / "b" / "processor_config.json").read_text())
    assert saved == json.loads(file.read_text())


@pytest.mark.parametrize("folder", ["smolvlm"], indirect=True)
def test_smolvlm_without_num2words_is_one_line_naming_it(folder, monkeypatch, capsys):
    """SmolVLM's processor refuses to start without num2words: the command says so in one line."""
    import transformers.models.smolvlm.processing_smolvlm as smolvlm

    monkeypatch.setattr(smolvlm, "num2words", None)
    with pytest.raises(
        UserError, match="SmolVLM processor needs a package that is not installed.*pip install num2words"
    ):
        load_vlm(folder / "model")
    assert (
        main(["caption", "--backbone", str(folder / "model"), "--image", str(folder / "red.png"), "--mode", "full"])
        == 2
    )
    assert "pip install num2words" in capsys.readouterr().err
