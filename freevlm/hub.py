"""Loading a BLIP-2 and its processor from a local folder, and turning images + prompts into model inputs.

Nothing here downloads: paths are local folders written by `save_pretrained` (a Hugging Face checkpoint copied
to disk, or a backbone the demo trained).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

# beside config.json: the BLIP-2's `vision_model` is one of ours (written by `freevlm.demo.backbone.save_backbone`)
BACKBONE_MARKER = "freevlm_backbone.json"


@dataclass
class Blip2Bundle:
    """A BLIP-2 with what turns text and images into its inputs and tokens back into text."""

    model: torch.nn.Module
    tokenizer: object
    image_processor: object

    def inputs(self, images: list[Image.Image], prompts: list[str]) -> dict[str, torch.Tensor]:
        """Pixel values and left-padded prompt ids (image tokens first, as Hugging Face's processor lays them out)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        cfg = self.model.config
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        self.tokenizer.padding_side = "left"
        text = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
        ids, mask = text["input_ids"], text["attention_mask"]
        if cfg.image_token_index is not None and not bool((ids == cfg.image_token_index).any()):
            image = torch.full((len(prompts), cfg.num_query_tokens), cfg.image_token_index, dtype=ids.dtype)
            ids = torch.cat([image, ids], dim=1)
            mask = torch.cat([torch.ones_like(image), mask], dim=1)
        device = self.model.device
        dtype = next(self.model.parameters()).dtype
        return {
            "pixel_values": pixel_values.to(device, dtype),
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
        }

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)]


def load_blip2(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None) -> Blip2Bundle:
    """A `Blip2ForConditionalGeneration`, its tokenizer and image processor from a local folder."""
    from transformers import AutoImageProcessor, AutoTokenizer, Blip2ForConditionalGeneration

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path}: expected a folder with config.json (from save_pretrained)")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "blip-2":
        raise ValueError(f"{path} holds a '{model_type}' model, not a BLIP-2 (model_type 'blip-2')")
    try:
        if (path / BACKBONE_MARKER).is_file():
            model = _load_with_custom_vision(path, dtype)
        else:
            model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path} is not a loadable BLIP-2 checkpoint: {err}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} has no tokenizer/image processor saved beside the model: {err}") from err
    return Blip2Bundle(model.to(device).eval(), tokenizer, image_processor)


def _load_with_custom_vision(path: Path, dtype: torch.dtype | None) -> torch.nn.Module:
    """A BLIP-2 whose image encoder is not a ViT: `from_pretrained` would build a ViT, so rebuild and load here."""
    from safetensors.torch import load_file
    from transformers import Blip2Config, GenerationConfig

    from .demo.backbone import model_from_config

    marker = json.loads((path / BACKBONE_MARKER).read_text())
    if marker.get("vision_model") != "efficientnet-lite0":
        raise ValueError(f"{path / BACKBONE_MARKER} names an unknown vision model {marker.get('vision_model')!r}")
    model = model_from_config(Blip2Config.from_pretrained(path), pretrained_encoder=False)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise OSError(f"no *.safetensors weights in {path}")
    state = {key: value for file in files for key, value in load_file(file).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    current = model.state_dict()
    loaded = {current[key].data_ptr() for key in state if key in current}
    untied = [key for key in missing if current[key].data_ptr() not in loaded]  # tied weights are saved once
    if untied or unexpected:
        raise ValueError(f"weights in {path} do not fit the model: missing {untied[:5]}, unexpected {unexpected[:5]}")
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
        model.language_model.generation_config = model.generation_config
    return model.to(dtype) if dtype is not None else model
