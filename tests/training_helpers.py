"""Offline pieces for the training tests: a word-level tokenizer that fits the tiny models' vocabularies, an image
processor, and a small synthetic image-caption set (coloured shapes) written in COCO captions format."""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BlipImageProcessorPil, PreTrainedTokenizerFast

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
SHAPES = ("circle", "square", "triangle")
SIDES = ("left", "right")
WORDS = [
    "a",
    "photo",
    "of",
    "on",
    "the",
    "question",
    "answer",
    "what",
    "color",
    "is",
    "shape",
    "big",
    "small",
    *COLORS,
    *SHAPES,
    *SIDES,
]


def make_tokenizer(family: str, image_token_index: int | None = None) -> PreTrainedTokenizerFast:
    """Special tokens where the tiny configs expect them (OPT: pad 1, bos 2, eos 3; T5: pad 0, eos 1), and `<image>`
    at `image_token_index` if given (LLaVA's prompts hold it)."""
    if family == "opt":
        specials = ["<unk>", "<pad>", "<s>", "</s>"]
        template = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    else:
        specials = ["<pad>", "</s>", "<unk>"]
        template = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    if image_token_index is not None:
        vocab["<image>"] = image_token_index
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = template
    kwargs = {"bos_token": "<s>"} if family == "opt" else {}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", **kwargs
    )
    if image_token_index is not None:
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tokenizer


def full_vocab_tokenizer() -> PreTrainedTokenizerFast:
    """OPT's specials, the shapes words, then a word for every other id the tiny LM can emit (98: image token)."""
    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    words = specials + WORDS
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(len(words), 98)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", bos_token="<s>"
    )


def make_qformer_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style tokenizer for the tiny Q-Former's vocabulary: [CLS] text [SEP], padding 0 on the right."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
    )


def make_image_processor(size: int = 32) -> BlipImageProcessorPil:
    return BlipImageProcessorPil(size={"height": size, "width": size})


def write_shapes(folder: Path, n: int, seed: int = 0, name: str = "captions.json") -> Path:
    """`n` images of one coloured shape on the left or right, captioned "a <color> <shape> on the <side>"."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    images, annotations = [], []
    for i in range(n):
        color, shape, side = rng.choice(list(COLORS)), rng.choice(SHAPES), rng.choice(SIDES)
        img = Image.new("RGB", (32, 32), (128, 128, 128))
        draw = ImageDraw.Draw(img)
        x = 2 if side == "left" else 17
        box = (x, 8, x + 13, 21)
        if shape == "circle":
            draw.ellipse(box, fill=COLORS[color])
        elif shape == "square":
            draw.rectangle(box, fill=COLORS[color])
        else:
            draw.polygon([(x, 21), (x + 13, 21), (x + 6, 8)], fill=COLORS[color])
        file = f"img_{seed}_{i:04d}.png"
        img.save(folder / file)
        images.append({"id": i, "file_name": file})
        annotations.append({"id": i, "image_id": i, "caption": f"a {color} {shape} on the {side}"})
    path = folder / name
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def save_tiny_clip(folder: Path) -> Path:
    """A random CLIP (32 px images) with a word tokenizer that ends every text with </s> (CLIP pools there)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=32,
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(specials) + len(WORDS),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=1,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def save_tiny_blip2(folder: Path, family: str = "opt", seed: int = 0) -> Path:
    """A tiny BLIP-2 folder that `load_vlm` reads (model + tokenizer + image processor)."""
    from freevlm.tiny import tiny_blip2

    tiny_blip2(family, seed=seed).save_pretrained(folder)
    make_tokenizer(family).save_pretrained(folder)
    make_image_processor().save_pretrained(folder)
    return folder


def assert_kd_training_lowers_held_out_kl(model, train_set, dev_set, output_dir: Path):
    """Fresh exits at layers 1 and 2 trained with KD (60 steps): each exit's held-out KL(exit || final) falls
    below a fifth of the untrained one and the backbone stays bit-identical. Returns the trained `EarlyExitVLM`."""
    import torch

    from freevlm import EarlyExitVLM, ExitConfig
    from freevlm.training import ExitTrainConfig, evaluate_exits, train_exits

    before_backbone = {k: v.clone() for k, v in model.state_dict().items()}
    untrained = evaluate_exits(EarlyExitVLM(model, ExitConfig([1, 2], "fresh")), dev_set)
    config = ExitTrainConfig(
        output_dir=str(output_dir),
        exit_layers=(1, 2),
        init="fresh",
        anchor="kd",
        max_steps=60,
        batch_size=8,
        lr=1e-3,
        disc_lr=1e-3,
        adv_weight=0.1,
        disc_hidden=64,
        warmup_steps=5,
        progress=False,
        checkpoint_every=10_000,
        log_every=10,
    )
    ee = train_exits(model, train_set, config, dev_set=dev_set)
    trained = evaluate_exits(ee, dev_set)
    for i in (1, 2):
        before, after = untrained[f"kl/exit_{i}"], trained[f"kl/exit_{i}"]
        assert after < 0.2 * before, f"exit {i}: held-out KL {before:.4f} -> {after:.4f}"
    assert all(torch.equal(v, before_backbone[k]) for k, v in model.state_dict().items())
    return ee
