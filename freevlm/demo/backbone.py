"""The demo's small BLIP-2 (or LLaVA): real Hugging Face classes, a frozen pretrained EfficientNet-Lite0 as image
encoder.

No BLIP-2 weights can be had here, so the demo trains its own. A ViT trained from scratch learns only the caption
prior in minutes on a CPU; a frozen pretrained encoder grounds (measured: see `freevlm.vision.efficientnet`), so
`vision_model` is `EfficientNetVisionEncoder` while the Q-Former, projection and LM (OPT, or T5 by argument) are
Hugging Face's. `family="llama"` builds a LLaVA instead: the same encoder as its vision tower, LLaVA's projector and
a Llama LM, with a `LlavaProcessor` (the image's 64 tokens where `<image>` stands).
The tokenizer is word-level over the shapes-world and easy-VQA words, built offline with `tokenizers`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    OPTConfig,
    PreTrainedTokenizerFast,
    T5Config,
)

from ..data import easyvqa, shapes
from ..files import write_text_atomic
from ..loading import BACKBONE_MARKER, VLMBundle
from ..vision.efficientnet import IMAGENET_MEAN, IMAGENET_STD, EfficientNetVisionEncoder

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIALS = (PAD, BOS, EOS, UNK, IMAGE)  # ids 0..4
PROMPT_WORDS = ("a", "photo", "of", "question", "answer", "short", "caption", ":", ",", ".")


def vocabulary() -> list[str]:
    """Special tokens, then every word of the shapes world, easy-VQA and the training prompts."""
    words = set(shapes.vocabulary()) | set(easyvqa.vocabulary()) | set(PROMPT_WORDS)
    return list(SPECIALS) + sorted(words - set(SPECIALS))


def build_tokenizer(family: str = "opt") -> PreTrainedTokenizerFast:
    """Word-level tokenizer; OPT-style (and Llama-style) prompts start with <s>, T5-style inputs end with </s>."""
    vocab = {word: i for i, word in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    if family in ("opt", "llama"):
        template = dict(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    else:
        template = dict(single=f"$A {EOS}", pair=f"$A $B {EOS}", special_tokens=[(EOS, vocab[EOS])])
    tok.post_processor = processors.TemplateProcessing(**template)
    specials = dict(pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK)
    tokens = dict(extra_special_tokens={"image_token": IMAGE}, padding_side="left")
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials, **tokens)


def build_image_processor(image_size: int = 128):
    """Hugging Face's BLIP image processor at `image_size` with ImageNet statistics (what EfficientNet saw)."""
    try:  # the default class needs torchvision; its PIL twin is the same processor without it
        from transformers import BlipImageProcessorPil as Processor
    except ImportError:
        from transformers import BlipImageProcessor as Processor
    size = {"height": image_size, "width": image_size}
    return Processor(size=size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, do_convert_rgb=True)


def demo_config(
    family: str = "opt",
    num_layers: int = 12,
    hidden_size: int = 256,
    num_heads: int = 4,
    num_query_tokens: int = 16,
    qformer_hidden_size: int = 128,
    qformer_layers: int = 2,
    image_size: int = 128,
    max_positions: int = 128,
) -> Blip2Config:
    """BLIP-2 config of the demo model; token ids match `build_tokenizer`. Dropout off: minutes of training only.

    The vision config describes the tokens the EfficientNet encoder hands the Q-Former (its `hidden_size`); the ViT
    it would build is replaced (and `initializer_range` is set so even that one is not dead).
    """
    vocab_size = len(vocabulary())
    pad, bos, eos, image = (SPECIALS.index(t) for t in (PAD, BOS, EOS, IMAGE))
    vision = Blip2VisionConfig(
        **dict(hidden_size=qformer_hidden_size, intermediate_size=2 * qformer_hidden_size, initializer_range=0.02),
        **dict(num_hidden_layers=1, num_attention_heads=2, image_size=image_size, patch_size=16),
    )
    qformer = Blip2QFormerConfig(
        **dict(hidden_size=qformer_hidden_size, num_hidden_layers=qformer_layers, num_attention_heads=4),
        **dict(intermediate_size=4 * qformer_hidden_size, encoder_hidden_size=qformer_hidden_size),
        **dict(vocab_size=vocab_size, max_position_embeddings=max_positions),
        **dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    )
    if family == "opt":
        text = OPTConfig(
            **dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers),
            **dict(num_attention_heads=num_heads, ffn_dim=4 * hidden_size, word_embed_proj_dim=hidden_size),
            **dict(max_position_embeddings=max_positions, dropout=0.0, attention_dropout=0.0),
            **dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad),
        )
    elif family == "t5":
        # encoder and decoder of equal depth: unequal depths break Hugging Face's own T5 cache
        text = T5Config(
            **dict(vocab_size=vocab_size, d_model=hidden_size, d_kv=hidden_size // num_heads, d_ff=4 * hidden_size),
            **dict(num_layers=num_layers, num_decoder_layers=num_layers, num_heads=num_heads, dropout_rate=0.0),
            **dict(feed_forward_proj="gated-gelu", decoder_start_token_id=pad, eos_token_id=eos, pad_token_id=pad),
        )
    else:
        raise ValueError(f"unknown family {family!r}: 'opt', 't5' or 'llama'")
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=image,
    )


