"""Random inputs for the tiny models, laid out as each family's processor lays them out."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    Gemma3ForConditionalGeneration,
    InstructBlipForConditionalGeneration,
    InternVLForConditionalGeneration,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
)

from ..inputs import pad_rows
from .models import QWEN_VL_CLASSES, TILED_MODELS, tiny_instruction

# images of the tiny Qwen-VLs: (t, h, w) patch grids, 2x2 patches merged into one image token (6, 4 and 2 tokens)
QWEN_VL_GRIDS = ((1, 4, 6), (1, 4, 4), (1, 2, 4))


@torch.no_grad()
def image_tokens(model: nn.Module, pixel_values: torch.Tensor) -> int:
    """Image tokens a prompt holds per image: LLaVA's feature count (asked of the model), BLIP-2's query tokens."""
    if isinstance(model, LlavaForConditionalGeneration):
        output = model.model.get_image_features(pixel_values=pixel_values[:1])
        return len(getattr(output, "pooler_output", output)[0])
    if isinstance(model, Gemma3ForConditionalGeneration):
        return model.config.mm_tokens_per_image
    if isinstance(model, InternVLForConditionalGeneration):
        return model.config.image_seq_length
    if isinstance(model, TILED_MODELS):
        return model.model.image_seq_len  # per tile
    return model.config.num_query_tokens


def tiny_inputs(model: nn.Module, batch: int = 1, prompt_len: int = 3, seed: int = 0, pad: bool = False):
    """Random images and prompts in Hugging Face's layout: image tokens, then text; left padding if `pad`."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    size = cfg.vision_config.image_size
    height, width = size if isinstance(size, (list, tuple)) else (size, size)  # InternVL's is (height, width)
    pixel_values = torch.randn(batch, 3, height, width, generator=gen)
    vocab = cfg.text_config.vocab_size
    text = torch.randint(4, vocab - 1, (batch, prompt_len), generator=gen)
    image_token = getattr(cfg, "image_token_index", None) or cfg.image_token_id  # InternVL: image_token_id
    rows = [[image_token] * image_tokens(model, pixel_values) + row for row in text.tolist()]
    if pad:  # row b loses its last b tokens (at most prompt_len - 1): shorter text
        rows = [row[: len(row) - min(b, prompt_len - 1)] for b, row in enumerate(rows)]
    input_ids, mask = pad_rows(rows, cfg.text_config.pad_token_id, "left")
    return pixel_values, input_ids, mask


