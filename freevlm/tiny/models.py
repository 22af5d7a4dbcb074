"""The tiny random models, one builder per family (`tiny_model(family)` picks one); see the package docstring."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3VisionConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    MistralConfig,
    OPTConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMVisionConfig,
    T5Config,
)

LLAVA_TEXT_CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
TILED = {
    "smolvlm": (SmolVLMConfig, SmolVLMVisionConfig, SmolVLMForConditionalGeneration),
    "idefics3": (Idefics3Config, Idefics3VisionConfig, Idefics3ForConditionalGeneration),
}
TILED_MODELS = tuple(model_class for _, _, model_class in TILED.values())
QWEN_VL_CLASSES = {
    "qwen2-vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration),
    "qwen2.5-vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration),
    "qwen3-vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
}


def decoder_sizes(
    vocab_size: int = 99, hidden_size: int = 64, num_layers: int = 4, num_heads: int = 4, num_kv_heads: int = 2
) -> dict:
    """The LM sizes every builder takes as keywords, as the keywords every tiny Llama-like LM's config shares
    (Llama, Mistral, Qwen2, Gemma 3, the Qwen-VL line): a 2x MLP, room for 512 positions, BOS 2, EOS 3, pad 1."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=1,
    )


def tower(config_class, image_size: int = 16, patch_size: int = 4, layers: int = 1, **extra):
    """The vision tower config of every tiny model: width 32, a 2x MLP, 2 heads."""
    return config_class(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        **extra,
    )


def _random(model_class, config, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return model_class(config).eval()


def blip2_config(
    family: str = "opt", num_query_tokens: int = 4, image_size: int = 32, sliding_window: int | None = None, **sizes
) -> Blip2Config:
    """A BLIP-2 with a 1-layer ViT and Q-Former and an LM of `family` ("opt", "t5", "llama", "mistral" or "qwen2";
    `sizes`: `decoder_sizes`' keywords; `sliding_window` as `llava_config` takes it)."""
    lm = decoder_sizes(**sizes)
    vocab, hidden, layers, heads = (
        lm[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    )
    vision = tower(Blip2VisionConfig, image_size, 8, initializer_range=0.02)
    qformer = Blip2QFormerConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        encoder_hidden_size=32,
        vocab_size=vocab,
    )
    if family == "opt":
        text = OPTConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            ffn_dim=4 * hidden,
            word_embed_proj_dim=hidden,
            max_position_embeddings=512,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=1,
        )
    elif family == "t5":
        # encoder and decoder of equal depth: unequal depths break Hugging Face's own T5 cache
        text = T5Config(
            vocab_size=vocab,
            d_model=hidden,
            d_kv=hidden // heads,
            d_ff=4 * hidden,
            num_layers=layers,
            num_decoder_layers=layers,
            num_heads=heads,
            decoder_start_token_id=0,
            eos_token_id=1,
            pad_token_id=0,
            feed_forward_proj="gated-gelu",
        )
    elif family == "llama":  # InstructBLIP's Vicuna
        text = LlamaConfig(**lm)
    elif family in ("mistral", "qwen2"):  # the grouped-query LMs LLaVA's tiny configs have
        text = llava_config(family, sliding_window=sliding_window, **sizes).text_config
    else:
        raise ValueError(f"unknown family {family!r}: 'opt', 't5', 'llama', 'mistral' or 'qwen2'")
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=num_query_tokens,
        image_token_index=vocab - 1,
    )


def tiny_blip2(family: str = "opt", seed: int = 0, **config_kwargs) -> Blip2ForConditionalGeneration:
    """A random BLIP-2 in eval mode whose images do change its outputs."""
    model = _random(Blip2ForConditionalGeneration, blip2_config(family, **config_kwargs), seed)
    with torch.no_grad():
        model.query_tokens.normal_(std=0.02)
    return model


def tiny_instructblip(family: str = "opt", seed: int = 0, **config_kwargs) -> InstructBlipForConditionalGeneration:
    """A random InstructBLIP (the BLIP-2 of `blip2_config` with InstructBLIP's classes) whose images and
    instructions do change its outputs."""
    blip2 = blip2_config(family, **config_kwargs)
    vision, qformer = blip2.vision_config.to_dict(), blip2.qformer_config.to_dict()
    for sub in (vision, qformer):
        sub.pop("model_type")
    config = InstructBlipConfig(
        vision_config=vision,
        qformer_config=qformer,
        text_config=blip2.text_config.to_dict(),
        num_query_tokens=blip2.num_query_tokens,
        image_token_index=blip2.image_token_index,
    )
    model = _random(InstructBlipForConditionalGeneration, config, seed)
    with torch.no_grad():
        model.query_tokens.normal_(std=0.02)
    return model


