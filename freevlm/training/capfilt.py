"""CapFilt pseudo-captions (BLIP / BLIP-2, used by FREE's unsupervised setup): the fine-tuned backbone samples N
captions per image with nucleus sampling, an image-text scorer ranks them, the top k are kept and written in COCO
captions format, ready for `train_exits(anchor="capfilt")`.

Scorers are pluggable (`ImageTextScorer`): CLIP (`CLIPModel`, the paper uses ViT-L/14) or BLIP-2's own image-text
matching head (`Blip2ForImageTextRetrieval`), both loaded from local folders.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from ..data.images import load_image
from ..decoding.config import DecodeConfig
from ..errors import MissingFileError, UserError
from ..loading import CAPTION_PROMPT, VLMBundle
from .data import write_coco_captions


class ImageTextScorer(Protocol):
    def score(self, image: Image.Image, texts: list[str]) -> torch.Tensor:
        """One score per text (higher = better match with `image`)."""


class _LocalScorer:
    model_class: str  # the transformers class of the folder's model

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        import transformers
        from transformers import AutoTokenizer
        from transformers.models.auto.image_processing_auto import AutoImageProcessor  # why: see load_vlm

        path, model_cls = Path(path), getattr(transformers, self.model_class)
        check_scorer_folder(path, model_cls)
        self.model = model_cls.from_pretrained(path).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = AutoImageProcessor.from_pretrained(path)
        self.device = device

    def _inputs(self, image: Image.Image, texts: list[str]):
        pixel_values = self.image_processor(images=[image], return_tensors="pt")["pixel_values"].to(self.device)
        text = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return pixel_values, text


def check_scorer_folder(path: Path, model_cls) -> None:
    """A `UserError` unless `path` holds a model of `model_cls` (by its config.json's `architectures`, or its
    `model_type` where none is listed): another model's folder would load with its weights missing or mis-sized,
    and score at random or fail deep inside Hugging Face."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise MissingFileError(f"no scorer model at {path}: expected a folder with config.json")
    try:
        config = json.loads(config_file.read_text())
        architectures, model_type = config.get("architectures") or [], config.get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise UserError(f"{config_file} is not a model config: {err}") from None
    expected = model_cls.config_class.model_type
    if (architectures and model_cls.__name__ not in architectures) or model_type != expected:
        found = ", ".join(architectures) or repr(model_type)
        raise UserError(
            f"--scorer: {path} holds a {found} model, not a {model_cls.__name__}: use clip:PATH for a CLIP folder, "
            "itm:PATH for a Blip2ForImageTextRetrieval one"
        )


class ClipScorer(_LocalScorer):
    """Cosine similarity of CLIP image and text embeddings."""

    model_class = "CLIPModel"

    @torch.no_grad()
    def score(self, image: Image.Image, texts: list[str]) -> torch.Tensor:
        pixel_values, text = self._inputs(image, texts)
        out = self.model(pixel_values=pixel_values, input_ids=text["input_ids"], attention_mask=text["attention_mask"])
        image_emb = torch.nn.functional.normalize(out.image_embeds, dim=-1)
        text_emb = torch.nn.functional.normalize(out.text_embeds, dim=-1)
        return (text_emb @ image_emb[0]).float().cpu()


class Blip2ItmScorer(_LocalScorer):
    """Probability of "match" from BLIP-2's image-text matching head (Q-Former)."""

    model_class = "Blip2ForImageTextRetrieval"

    @torch.no_grad()
    def score(self, image: Image.Image, texts: list[str]) -> torch.Tensor:
        pixel_values, text = self._inputs(image, texts)
        out = self.model(
            pixel_values=pixel_values.expand(len(texts), -1, -1, -1),
            input_ids=text["input_ids"],
            attention_mask=text["attention_mask"],
            use_image_text_matching_head=True,
        )
        return out.logits_per_image.softmax(-1)[:, 1].float().cpu()


SCORERS = {"clip": ClipScorer, "itm": Blip2ItmScorer}


def load_scorer(spec: str, device: str = "cpu") -> ImageTextScorer:
    """`clip:/path/to/clip` or `itm:/path/to/blip2-itm`."""
    kind, _, path = spec.partition(":")
    if kind not in SCORERS or not path:
        raise ValueError(f"scorer must be 'clip:PATH' or 'itm:PATH', got {spec!r}")
    return SCORERS[kind](path, device)


MAX_SAMPLES = 1024


@dataclass
class CapFiltConfig:
    """Paper: 10 samples per image, top 2 kept."""

    prompt: str = CAPTION_PROMPT
    num_samples: int = 10
    top_k: int = 2
    top_p: float = 0.9
    temperature: float = 1.0
    max_new_tokens: int = DecodeConfig.max_new_tokens
    batch_size: int = 8  # images per generate call
    seed: int = 0

    def validate(self) -> None:
        if not 1 <= self.num_samples <= MAX_SAMPLES:  # an image's samples are one batch of `generate`
            raise ValueError(
                f"num_samples must be in 1..{MAX_SAMPLES} (captions sampled per image), got {self.num_samples}"
            )
        if not 1 <= self.top_k <= self.num_samples:
            raise ValueError(f"top_k must be in 1..num_samples ({self.num_samples}), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@torch.no_grad()
def sample_captions(bundle: VLMBundle, images: list[Image.Image], config: CapFiltConfig) -> list[list[str]]:
    """`num_samples` nucleus-sampled captions per image (the text after the prompt)."""
    inputs = bundle.inputs(images, [config.prompt] * len(images))
    out = bundle.model.generate(
        **inputs,
        do_sample=True,
        top_p=config.top_p,
        temperature=config.temperature,
        num_return_sequences=config.num_samples,
        max_new_tokens=config.max_new_tokens,
    )
    if not bundle.model.config.text_config.is_encoder_decoder:  # decoder-only: the prompt comes back first
        out = out[:, inputs["input_ids"].shape[1] :]
    texts = bundle.decode(out)
    return [texts[i * config.num_samples : (i + 1) * config.num_samples] for i in range(len(images))]


def rank_captions(
    scorer: ImageTextScorer, image: Image.Image, captions: list[str], top_k: int
) -> list[tuple[str, float]]:
    """The `top_k` best distinct non-empty captions by the scorer, best first."""
    unique = list(dict.fromkeys(c for c in captions if c))
    if not unique:
        return []
    scores = scorer.score(image, unique).tolist()
    return sorted(zip(unique, scores), key=lambda cs: -cs[1])[:top_k]


def capfilt(
    bundle: VLMBundle,
    image_paths: list[str],
    scorer: ImageTextScorer,
    output: str | os.PathLike,
    config: CapFiltConfig | None = None,
    progress: bool = True,
) -> list[dict]:
    """Pseudo-captions for `image_paths`, written to `output` (COCO captions JSON with scores); returns the entries."""
    config = config or CapFiltConfig()
    config.validate()
    if not image_paths:
        raise ValueError("capfilt: no images given")
    torch.manual_seed(config.seed)
    entries: list[dict] = []
    starts = range(0, len(image_paths), config.batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="capfilt", unit="batch")
    for start in starts:
        paths = image_paths[start : start + config.batch_size]
        images = [load_image(p) for p in paths]
        for path, image, samples in zip(paths, images, sample_captions(bundle, images, config)):
            for caption, score in rank_captions(scorer, image, samples, config.top_k):
                entries.append({"image": str(path), "caption": caption, "score": score})
    write_coco_captions(output, entries)
    return entries