@torch.no_grad()
def init_cross_attention(qformer: torch.nn.Module) -> None:
    """Variance-preserving weights (std 1/sqrt(fan-in)) for the Q-Former's cross-attention, the image's only way in.

    Hugging Face draws them with BERT's `initializer_range` 0.02, made for width 768. At the demo's width 128 that
    gives attention logits of ~0.05 (uniform over the 64 image tokens: a mean pool) and a value -> output gain of
    (0.02 * sqrt(128))^2 = 0.05, so the image moves the Q-Former output by ~1%: the LM learns the caption prior,
    and minutes of training recover the object count but never colour, shape or position.
    """
    for layer in qformer.encoder.layer:
        if getattr(layer, "has_cross_attention", False):
            att = layer.crossattention
            for linear in (att.attention.query, att.attention.key, att.attention.value, att.output.dense):
                linear.weight.normal_(std=linear.in_features**-0.5)
                linear.bias.zero_()


def llava_demo_config(
    num_layers: int = 12,
    hidden_size: int = 256,
    num_heads: int = 4,
    vision_hidden_size: int = 128,
    image_size: int = 128,
    max_positions: int = 128,
) -> LlavaConfig:
    """LLaVA config of the demo model (`demo_config`'s sizes): the vision config describes the EfficientNet's
    tokens (one per 16 px patch, behind the pooled token LLaVA's "default" strategy drops)."""
    pad, bos, eos, image = (SPECIALS.index(t) for t in (PAD, BOS, EOS, IMAGE))
    vision = CLIPVisionConfig(
        **dict(hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size, num_hidden_layers=1),
        **dict(num_attention_heads=2, image_size=image_size, patch_size=16),
    )
    text = LlamaConfig(
        **dict(vocab_size=len(vocabulary()), hidden_size=hidden_size, intermediate_size=4 * hidden_size),
        **dict(num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads),
        **dict(max_position_embeddings=max_positions, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad),
    )
    return LlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=image,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


def build_backbone(family: str = "opt", seed: int = 0, **config_kwargs) -> VLMBundle:
    """A fresh demo BLIP-2 (eval mode) with its tokenizer and image processor; sizes as in `demo_config`. Its
    `vision_model` is the EfficientNet encoder, the query tokens are drawn (not the dead zero default) and the
    Q-Former's cross-attention is initialised so that the image reaches its output (`init_cross_attention`).
    `family="llama"`: the LLaVA of `llava_demo_config`, with its processor."""
    if family == "llama":
        return _build_llava(seed, **config_kwargs)
    torch.manual_seed(seed)
    config = demo_config(family, **config_kwargs)
    vision, text = config.vision_config, config.text_config
    model = Blip2ForConditionalGeneration(config)
    model.vision_model = EfficientNetVisionEncoder(vision.hidden_size, vision.image_size, pretrained=True)
    with torch.no_grad():
        model.query_tokens.normal_(std=0.02)
    init_cross_attention(model.qformer)
    ids = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")  # T5 has no BOS, OPT no start
    model.generation_config = model.language_model.generation_config = GenerationConfig(
        max_new_tokens=24, **{name: getattr(text, name, None) for name in ids}
    )
    return VLMBundle(model.eval(), build_tokenizer(family), build_image_processor(vision.image_size))


def _build_llava(seed: int, **config_kwargs) -> VLMBundle:
    torch.manual_seed(seed)
    config = llava_demo_config(**config_kwargs)
    vision, text = config.vision_config, config.text_config
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = EfficientNetVisionEncoder(vision.hidden_size, vision.image_size, pretrained=True)
    model.generation_config = GenerationConfig(
        max_new_tokens=24, **{name: getattr(text, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    )
    image_processor, tokenizer = build_image_processor(vision.image_size), build_tokenizer("llama")
    layout = dict(patch_size=vision.patch_size, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    processor = LlavaProcessor(image_processor, tokenizer, **layout)
    return VLMBundle(model.eval(), processor.tokenizer, processor.image_processor, processor)


def vision_encoder(model: torch.nn.Module) -> EfficientNetVisionEncoder:
    """The demo model's image encoder: BLIP-2's `vision_model`, LLaVA's `vision_tower`."""
    return model.vision_model if hasattr(model, "vision_model") else model.model.vision_tower


def save_backbone(bundle: VLMBundle, path: str | os.PathLike) -> Path:
    """`save_pretrained` folder + a marker naming the encoder, so `freevlm.loading.load_vlm(path)` rebuilds it
    (from `freevlm.vision.VISION_MODELS`)."""
    path = Path(path)
    bundle.model.save_pretrained(path)
    for obj in bundle.preprocessing:
        obj.save_pretrained(path)
    marker = {"vision_model": vision_encoder(bundle.model).name, "family": bundle.model.config.text_config.model_type}
    write_text_atomic(path / BACKBONE_MARKER, json.dumps(marker, indent=2))
    return path
