"""Caption / VQA records, a COCO-captions reader and writer, and the collate that lays out prompts and targets.

Training data is a list of plain `Record`s (image path, prompt, target text) so any reader can feed the trainers.
The collate produces the exact layout the backbone adapters expect (`Blip2Backbone.features`):

- decoder-only (OPT): `input_ids` = image tokens + prompt (with BOS) + target + EOS, right-padded;
- encoder-decoder (T5): `input_ids` = image tokens + prompt (with EOS); `decoder_input_ids` = start + target
  shifted right.

and `targets`, aligned with the positions of the sequence the LM layers run over: `targets[b, t]` is the token
that position t must predict, or -100. Only positions that predict a target token (or its EOS) count; image
query tokens, the prompt and padding never do.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..data.images import ImageError, load_image
from ..data.records import DatasetError, require, require_list

IGNORE = -100


@dataclass(frozen=True)
class Record:
    """One training example: an image file, the prompt given with it, and the text the model should produce."""

    image: str
    prompt: str
    target: str
    image_id: int | str | None = None


def load_coco_captions(
    path: str | os.PathLike, image_root: str | os.PathLike | None = None, prompt: str = "a photo of",
    split: str | None = None,
) -> list[Record]:  # fmt: skip
    """Records from a COCO captions file: official `captions_*.json` or Karpathy `dataset_coco.json`.

    Image paths are taken relative to `image_root` (default: the JSON's folder). `split` filters Karpathy entries
    (e.g. "train", "restval", "val", "test"). One record per caption.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"captions file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    root = Path(image_root) if image_root is not None else path.parent
    records: list[Record] = []
    if isinstance(data, dict) and "annotations" in data and "images" in data:  # official COCO format
        files = {}
        for i, img in enumerate(require_list(data, "images", path, "the file")):
            files[require(img, "id", path, f"image #{i}")] = require(img, "file_name", path, f"image #{i}")
        for i, ann in enumerate(require_list(data, "annotations", path, "the file")):
            where = f"annotation #{i} (id {ann.get('id')})" if isinstance(ann, dict) else f"annotation #{i}"
            image_id = require(ann, "image_id", path, where)
            if image_id not in files:
                raise ValueError(f"{path}: {where} names image_id {image_id} with no image")
            caption = _caption(require(ann, "caption", path, where), path, where)
            records.append(Record(str(root / files[image_id]), prompt, caption, image_id))
    elif isinstance(data, dict) and isinstance(data.get("images"), list) and data["images"] and "sentences" in data["images"][0]:
        for i, img in enumerate(data["images"]):  # Karpathy split
            if split is not None and img.get("split") != split:
                continue
            file = Path(img.get("filepath", "")) / require(img, "filename", path, f"image #{i}")
            image_id = img.get("cocoid", img.get("imgid"))
            for j, sent in enumerate(require_list(img, "sentences", path, f"image #{i}")):
                where = f"sentence #{j} of image #{i} ({file})"
                records.append(Record(str(root / file), prompt, _caption(require(sent, "raw", path, where), path, where),
                                      image_id))  # fmt: skip
    else:
        raise ValueError(
            f"{path} is not a COCO captions file: expected 'images' + 'annotations' (captions_*.json) or "
            "'images' with 'sentences' (Karpathy dataset_coco.json)"
        )
    return records


def _caption(value, path: Path, where: str) -> str:
    """A caption to train on: a non-empty string (an empty target would train the model to stop at once)."""
    if not isinstance(value, str):
        raise DatasetError(f"{path}: {where} has a caption that is {type(value).__name__}, not text: {value!r}")
    if not value.strip():
        raise DatasetError(f"{path}: {where} has an empty caption")
    return value.strip()


def write_coco_captions(path: str | os.PathLike, entries: list[dict]) -> None:
    """Write `[{"image": path, "caption": str, "score"?: float}, ...]` as an official-format captions file, atomically.

    Image paths are stored as given in `file_name`, so `load_coco_captions(path, image_root="/")`-style reading
    works for absolute paths and a relative root works for relative ones.
    """
    path = Path(path)
    ids: dict[str, int] = {}
    images, annotations = [], []
    for entry in entries:
        if entry["image"] not in ids:
            ids[entry["image"]] = len(ids)
            images.append({"id": ids[entry["image"]], "file_name": entry["image"]})
        ann = {"id": len(annotations), "image_id": ids[entry["image"]], "caption": entry["caption"]}
        if "score" in entry:
            ann["score"] = float(entry["score"])
        annotations.append(ann)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"images": images, "annotations": annotations}, indent=1))
    os.replace(tmp, path)


