"""A model folder records the prompt it was trained with (`TrainingPrompt`), and `freevlm caption` and `eval` use it
when given none (the demo's captioner, asked after no prompt, answered ": a : a large : a small red triangle")."""

import argparse

import pytest
from PIL import Image
from training_helpers import save_tiny_blip2

from freevlm.cli import main
from freevlm.commands.evaluate import decoding_options
from freevlm.data.specs import DatasetSpec
from freevlm.loading import PROMPT_FILE, TrainingPrompt, load_vlm


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt")
    save_tiny_blip2(root / "backbone")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(root / "red.png")
    return root


def caption(folder, capsys, *prompt: str) -> str:
    args = ["caption", "--backbone", str(folder / "backbone"), "--image", str(folder / "red.png"), "--mode", "full"]
    assert main([*args, *prompt, "--max-new-tokens", "8"]) == 0
    return capsys.readouterr().out.splitlines()[0]


def test_caption_uses_the_recorded_prompt(folder, capsys):
    without, with_prompt = caption(folder, capsys), caption(folder, capsys, "--prompt", "what color is the shape")
    assert without != with_prompt, "the prompt changes nothing on this model: the test would see nothing"
    TrainingPrompt("what color is the shape").save_pretrained(folder / "backbone")
    try:
        assert load_vlm(folder / "backbone").prompt == "what color is the shape"
        assert caption(folder, capsys) == with_prompt
        assert caption(folder, capsys, "--prompt", "") == without  # an explicit prompt wins, even an empty one
    finally:
        (folder / "backbone" / PROMPT_FILE).unlink()


def test_a_damaged_record_is_one_clear_error(folder, capsys):
    (folder / "backbone" / PROMPT_FILE).write_text('{"prompt": 3}')
    try:
        with pytest.raises(ValueError, match="records no prompt text"):
            load_vlm(folder / "backbone")
    finally:
        (folder / "backbone" / PROMPT_FILE).unlink()


def test_eval_takes_the_recorded_prompt_for_captions_only():
    args = argparse.Namespace(kv="recompute", max_new_tokens=None, batch_size=4, prompt=None)
    recorded, unrecorded = argparse.Namespace(prompt="a photo of"), argparse.Namespace(prompt=None)
    captions, vqa = DatasetSpec("coco", ["x.json"], "images"), DatasetSpec("vqav2", ["q.json", "a.json"], "images")
    assert decoding_options(args, captions, recorded)[1] == "a photo of"
    assert decoding_options(args, captions, unrecorded)[1] is None  # the task's default
    assert decoding_options(args, vqa, recorded)[1] is None  # a captioning prompt is no VQA prompt
    args.prompt = "an image of"
    assert decoding_options(args, captions, recorded)[1] == "an image of"