def tiled_inputs(model: nn.Module, batch: int = 1, prompt_len: int = 3, seed: int = 0, pad: bool = False) -> dict:
    """Random tiles and prompts as SmolVLM's processor lays them out: `pixel_values` `[batch, 2, 3, 16, 16]`, each
    row's image tokens (4 per real tile), then text, left-padded. With `pad`, odd rows hold one real tile and an
    all-zero padding tile; row 0's second tile is padded on its right half (zero pixels, masked out in
    `pixel_attention_mask`), as the processor pads a smaller tile."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    size, per_tile = cfg.vision_config.image_size, image_tokens(model, None)
    pixel_values = torch.randn(batch, 2, 3, size, size, generator=gen)
    pixel_mask = torch.ones(batch, 2, size, size, dtype=torch.long)
    pixel_values[0, 1, :, :, size // 2 :] = 0
    pixel_mask[0, 1, :, size // 2 :] = 0
    tiles = [1 if pad and b % 2 else 2 for b in range(batch)]
    for b, n in enumerate(tiles):
        pixel_values[b, n:], pixel_mask[b, n:] = 0, 0
    vocab, image, pad_id = cfg.text_config.vocab_size, cfg.image_token_id, cfg.text_config.pad_token_id
    rows = [
        [image] * (per_tile * n) + torch.randint(4, vocab - 1, (prompt_len,), generator=gen).tolist() for n in tiles
    ]
    if pad:
        rows = [row[: len(row) - min(b, prompt_len - 1)] for b, row in enumerate(rows)]  # shorter text
    input_ids, attention_mask = pad_rows(rows, pad_id, "left")
    return {
        "pixel_values": pixel_values,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_attention_mask": pixel_mask,
    }


def qwen_vl_inputs(model: nn.Module, batch: int = 1, prompt_len: int = 3, seed: int = 0, pad: bool = False) -> dict:
    """What a Qwen-VL processor gives for one image per row: row b's image has grid `QWEN_VL_GRIDS[b % 3]` (rows of
    a batch differ in size, as at dynamic resolution) with its patches flattened in `pixel_values` (one row per
    patch), its image tokens between vision start and end, then text; `mm_token_type_ids` 1 at image tokens. Rows
    are left-padded to the longest when `pad`; without it every row gets the first grid."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    vision = cfg.vision_config
    grids = [QWEN_VL_GRIDS[b % 3] if pad else QWEN_VL_GRIDS[0] for b in range(batch)]
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixel_values = torch.randn(sum(t * h * w for t, h, w in grids), patch, generator=gen)
    rows = []
    for t, h, w in grids:
        text = torch.randint(4, cfg.text_config.vocab_size - 4, (prompt_len,), generator=gen).tolist()
        image = [cfg.image_token_id] * (t * h * w // vision.spatial_merge_size**2)
        rows.append([cfg.vision_start_token_id, *image, cfg.vision_end_token_id, *text])
    input_ids, attention_mask = pad_rows(rows, cfg.text_config.pad_token_id, "left")
    return {
        "pixel_values": pixel_values,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "image_grid_thw": torch.tensor(grids),
        "mm_token_type_ids": (input_ids == cfg.image_token_id).long(),
    }


# (height, width) of the tiny LLaVA-NeXT's images, in turn per row: 2x2, 1x2 and 2x1 patch grids, plus the base view
LLAVA_NEXT_SIZES = ((30, 28), (12, 30), (31, 14))


@torch.no_grad()
def llava_next_inputs(model: nn.Module, batch: int = 1, prompt_len: int = 3, seed: int = 0, pad: bool = False) -> dict:
    """LLaVA-NeXT's (or LLaVA-OneVision's) inputs, one image per row at the sizes `LLAVA_NEXT_SIZES` (all the first
    without `pad`): `pixel_values` `[batch, 5, 3, 16, 16]` (real patches, then zeros), `image_sizes`, and as many
    image tokens as the model's own `get_image_features` gives the image, then text; left-padded."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    sizes = torch.tensor([LLAVA_NEXT_SIZES[b % 3] if pad else LLAVA_NEXT_SIZES[0] for b in range(batch)])
    pixel_values = torch.randn(batch, 5, 3, 16, 16, generator=gen)
    rows = []
    for b in range(batch):
        output = model.model.get_image_features(pixel_values[b : b + 1], sizes[b : b + 1])
        features = output.pooler_output
        count = sum(len(f) for f in features) if isinstance(features, (list, tuple)) else len(features)
        text = torch.randint(4, cfg.text_config.vocab_size - 1, (prompt_len,), generator=gen).tolist()
        rows.append([cfg.image_token_index] * count + text)
    input_ids, attention_mask = pad_rows(rows, cfg.text_config.pad_token_id, "left")
    return {
        "pixel_values": pixel_values,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "image_sizes": sizes,
    }


def tiny_model_inputs(model: nn.Module, batch: int = 1, prompt_len: int = 3, seed: int = 0, pad: bool = False) -> dict:
    """`tiny_inputs` as the model's processor gives them: a dict of every input its `generate` reads (Gemma 3's
    `token_type_ids`: 1 at image tokens; InstructBLIP's Q-Former instruction: `tiny_instruction`; Qwen-VL's patches
    and grids: `qwen_vl_inputs`; SmolVLM's tiles and `pixel_attention_mask`: `tiled_inputs`)."""
    if isinstance(model, (LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration)):
        return llava_next_inputs(model, batch, prompt_len, seed, pad)
    if isinstance(model, TILED_MODELS):
        return tiled_inputs(model, batch, prompt_len, seed, pad)
    if isinstance(model, tuple(cls for _, cls in QWEN_VL_CLASSES.values())):
        return qwen_vl_inputs(model, batch, prompt_len, seed, pad)
    pixel_values, input_ids, attention_mask = tiny_inputs(model, batch, prompt_len, seed, pad)
    inputs = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask}
    if isinstance(model, Gemma3ForConditionalGeneration):
        inputs["token_type_ids"] = (input_ids == model.config.image_token_index).long()
    if isinstance(model, InstructBlipForConditionalGeneration):
        inputs["qformer_input_ids"], inputs["qformer_attention_mask"] = tiny_instruction(
            model, batch, seed=seed, pad=pad
        )
    return inputs
