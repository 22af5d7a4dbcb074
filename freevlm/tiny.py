"""Small random BLIP-2 models built from configs (tests, the quick-start command, benchmarks).

Built from a config, Hugging Face's BLIP-2 has a dead vision path: the vision config's default
`initializer_range` is 1e-10 and `query_tokens` start at zero, so images cannot change the output. We pass a real
initializer range and draw the query tokens, so the image matters in every model built here.
"""

from __future__ import annotations

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    OPTConfig,
    T5Config,
)


def blip2_config(
    family: str = "opt",
    num_layers: int = 4,
    hidden_size: int = 64,
    vocab_size: int = 99,
    num_heads: int = 4,
    num_query_tokens: int = 4,
    image_size: int = 32,
) -> Blip2Config:
    vision = Blip2VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=image_size, patch_size=8, initializer_range=0.02,
    )  # fmt: skip
    qformer = Blip2QFormerConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        encoder_hidden_size=32, vocab_size=vocab_size,
    )  # fmt: skip
    image_token = vocab_size - 1
    if family == "opt":
        text = OPTConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, ffn_dim=4 * hidden_size, word_embed_proj_dim=hidden_size,
            max_position_embeddings=512, bos_token_id=2, eos_token_id=3, pad_token_id=1,
        )  # fmt: skip
    elif family == "t5":
        # encoder and decoder of equal depth: unequal depths break Hugging Face's own T5 cache
        text = T5Config(
            vocab_size=vocab_size, d_model=hidden_size, d_kv=hidden_size // num_heads, d_ff=4 * hidden_size,
            num_layers=num_layers, num_decoder_layers=num_layers, num_heads=num_heads,
            decoder_start_token_id=0, eos_token_id=1, pad_token_id=0, feed_forward_proj="gated-gelu",
        )  # fmt: skip
    else:
        raise ValueError(f"unknown family {family!r}: 'opt' or 't5'")
    return Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
        num_query_tokens=num_query_tokens, image_token_index=image_token,
    )  # fmt: skip


def tiny_blip2(family: str = "opt", seed: int = 0, **config_kwargs) -> Blip2ForConditionalGeneration:
    """A random BLIP-2 in eval mode whose images do change its outputs."""
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(blip2_config(family, **config_kwargs))
    with torch.no_grad():
        model.query_tokens.normal_(std=0.02)
    return model.eval()


def tiny_inputs(model: Blip2ForConditionalGeneration, batch: int = 1, prompt_len: int = 3, seed: int = 0, pad: bool = False):
    """Random images and prompts in Hugging Face's layout: image tokens, then text; left padding if `pad`."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    size = cfg.vision_config.image_size
    pixel_values = torch.randn(batch, 3, size, size, generator=gen)
    vocab = cfg.text_config.vocab_size
    text = torch.randint(4, vocab - 1, (batch, prompt_len), generator=gen)
    image = torch.full((batch, cfg.num_query_tokens), cfg.image_token_index)
    mask = torch.ones(batch, cfg.num_query_tokens + prompt_len, dtype=torch.long)
    input_ids = torch.cat([image, text], dim=1)
    if pad and batch > 1:
        pad_id = cfg.text_config.pad_token_id
        for b in range(1, batch):
            n_pad = min(b, prompt_len - 1)
            input_ids[b] = torch.cat([torch.full((n_pad,), pad_id), input_ids[b, : input_ids.shape[1] - n_pad]])
            mask[b, :n_pad] = 0
    return pixel_values, input_ids, mask