def split_records(records: list[Record], dev_fraction: float, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """Train/dev split by image (the paper: 80/20), so no dev image is seen in training."""
    images = sorted({r.image for r in records})
    random.Random(seed).shuffle(images)
    n_dev = int(round(len(images) * dev_fraction))
    dev_images = set(images[:n_dev])
    return [r for r in records if r.image not in dev_images], [r for r in records if r.image in dev_images]


def model_max_length(text_config) -> int | None:
    """The longest sequence the LM can take: learned positions (OPT) or the configured `n_positions` (T5)."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class CaptionDataset(Dataset):
    """Records tokenized up front (so length problems surface before training); images decoded on access.

    `image_processor` is a Hugging Face image processor (or any callable with the same signature) that turns PIL
    images into `pixel_values`.
    """

    def __init__(self, records: list[Record], tokenizer, image_processor, model_config, max_target_tokens: int | None = None,
                 source: str = "dataset"):  # fmt: skip
        if not records:
            raise ValueError(f"{source} is empty: no (image, text) records to train on")
        text_cfg = model_config.text_config
        self.decoder_only = not getattr(text_cfg, "is_encoder_decoder", False)
        self.num_query_tokens = model_config.num_query_tokens
        self.records = records
        self.image_processor = image_processor
        eos = tokenizer.eos_token_id
        limit = model_max_length(text_cfg)
        missing = [r.image for r in records if not Path(r.image).is_file()]
        if missing:
            raise ImageError(f"{source}: {len(missing)} image file(s) not found, first: {missing[0]}")
        self.prompt_ids: list[list[int]] = []
        self.target_ids: list[list[int]] = []
        for r in records:
            prompt_ids, target_ids = self._tokenize(tokenizer, r)
            target_ids = target_ids + ([eos] if eos is not None else [])
            if max_target_tokens is not None and len(target_ids) > max_target_tokens:
                raise ValueError(
                    f"{source}: target of {r.image} has {len(target_ids)} tokens, more than max_target_tokens="
                    f"{max_target_tokens}: {r.target[:60]!r}"
                )
            used = self.num_query_tokens + len(prompt_ids) + len(target_ids) if self.decoder_only else len(target_ids)
            if limit is not None and used > limit:
                raise ValueError(
                    f"{source}: labels too long for the model: {r.image} needs {used} positions "
                    f"(query tokens + prompt + target) but the language model takes at most {limit}: {r.target[:60]!r}"
                )
            self.prompt_ids.append(prompt_ids)
            self.target_ids.append(target_ids)

    def _tokenize(self, tokenizer, r: Record) -> tuple[list[int], list[int]]:
        prompt_ids = tokenizer(r.prompt, add_special_tokens=True)["input_ids"]
        if self.decoder_only:  # tokenize prompt and target together so BPE sees the boundary as at inference
            joined = tokenizer(f"{r.prompt} {r.target}" if r.prompt else r.target, add_special_tokens=True)["input_ids"]
            if joined[: len(prompt_ids)] == prompt_ids:
                return prompt_ids, joined[len(prompt_ids) :]
        return prompt_ids, tokenizer(r.target, add_special_tokens=False)["input_ids"]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        r = self.records[index]
        image = load_image(r.image)
        pixel_values = self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        return {"pixel_values": pixel_values, "prompt_ids": self.prompt_ids[index], "target_ids": self.target_ids[index]}


@dataclass
class CaptionCollator:
    """Batches `CaptionDataset` items into the backbone's training layout (see the module docstring)."""

    image_token_index: int
    num_query_tokens: int
    pad_token_id: int
    decoder_only: bool
    decoder_start_token_id: int = 0

    @classmethod
    def for_model(cls, model_config) -> "CaptionCollator":
        text = model_config.text_config
        pad = text.pad_token_id if text.pad_token_id is not None else 0
        start = getattr(text, "decoder_start_token_id", None)
        return cls(
            image_token_index=model_config.image_token_index, num_query_tokens=model_config.num_query_tokens,
            pad_token_id=pad, decoder_only=not getattr(text, "is_encoder_decoder", False),
            decoder_start_token_id=start if start is not None else pad,
        )  # fmt: skip

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        pixel_values = torch.stack([it["pixel_values"] for it in items])
        image = [self.image_token_index] * self.num_query_tokens
        if self.decoder_only:
            seqs = [image + it["prompt_ids"] + it["target_ids"] for it in items]
            input_ids, attention_mask = self._pad(seqs, self.pad_token_id)
            targets = torch.full_like(input_ids, IGNORE)
            for b, it in enumerate(items):
                start = len(image) + len(it["prompt_ids"]) - 1  # the last prompt position predicts the first target
                targets[b, start : start + len(it["target_ids"])] = torch.tensor(it["target_ids"])
            return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask,
                    "targets": targets}  # fmt: skip
        input_ids, attention_mask = self._pad([image + it["prompt_ids"] for it in items], self.pad_token_id)
        decoder_input_ids, _ = self._pad(
            [[self.decoder_start_token_id] + it["target_ids"][:-1] for it in items], self.pad_token_id
        )
        targets, _ = self._pad([it["target_ids"] for it in items], IGNORE)
        return {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": attention_mask,
                "decoder_input_ids": decoder_input_ids, "targets": targets}  # fmt: skip

    @staticmethod
    def _pad(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), value, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[b, : len(s)] = 1
        return ids, mask