def tiny_instruction(
    model: InstructBlipForConditionalGeneration, batch: int = 1, length: int = 4, seed: int = 0, pad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random Q-Former instructions `(qformer_input_ids, qformer_attention_mask)`; right padding if `pad`, as
    the Q-Former's BERT tokenizer pads."""
    gen = torch.Generator().manual_seed(seed + 1000)
    ids = torch.randint(1, model.config.qformer_config.vocab_size, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    if pad:
        for b in range(1, batch):
            n_pad = min(b, length - 1)
            ids[b, length - n_pad :], mask[b, length - n_pad :] = 0, 0
    return ids, mask


def llava_config(
    family: str = "llama", image_size: int = 16, sliding_window: int | None = None, **sizes
) -> LlavaConfig:
    """A LLaVA with a 2-layer CLIP tower (4 image tokens at the default size) and a grouped-query LM of `family`
    (`sizes`: `decoder_sizes`' keywords). `sliding_window` turns on Mistral's window (every layer) or Qwen2's
    (layers from 1 up)."""
    if family not in LLAVA_TEXT_CONFIGS:
        raise ValueError(f"unknown LLaVA language model {family!r}: one of {sorted(LLAVA_TEXT_CONFIGS)}")
    window = {}
    if family == "mistral":
        window = {"sliding_window": sliding_window}
    elif family == "qwen2" and sliding_window is not None:
        window = {"use_sliding_window": True, "sliding_window": sliding_window, "max_window_layers": 1}
    text = LLAVA_TEXT_CONFIGS[family](**decoder_sizes(**sizes), **window)
    return LlavaConfig(
        vision_config=tower(CLIPVisionConfig, image_size, 8, layers=2, projection_dim=32).to_dict(),
        text_config=text.to_dict(),
        image_token_index=text.vocab_size - 1,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def tiny_llava(family: str = "llama", seed: int = 0, **config_kwargs) -> LlavaForConditionalGeneration:
    """A random LLaVA in eval mode."""
    return _random(LlavaForConditionalGeneration, llava_config(family, **config_kwargs), seed)


def gemma3_config(image_size: int = 16, sliding_window: int = 3, **sizes) -> Gemma3Config:
    """A Gemma 3 with a 1-layer SigLIP tower (16 patches pooled into 4 image tokens) and an LM whose layers
    alternate sliding (window 3, shorter than the image) and global, each kind with its own rotary base;
    `query_pre_attn_scalar` is not the head size, as in the real models."""
    lm = decoder_sizes(**sizes)
    text = Gemma3TextConfig(
        **lm,
        head_dim=lm["hidden_size"] // lm["num_attention_heads"],
        query_pre_attn_scalar=24,
        sliding_window=sliding_window,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(lm["num_hidden_layers"])],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000.0},
        },
    )
    vocab = lm["vocab_size"]
    return Gemma3Config(
        text_config=text.to_dict(),
        vision_config=tower(SiglipVisionConfig, image_size, image_size // 4).to_dict(),
        mm_tokens_per_image=4,
        boi_token_index=vocab - 3,
        eoi_token_index=vocab - 2,
        image_token_index=vocab - 1,
    )


def tiny_gemma3(seed: int = 0, **config_kwargs) -> Gemma3ForConditionalGeneration:
    """A random Gemma 3 in eval mode whose images change its outputs (Hugging Face starts the projection at zero)
    and whose RMSNorms scale by 1 + a drawn weight (Hugging Face starts them at 1 + 0)."""
    model = _random(Gemma3ForConditionalGeneration, gemma3_config(**config_kwargs), seed)
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.05)
        for module in model.model.language_model.modules():
            if type(module).__name__ == "Gemma3RMSNorm":
                module.weight.normal_(std=0.1)
    return model


def internvl_config(family: str = "qwen2", **sizes) -> InternVLConfig:
    """An InternVL with a 1-layer InternViT (16 patches and CLS; pixel shuffle makes 4 image tokens of the patches)
    and the grouped-query LM `llava_config` gives `family`."""
    text = llava_config(family, **sizes).text_config
    return InternVLConfig(
        vision_config=tower(InternVLVisionConfig).to_dict(),
        text_config=text.to_dict(),
        image_token_id=text.vocab_size - 1,
        image_seq_length=4,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )


def tiled_config(family: str = "smolvlm", **sizes):
    """A SmolVLM or Idefics3 with a 1-layer tower over 16x16 tiles (16 patches, pixel-shuffled into 4 image tokens
    per tile) and the grouped-query Llama `llava_config` gives (SmolLM2 and Llama 3 are Llamas). Its own pad id is
    the LM's: transformers 5.17's generate pads finished rows with the default (128002), outside a tiny vocabulary."""
    config_class, vision_class, _ = TILED[family]
    text = llava_config("llama", **sizes).text_config
    return config_class(
        vision_config=tower(vision_class).to_dict(),
        text_config=text.to_dict(),
        image_token_id=text.vocab_size - 1,
        scale_factor=2,
        pad_token_id=text.pad_token_id,
    )


