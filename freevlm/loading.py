"""Loading a BLIP-2 and its processor from a local folder, and turning images + prompts into model inputs.

Nothing here downloads: paths are local folders written by `save_pretrained` (a Hugging Face checkpoint copied
to disk, or a backbone the demo trained).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open

from .inputs import InputWarning

# beside config.json: the BLIP-2's `vision_model` is not a ViT but the encoder this file names (see `freevlm.vision`)
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
        warn_small_images(images, self.image_processor)
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


def warn_small_images(images: list[Image.Image], image_processor) -> None:
    """One warning when an image is far smaller than what the processor resizes to: upscaled many times over, it
    holds little the model can see (a thumbnail passed by mistake)."""
    size = getattr(image_processor, "size", None) or {}
    target = min(size.get("height", 0), size.get("width", 0)) or size.get("shortest_edge", 0)
    small = [i for i, image in enumerate(images) if target and min(image.size) * 4 < target]
    if small:
        warnings.warn(f"image(s) {small[:8]} are under a quarter of the {target} px the image processor resizes "
                      "to: upscaled that far they carry little detail", InputWarning, stacklevel=3)  # fmt: skip


def load_blip2(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None) -> Blip2Bundle:
    """A `Blip2ForConditionalGeneration`, its tokenizer and image processor from a local folder."""
    from transformers import AutoImageProcessor, AutoTokenizer, Blip2ForConditionalGeneration

    path = Path(path)
    check_blip2_folder(path)
    try:
        if (path / BACKBONE_MARKER).is_file():
            model = _load_with_custom_vision(path, dtype)
        else:
            model = Blip2ForConditionalGeneration.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"{path} is not a loadable BLIP-2 checkpoint: {_first_line(err)}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = AutoImageProcessor.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} has no tokenizer/image processor saved beside the model: {err}") from err
    return Blip2Bundle(model.to(device).eval(), tokenizer, image_processor)


# files `save_pretrained` writes for a tokenizer (a fast tokenizer.json, or a slow one's vocabulary)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_blip2_folder(path: str | os.PathLike):
    """The folder's BLIP-2 config, after checking (without loading any weights) that everything `load_blip2`
    reads is there and readable: config.json of a BLIP-2, weights whose safetensors headers parse and whose
    size matches them, a tokenizer and an image processor. Each problem is one error naming the file."""
    from transformers import Blip2Config

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no model at {path}: expected a folder with config.json (from save_pretrained)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ValueError(f"{config_file} is not a valid model config: {err}") from err
    if model_type != "blip-2":
        raise ValueError(f"{path} holds a '{model_type}' model, not a BLIP-2 (model_type 'blip-2')")
    if not any((path / name).is_file() for name in WEIGHT_FILES) and not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path} has config.json but no weights (model.safetensors or pytorch_model.bin)")
    for file in sorted(path.glob("*.safetensors")):
        check_safetensors(file)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...): save the "
                                "tokenizer beside the model (tokenizer.save_pretrained(folder))")  # fmt: skip
    if not (path / "preprocessor_config.json").is_file():
        raise FileNotFoundError(f"{path} has no preprocessor_config.json: save the image processor beside the model "
                                "(image_processor.save_pretrained(folder))")  # fmt: skip
    try:
        return Blip2Config.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{config_file} is not a valid BLIP-2 config: {_first_line(err)}") from err


def check_safetensors(file: str | os.PathLike) -> None:
    """A clear error if `file` is not a complete safetensors file (bad header, or shorter than its header says)."""
    file = Path(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            f.keys()
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{file} is damaged or not a safetensors file ({_first_line(err)}): copy it again") from err


def load_exits(model, path: str | os.PathLike):
    """`EarlyExitVLM.from_pretrained(model, path)`, with a damaged weights file reported as one clear error."""
    from .model import WEIGHTS_NAME, EarlyExitVLM

    weights = Path(path) / WEIGHTS_NAME
    if weights.is_file():
        check_safetensors(weights)
    return EarlyExitVLM.from_pretrained(model, path)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def lm_num_layers(config) -> int:
    """The number of LM layers exits can sit between (OPT: decoder layers; T5: decoder blocks), from the config."""
    text = config.text_config
    if getattr(text, "is_encoder_decoder", False):
        return text.num_decoder_layers if text.num_decoder_layers is not None else text.num_layers
    return text.num_hidden_layers


def _load_with_custom_vision(path: Path, dtype: torch.dtype | None) -> torch.nn.Module:
    """A BLIP-2 whose image encoder is not a ViT: `from_pretrained` would build a ViT, so rebuild and load here.

    The marker names the encoder, found in the registry `freevlm.vision.VISION_MODELS` (this loader imports no
    model builder: the demo's is a layer above it).
    """
    from safetensors.torch import load_file
    from transformers import Blip2Config, Blip2ForConditionalGeneration, GenerationConfig

    from .vision import VISION_MODELS

    name = json.loads((path / BACKBONE_MARKER).read_text()).get("vision_model")
    if name not in VISION_MODELS:
        raise ValueError(f"{path / BACKBONE_MARKER} names an unknown vision model {name!r} (not in {list(VISION_MODELS)})")
    config = Blip2Config.from_pretrained(path)
    model = Blip2ForConditionalGeneration(config)
    vision = config.vision_config
    model.vision_model = VISION_MODELS[name](vision.hidden_size, vision.image_size, pretrained=False)
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
