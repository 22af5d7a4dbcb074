"""The demo's small BLIP-2: ids agree across tokenizer and configs, the image matters, save + load_vlm round-trips,
and the early-exit engine runs on it."""

import pytest
import torch

from freevlm import EarlyExitVLM, ExitConfig
from freevlm.data import easyvqa, shapes
from freevlm.demo.backbone import IMAGE, build_backbone, save_backbone
from freevlm.loading import BACKBONE_MARKER, load_vlm
from freevlm.vision.efficientnet import EfficientNetVisionEncoder


@pytest.fixture(scope="module")
def bundle():
    return build_backbone("opt", seed=0, num_layers=10, hidden_size=64)


@pytest.fixture(scope="module")
def images():
    return [shapes.render(e.scene) for e in shapes.generate_split("test", 2, seed=0)]


def test_token_ids_agree_with_the_configs(bundle):
    tok, cfg, model = bundle.tokenizer, bundle.model.config, bundle.model
    assert len(tok) == cfg.text_config.vocab_size
    assert tok.convert_tokens_to_ids(IMAGE) == cfg.image_token_index
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        assert getattr(tok, name) == getattr(cfg.text_config, name) == getattr(model.generation_config, name)
        assert getattr(model.language_model.generation_config, name) == getattr(tok, name)
    assert tok("a photo of")["input_ids"][0] == tok.bos_token_id  # OPT-style prompt
    words = " ".join(shapes.vocabulary() + easyvqa.vocabulary())
    assert tok.unk_token_id not in tok(words, add_special_tokens=False)["input_ids"]
    assert (
        tok.decode(tok("what color is the shape?", add_special_tokens=False)["input_ids"])
        == "what color is the shape ?"
    )


def test_model_uses_the_frozen_efficientnet_and_sees_the_image(bundle, images):
    model = bundle.model
    assert isinstance(model.vision_model, EfficientNetVisionEncoder)
    assert model.query_tokens.std() > 0.01  # drawn, not Hugging Face's dead zeros
    inputs = bundle.inputs(images, ["a photo of"] * 2)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert (logits[0, -1] - logits[1, -1]).abs().max() > 1e-3  # two images, two answers


def test_the_image_moves_a_fresh_qformer_output(bundle):
    """The cross-attention is the image's only way into the Q-Former. With Hugging Face's init (std 0.02, for width
    768) a fresh 128-wide Q-Former's output moves by ~1% between images; a demo model trained from there learned
    the object count but never colour or shape. At variance-preserving init it moves by ~20%."""
    placements = (("large", 16, 13), ("small", 44, 7))  # size, x, radius
    objects = [
        shapes.ShapeObject(shape, colour, size, x, 32, radius)
        for colour in shapes.COLOURS
        for shape in shapes.SHAPES
        for size, x, radius in placements
    ]
    images = [shapes.render(shapes.Scene((obj,), 64)) for obj in objects]
    pixels = bundle.image_processor(images=images, return_tensors="pt")["pixel_values"]
    model = bundle.model
    with torch.no_grad():
        image = model.vision_model(pixels).last_hidden_state
        queries = model.query_tokens.expand(len(images), -1, -1)
        out = model.qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
    relative = (out.std(0).pow(2).mean() / out.pow(2).mean()).sqrt()  # across images, relative to the output's size
    assert relative > 0.1, relative


def test_save_and_load_vlm_round_trip(bundle, images, tmp_path):
    save_backbone(bundle, tmp_path / "backbone")
    assert (tmp_path / "backbone" / BACKBONE_MARKER).is_file()
    loaded = load_vlm(tmp_path / "backbone")
    assert isinstance(loaded.model.vision_model, EfficientNetVisionEncoder)
    prompts = ["a photo of", "question : how many shapes are there ? answer :"]
    inputs = bundle.inputs(images, prompts)
    assert all(torch.equal(v, loaded.inputs(images, prompts)[k]) for k, v in inputs.items())
    with torch.no_grad():
        assert torch.equal(bundle.model(**inputs).logits, loaded.model(**inputs).logits)
    out = bundle.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, loaded.model.generate(**inputs, max_new_tokens=6, do_sample=False))
    assert loaded.decode(out) == bundle.decode(out)


def test_early_exit_engine_runs_on_the_demo_backbone(bundle, images):
    """At threshold 1.0 the engine is Hugging Face's greedy decoding, token for token and of the same length; at
    threshold 0.0 every token leaves at the first exit."""
    ee = EarlyExitVLM.from_backbone(bundle.model, ExitConfig([3, 6, 9]))
    inputs = bundle.inputs(images, ["a photo of"] * 2)
    full = ee.generate(**inputs, max_new_tokens=4, threshold=1.0)
    hf = bundle.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert full.sequences.shape == hf.shape and torch.equal(full.sequences, hf)
    assert full.exit_layers.tolist() == [[10] * 4] * 2  # the final layer
    early = ee.generate(**inputs, max_new_tokens=4, threshold=0.0)
    assert early.exit_layers.tolist() == [[3] * 4] * 2


def test_t5_variant_builds_and_generates(images):
    t5 = build_backbone("t5", num_layers=2, hidden_size=64)
    assert t5.tokenizer("a photo of")["input_ids"][-1] == t5.tokenizer.eos_token_id  # T5-style input
    out = t5.model.generate(**t5.inputs(images, ["a photo of"] * 2), max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and out[0, 0] == t5.model.config.text_config.decoder_start_token_id


def test_llama_variant_is_a_llava_that_sees_the_image_and_round_trips(images, tmp_path):
    """`--family llama`: the same frozen EfficientNet as LLaVA's vision tower (64 image tokens, where the processor
    puts them), a Llama LM; the saved folder loads back with its processor and decodes the same."""
    llava = build_backbone("llama", num_layers=4, hidden_size=64)
    model, tok = llava.model, llava.tokenizer
    assert isinstance(model.model.vision_tower, EfficientNetVisionEncoder)
    assert tok.convert_tokens_to_ids(IMAGE) == model.config.image_token_index
    inputs = llava.inputs(images, ["a photo of"] * 2)
    assert inputs["input_ids"][0, 0] == tok.bos_token_id
    assert (inputs["input_ids"] == model.config.image_token_index).sum(1).tolist() == [64, 64]
    with torch.no_grad():
        logits = model(**inputs).logits
    assert (logits[0, -1] - logits[1, -1]).abs().max() > 1e-3  # two images, two answers
    ee = EarlyExitVLM.from_backbone(model, ExitConfig([1, 2]))
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(ee.generate(**inputs, max_new_tokens=4, threshold=1.0).sequences, out)
    save_backbone(llava, tmp_path / "backbone")
    loaded = load_vlm(tmp_path / "backbone")
    assert isinstance(loaded.model.model.vision_tower, EfficientNetVisionEncoder) and loaded.processor is not None
    assert torch.equal(
        loaded.model.generate(**loaded.inputs(images, ["a photo of"] * 2), max_new_tokens=4, do_sample=False), out
    )
