"""Checks on what `EarlyExitVLM.generate` is given, before any layer runs: a `ValueError` naming the argument
instead of a raw torch error from deep inside, and one warning for what is legal but suspicious. And `pad_rows`,
which makes token rows of different lengths into `input_ids` and `attention_mask`.

    validate_generate_inputs(ee.backbone, pixel_values, input_ids, attention_mask, max_new_tokens, model_inputs)
"""

from __future__ import annotations

import warnings

import torch
from torch.nn.utils.rnn import pad_sequence


class InputWarning(UserWarning):
    """Inputs that run but probably do not mean what the caller wanted (NaN pixels, rows with no tokens...)."""


def pad_rows(rows: list[list[int]], value: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as one `[rows, longest]` tensor padded with `value` on `side`, and its 0/1 attention mask."""
    ids = pad_sequence([torch.tensor(r, dtype=torch.long) for r in rows], True, value, side)
    mask = pad_sequence([torch.ones(len(r), dtype=torch.long) for r in rows], True, 0, side)
    return ids, mask


def validate_generate_inputs(
    backbone,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    inputs: dict | None = None,
) -> None:
    """Raise `ValueError` for inputs the backbone cannot take; warn (once per call) about suspicious ones.

    `backbone` is the adapter (`ee.backbone`): its Hugging Face `model` and `config` are read, and how many images
    each prompt row holds (`images_per_row`).
    Errors: pixel_values not a float [batch, channels, height, width] tensor, the wrong number of channels, a
    size the vision encoder cannot take; input_ids not an integer [batch, length] tensor, ids outside the
    vocabulary; attention_mask without input_ids, of another shape, or right-padded before a decoder-only LM; a
    prompt that leaves no room for `max_new_tokens` within the language model's positions; the family's own
    inputs (`inputs`) as its `check_inputs` says (where `pixel_layout` is the family's own, the pixel checks are
    its too). Warnings: non-finite pixels, mask rows that attend to nothing, an image size far from the one the
    encoder was built for.
    """
    model, cfg = backbone.model, backbone.config
    images = backbone.pixel_layout in ("images", "tiles")
    if backbone.pixel_layout == "tiles":  # each row's tiles: checked as images, one row per prompt row
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 5:
            raise ValueError(
                f"pixel_values must be a [batch, tiles, channels, height, width] tensor, got {_shape(pixel_values)}"
            )
        _check_pixels(model, cfg, pixel_values.flatten(0, 1))
    elif images:
        _check_pixels(model, cfg, pixel_values)
    if input_ids is not None:
        _check_ids(backbone, pixel_values, input_ids, images, inputs or {})
        if attention_mask is not None:
            _check_mask(input_ids, attention_mask, decoder_only=not _is_encoder_decoder(cfg))
    backbone.check_inputs(pixel_values, input_ids, attention_mask, inputs or {})
    if not images:
        _check_length(cfg, input_ids.shape[1], max_new_tokens)
        return
    if input_ids is None:
        if attention_mask is not None:
            raise ValueError(
                "attention_mask was given without input_ids: the default prompt has its own mask; "
                "pass the input_ids the mask belongs to, or no mask"
            )
        prompt_len = cfg.num_query_tokens + 1
    else:
        prompt_len = input_ids.shape[1]
        if cfg.image_token_index is None or not bool((input_ids == cfg.image_token_index).any()):
            prompt_len += cfg.num_query_tokens  # the image tokens are put in front
    _check_length(cfg, prompt_len, max_new_tokens)


def _check_pixels(model, cfg, pixel_values) -> None:
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be a [batch, channels, height, width] tensor, got {_shape(pixel_values)}")
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"pixel_values must be floating point (the image processor's output), got {pixel_values.dtype}"
        )
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values holds no images (batch size 0)")
    channels = _vision_channels(model, cfg)
    if pixel_values.shape[1] != channels:
        raise ValueError(
            f"pixel_values has {pixel_values.shape[1]} channel(s), the vision encoder takes {channels} "
            "(RGB): convert images with .convert('RGB') before the image processor"
        )
    size = getattr(cfg.vision_config, "image_size", None)
    if isinstance(size, (list, tuple)):  # InternVL's (height, width): square in every released model
        size = size[0] if len(set(size)) == 1 else None
    height, width = pixel_values.shape[-2:]
    if size and (height, width) != (size, size):
        if _is_vit(model):
            raise ValueError(
                f"pixel_values are {height}x{width} but the vision encoder takes {size}x{size} images: "
                "use the model's image processor"
            )
        if not (size / 2 <= min(height, width) and max(height, width) <= size * 2):
            warnings.warn(
                f"pixel_values are {height}x{width}, far from the {size}x{size} the vision encoder was "
                "trained on: use the model's image processor",
                InputWarning,
                stacklevel=3,
            )
    if not bool(torch.isfinite(pixel_values).all()):
        bad = (~torch.isfinite(pixel_values)).flatten(1).any(1).nonzero().flatten().tolist()
        warnings.warn(
            f"pixel_values of image(s) {bad[:8]} hold NaN or inf: their tokens will be meaningless",
            InputWarning,
            stacklevel=3,
        )


def _shape(value) -> tuple | str:
    """A tensor's shape, or what else `value` is, for an error message."""
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


def _is_vit(model) -> bool:
    from transformers import Blip2VisionModel

    return isinstance(getattr(model, "vision_model", None), Blip2VisionModel)


def _vision_channels(model, cfg) -> int:
    conv = getattr(getattr(getattr(model, "vision_model", None), "embeddings", None), "patch_embedding", None)
    if isinstance(conv, torch.nn.Conv2d):
        return conv.in_channels
    return getattr(cfg.vision_config, "num_channels", 3)


def _vocab_size(model, cfg) -> int:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return embeddings.num_embeddings if isinstance(embeddings, torch.nn.Embedding) else cfg.text_config.vocab_size


def _check_ids(backbone, pixel_values, input_ids, images: bool = True, inputs: dict | None = None) -> None:
    model, cfg = backbone.model, backbone.config
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, length] tensor of token ids, got {_shape(input_ids)}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids (torch.long), got {input_ids.dtype}")
    images = backbone.images_per_row(input_ids, **(inputs or {})) if images else None
    if images is not None and sum(images) != pixel_values.shape[0]:
        if all(n == 1 for n in images):
            raise ValueError(
                f"input_ids has {input_ids.shape[0]} rows but pixel_values has {pixel_values.shape[0]} images"
            )
        raise ValueError(
            f"the image tokens of input_ids stand for {sum(images)} image(s) (per row: {images[:8]}) but pixel_values "
            f"has {pixel_values.shape[0]}: pass the processor's pixel_values with its input_ids"
        )
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty (length 0): give at least the image tokens or BOS")
    vocab = _vocab_size(model, cfg)
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(
            f"input_ids holds token id {bad}, outside the vocabulary [0, {vocab}): use the model's own tokenizer"
        )