def qwen_vl_config(family: str = "qwen2-vl", sliding_window: int | None = None, **sizes):
    """A Qwen2-VL, Qwen2.5-VL or Qwen3-VL with a 2-block vision tower on 2x2 patches (2 frames each, merged 2x2
    into one image token) and a grouped-query LM whose rotary angles are split three ways (time, height, width:
    `mrope_section`; Qwen3-VL interleaves them). Qwen3-VL's tower feeds both its blocks' features to the LM's first
    two layers (DeepStack). `sliding_window` turns on Qwen2(.5)-VL's window from layer 1 up."""
    rope = {"rope_type": "default", "rope_theta": 1000.0, "mrope_section": [2, 3, 3]}
    text = dict(decoder_sizes(**sizes), rope_parameters=rope)
    hidden_size, vocab_size = text["hidden_size"], text["vocab_size"]
    if sliding_window is not None and family != "qwen3-vl":
        text.update(use_sliding_window=True, sliding_window=sliding_window, max_window_layers=1)
    vision = dict(depth=2, num_heads=2, patch_size=2, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    if family == "qwen2-vl":
        vision.update(embed_dim=32, hidden_size=hidden_size, mlp_ratio=2)
    elif family == "qwen2.5-vl":  # window attention in the tower's first block, full in its second
        vision.update(hidden_size=32, out_hidden_size=hidden_size, intermediate_size=64)
        vision.update(window_size=8, fullatt_block_indexes=[1])
    else:
        vision.update(hidden_size=32, out_hidden_size=hidden_size, intermediate_size=64)
        vision.update(num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
        head_dim = hidden_size // text["num_attention_heads"]
        text.update(head_dim=head_dim, rope_parameters={**rope, "mrope_section": [4, 2, 2], "mrope_interleaved": True})
    return QWEN_VL_CLASSES[family][0](
        text_config=text,
        vision_config=vision,
        image_token_id=vocab_size - 1,
        video_token_id=vocab_size - 2,
        vision_start_token_id=vocab_size - 4,
        vision_end_token_id=vocab_size - 3,
    )


def llava_next_config(family: str = "llama", **config_kwargs) -> LlavaNextConfig:
    """LLaVA-NeXT over `llava_config`'s tower and LM: 16x16 patches, grids of 1x2, 2x1 and 2x2 patches."""
    llava = llava_config(family, **config_kwargs)
    return LlavaNextConfig(
        vision_config=llava.vision_config.to_dict(),
        text_config=llava.text_config.to_dict(),
        image_token_index=llava.image_token_index,
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def llava_onevision_config(**config_kwargs) -> LlavaOnevisionConfig:
    """LLaVA-OneVision as released: a SigLIP tower (here 1 layer, 16x16 tiles of 4 patches, every feature kept: the
    "full" strategy) before a Qwen2 LM (`llava_config`'s), tiles on the grids `llava_next_config` has.
    `vision_aspect_ratio` "anyres_max_1" (the models' is "anyres_max_9") makes Hugging Face shrink the features of any
    image over one tile's worth, as it does the large images of the real models."""
    llava = llava_config("qwen2", **config_kwargs)
    return LlavaOnevisionConfig(
        vision_config=tower(SiglipVisionConfig, 16, 8).to_dict(),
        text_config=llava.text_config.to_dict(),
        image_token_index=llava.image_token_index,
        video_token_index=llava.image_token_index - 1,
        image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_1",
    )


def tiny_model(family: str = "opt", seed: int = 0, **config_kwargs) -> nn.Module:
    """A random model of any supported family (see the package docstring)."""
    if family in TILED:
        return _random(TILED[family][2], tiled_config(family, **config_kwargs), seed)
    if family in QWEN_VL_CLASSES:
        return _random(QWEN_VL_CLASSES[family][1], qwen_vl_config(family, **config_kwargs), seed)
    if family == "llava-onevision":
        return _random(LlavaOnevisionForConditionalGeneration, llava_onevision_config(**config_kwargs), seed)
    if family.startswith("llava-next-"):
        config = llava_next_config(family.removeprefix("llava-next-"), **config_kwargs)
        return _random(LlavaNextForConditionalGeneration, config, seed)
    if family.startswith("internvl-"):
        config = internvl_config(family.removeprefix("internvl-"), **config_kwargs)
        return _random(InternVLForConditionalGeneration, config, seed)
    if family == "gemma3":
        return tiny_gemma3(seed, **config_kwargs)
    if family in LLAVA_TEXT_CONFIGS:
        return tiny_llava(family, seed, **config_kwargs)
    if family.startswith("instructblip-"):
        return tiny_instructblip(family.removeprefix("instructblip-"), seed, **config_kwargs)
    return tiny_blip2(family, seed, **config_kwargs)