def _is_encoder_decoder(cfg) -> bool:
    return bool(getattr(getattr(cfg, "text_config", cfg), "is_encoder_decoder", False))


def _check_mask(input_ids, attention_mask, decoder_only: bool) -> None:
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = _shape(attention_mask)
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {shape}")
    if attention_mask.is_floating_point() and not bool(torch.isfinite(attention_mask).all()):
        raise ValueError("attention_mask holds NaN or inf: it must be 0 (padding) or 1 (token)")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    right = ((attention_mask[:, -1] == 0) & (attention_mask != 0).any(1)).nonzero().flatten().tolist()
    if decoder_only and right:  # Hugging Face only warns; the answer would follow padding, not the prompt
        raise ValueError(
            f"attention_mask rows {right[:8]} are right-padded: a decoder-only language model continues from the "
            "last position, which would be padding; pad on the left (tokenizer.padding_side = 'left')"
        )
    empty = (attention_mask == 0).all(1).nonzero().flatten().tolist()
    if empty:
        warnings.warn(
            f"attention_mask rows {empty[:8]} are all zero: those prompts are empty and their tokens "
            "depend on the image alone",
            InputWarning,
            stacklevel=4,
        )


def _check_length(cfg, prompt_len: int, max_new_tokens: int) -> None:
    """Decoder-only LMs have learned positions: prompt + new tokens must fit in them. T5's are relative, but its
    decoder's K/V slots are allocated for every new token at once: at most its config's `n_positions`."""
    text = cfg.text_config
    if getattr(text, "is_encoder_decoder", False):  # T5: the decoder's slots are allocated up front, n_positions
        limit = getattr(text, "n_positions", None)  # is the longest sequence its config says it is used with
        if isinstance(limit, int) and isinstance(max_new_tokens, int) and max_new_tokens > limit:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} exceeds the {limit} positions the language model's config gives "
                f"(n_positions): max_new_tokens can be at most {limit}"
            )
        return
    limit = getattr(text, "max_position_embeddings", None)
    if isinstance(limit, int) and isinstance(max_new_tokens, int) and prompt_len + max_new_tokens > limit:
        room = limit - prompt_len
        fix = f"max_new_tokens can be at most {room}" if room > 0 else "shorten the prompt"
        raise ValueError(
            f"the prompt ({prompt_len} tokens, image tokens included) plus max_new_tokens="
            f"{max_new_tokens} exceeds the language model's {limit} positions: {fix}"
        )
