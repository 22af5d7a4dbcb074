"""Training records (read from COCO captions by `freevlm.data.coco`), a captions writer, and the collate that lays
out prompts and targets.

Training data is a list of plain `Record`s (image path, prompt, target text) so any reader can feed the trainers.
The collate produces the exact layout the backbone adapters expect (`Backbone.features`):

- decoder-only (OPT): `input_ids` = image tokens + prompt (with BOS) + target + EOS, right-padded. BLIP-2's
  `num_query_tokens` image tokens go first, as `loading.VLMBundle.inputs` puts them (the demo's BLIP-2 folders ship
  no processor); the other families' prompts (`PROCESSOR_LAYOUT_TYPES`) are laid out by the model's processor
  itself, image by image, from the prompt `caption` gives it (InstructBLIP's: its query tokens first, the prompt as
  the Q-Former's instruction) (`loading.prompt_with_image`: `<image>\n` + prompt, Gemma 3's
  `<start_of_image>`, Qwen-VL's image between `<|vision_start|>` and `<|vision_end|>`), with the per-token inputs it
  gives (Gemma 3's `token_type_ids`, Qwen-VL's `mm_token_type_ids`: 1 at image tokens, 0 at the target's).
  SmolVLM / Idefics3's and LLaVA-NeXT / OneVision's tiles, with the tokens around them and a count that depends on
  the image's size, travel padded with zero tiles to the batch's most, with `pixel_attention_mask` or `image_sizes`
  as that processor gives them; LLaVA's and Gemma 3's images, InternVL's tiles (each one's tokens between `<img>`
  and `</img>`) and Qwen-VL's patches (`<|image_pad|>` expanded to its patch grid over the 2x2 merge, with
  `image_grid_thw`) all rows' one after another in `pixel_values` (`CONCATENATED_PIXELS`: a row reads as many as its
  image tokens stand for);
- encoder-decoder (T5): `input_ids` = image tokens + prompt (with EOS); `decoder_input_ids` = start + target
  shifted right.

and `targets`, aligned with the positions of the sequence the LM layers run over: `targets[b, t]` is the token
that position t must predict, or `IGNORE_INDEX`. Only positions that predict a target token (or its EOS) count;
image query tokens, the prompt and padding never do. InstructBLIP's Q-Former also reads the prompt, as its
instruction (`qformer_input_ids`, right-padded, in the Q-Former's vocabulary), as `InstructBlipProcessor` gives it
for the prompt alone (as LAVIS does).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from ..data.coco import read_captions
from ..data.images import ImageError, load_image
from ..files import write_text_atomic
from ..inputs import pad_rows
from ..loading import CAPTION_PROMPT, EXPANDS_IMAGE_TOKEN, QWEN_VL, prompt_with_image
from ..model import IGNORE_INDEX


@dataclass(frozen=True)
class Record:
    """One training example: an image file, the prompt given with it, and the text the model should produce."""

    image: str
    prompt: str
    target: str
    image_id: int | str | None = None


def load_coco_captions(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    prompt: str = CAPTION_PROMPT,
    split: str | None = None,
) -> list[Record]:
    """One record per caption of a COCO captions file, official or Karpathy (`split`: its `train` includes
    `restval`), read by `freevlm.data.coco.read_captions`. Image paths are relative to `image_root` (default: the
    JSON's folder); missing images are reported by `CaptionDataset`, all at once."""
    root = Path(path).parent if image_root is None else image_root
    images = read_captions(path, root, split, check_images=False, allow_empty=True)
    return [Record(str(r.image), prompt, caption, r.image_id) for r in images for caption in r.references]


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
    write_text_atomic(path, json.dumps({"images": images, "annotations": annotations}, indent=1))


def model_max_length(text_config) -> int | None:
    """The longest sequence the LM can take: learned positions (OPT) or the configured `n_positions` (T5)."""
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(text_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


# families whose processor lays out each image's tokens (a count that may depend on the image's size; InstructBLIP's
# query tokens and the Q-Former's instruction): training prompts come from it, image by image, and its per-image
# inputs travel with the batch
PROCESSOR_LAYOUT_TYPES = (*EXPANDS_IMAGE_TOKEN, "instructblip")
NESTED_IMAGES = ("gemma3", "idefics3", "smolvlm")  # their processors take each prompt's images as a list
# each image (LLaVA, Gemma 3), tile (InternVL) or patch (Qwen-VL) a `pixel_values` row of its own, all rows' one after
# another
CONCATENATED_PIXELS = ("llava", "gemma3", "internvl", *QWEN_VL)
PROCESSOR_IMAGE_INPUTS = ("pixel_attention_mask", "image_sizes", "image_grid_thw")  # each image's, beside its pixels
PROCESSOR_TOKEN_INPUTS = ("token_type_ids", "mm_token_type_ids")  # one per prompt token (1 at image tokens)


class CaptionDataset(Dataset):
    """Records tokenized up front (so length problems surface before training); images decoded on access.

    `image_processor` is a Hugging Face image processor (or any callable with the same signature) that turns PIL
    images into `pixel_values`. The families but BLIP-2 need their `processor` (`PROCESSOR_LAYOUT_TYPES`), which
    lays out each image's tokens (InstructBLIP's: and the prompt the Q-Former reads).
    """

    def __init__(
        self,
        records: list[Record],
        tokenizer,
        image_processor,
        model_config,
        max_target_tokens: int | None = None,
        source: str = "dataset",
        processor=None,
    ):
        if not records:
            raise ValueError(f"{source} is empty: no (image, text) records to train on")
        model_type = getattr(model_config, "model_type", None)
        self.processor = processor if model_type in PROCESSOR_LAYOUT_TYPES else None
        if model_type in PROCESSOR_LAYOUT_TYPES and processor is None:
            raise ValueError(
                f"{model_type}'s processor lays out each image's tokens: pass processor (the model's own, as load_vlm "
                "gives it)"
            )
        self.nested_images = model_type in NESTED_IMAGES
        self.concatenated = model_type in CONCATENATED_PIXELS
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
        self.prompts: list[str] = []  # as given to the tokenizer, the image at its placeholder
        self.prompt_ids: list[list[int]] = []
        self.target_ids: list[list[int]] = []
        expands = model_type in EXPANDS_IMAGE_TOKEN  # the prompt names where the image goes (not InstructBLIP's)
        for r in records:
            prompt = prompt_with_image(self.processor, model_config, r.prompt) if expands else r.prompt
            prompt_ids, target_ids = self._tokenize(tokenizer, prompt, r.target)
            target_ids = target_ids + ([eos] if eos is not None else [])
            if max_target_tokens is not None and len(target_ids) > max_target_tokens:
                raise ValueError(
                    f"{source}: target of {r.image} has {len(target_ids)} tokens, more than max_target_tokens="
                    f"{max_target_tokens}: {r.target[:60]!r}"
                )
            # per image where fixed; tiles' and patches' depend on the image (its processor's size bounds them)
            image_tokens = self.num_query_tokens or 0
            used = image_tokens + len(prompt_ids) + len(target_ids) if self.decoder_only else len(target_ids)
            if limit is not None and used > limit:
                raise ValueError(
                    f"{source}: labels too long for the model: {r.image} needs {used} positions "
                    f"(query tokens + prompt + target) but the language model takes at most {limit}: {r.target[:60]!r}"
                )
            self.prompts.append(prompt)
            self.prompt_ids.append(prompt_ids)
            self.target_ids.append(target_ids)

    def _tokenize(self, tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if self.decoder_only:  # tokenize prompt and target together so BPE sees the boundary as at inference
            joined = tokenizer(f"{prompt} {target}" if prompt else target, add_special_tokens=True)["input_ids"]
            if joined[: len(prompt_ids)] == prompt_ids:
                return prompt_ids, joined[len(prompt_ids) :]
        return prompt_ids, tokenizer(target, add_special_tokens=False)["input_ids"]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        r = self.records[index]
        image = load_image(r.image)
        item = {"prompt_ids": self.prompt_ids[index], "target_ids": self.target_ids[index]}
        if self.processor is not None:  # the prompt with the image's tokens as the processor lays them out
            images = [[image]] if self.nested_images else [image]
            processed = self.processor(images=images, text=[self.prompts[index]], return_tensors="pt")
            item["prompt_ids"] = processed["input_ids"][0].tolist()
            if "qformer_input_ids" in processed:  # InstructBLIP's: the prompt, as the Q-Former's instruction
                item["qformer_ids"] = processed["qformer_input_ids"][0].tolist()
            item.update(
                {k: processed[k][0] for k in (*PROCESSOR_IMAGE_INPUTS, *PROCESSOR_TOKEN_INPUTS) if k in processed}
            )
            # the image's pixel rows (`CONCATENATED_PIXELS`), else its pixels or tiles as one batch row
            item["pixel_values"] = processed["pixel_values"] if self.concatenated else processed["pixel_values"][0]
            return item
        item["pixel_values"] = self.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        return item


@dataclass
class CaptionCollator:
    """Batches `CaptionDataset` items into the backbone's training layout (see the module docstring)."""

    image_token_index: int
    num_query_tokens: int
    pad_token_id: int
    decoder_only: bool
    decoder_start_token_id: int = 0
    qformer_pad_token_id: int = 0
    laid_out: bool = False  # all but BLIP-2: prompts hold the image's tokens already (the processor's)
    concatenated: bool = False  # InternVL's tiles, Qwen-VL's patches: all rows' one after another, none padded

    @classmethod
    def for_model(cls, model_config) -> CaptionCollator:
        text = model_config.text_config
        pad = text.pad_token_id if text.pad_token_id is not None else 0
        start = getattr(text, "decoder_start_token_id", None)
        qformer = getattr(model_config, "qformer_config", None)
        return cls(
            qformer_pad_token_id=(qformer.pad_token_id or 0) if qformer is not None else 0,
            image_token_index=model_config.image_token_index,
            num_query_tokens=model_config.num_query_tokens,
            pad_token_id=pad,
            decoder_only=not getattr(text, "is_encoder_decoder", False),
            decoder_start_token_id=start if start is not None else pad,
            laid_out=getattr(model_config, "model_type", None) in PROCESSOR_LAYOUT_TYPES,
            concatenated=getattr(model_config, "model_type", None) in CONCATENATED_PIXELS,
        )

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = self._layout(items)
        if "qformer_ids" in items[0]:
            ids, mask = pad_rows([it["qformer_ids"] for it in items], self.qformer_pad_token_id)
            batch.update(qformer_input_ids=ids, qformer_attention_mask=mask)
        return batch

    def _layout(self, items: list[dict]) -> dict[str, torch.Tensor]:
        images = [it["pixel_values"] for it in items]
        if self.laid_out:  # each image (its tiles, patches), then all-zero ones (as the processors pad) to the most
            pixel_values = torch.cat(images) if self.concatenated else pad_sequence(images, batch_first=True)
            prompts = [it["prompt_ids"] for it in items]
        else:
            pixel_values = torch.stack(images)
            image = [self.image_token_index] * self.num_query_tokens  # BLIP-2's: first
            prompts = [image + it["prompt_ids"] for it in items]
        if self.decoder_only:
            seqs = [prompt + it["target_ids"] for prompt, it in zip(prompts, items)]
            input_ids, attention_mask = pad_rows(seqs, self.pad_token_id)
            targets = torch.full_like(input_ids, IGNORE_INDEX)
            for b, (prompt, it) in enumerate(zip(prompts, items)):
                start = len(prompt) - 1  # the last prompt position predicts the first target
                targets[b, start : start + len(it["target_ids"])] = torch.tensor(it["target_ids"])
            batch = {
                "pixel_values": pixel_values,
                "input_ids": input_ids,
                "attention_mask": attention_mask,
                "targets": targets,
            }
            for key in (k for k in PROCESSOR_TOKEN_INPUTS if k in items[0]):  # the prompt's; 0 at the target's
                batch[key] = torch.zeros_like(input_ids)
                for b, it in enumerate(items):
                    batch[key][b, : len(it[key])] = it[key]
            if "pixel_attention_mask" in items[0]:
                batch["pixel_attention_mask"] = pad_sequence(
                    [it["pixel_attention_mask"] for it in items], batch_first=True
                )
            for key in (k for k in ("image_sizes", "image_grid_thw") if k in items[0]):
                batch[key] = torch.stack([it[key] for it in items])
            return batch
        input_ids, attention_mask = pad_rows(prompts, self.pad_token_id)
        decoder_input_ids, _ = pad_rows(
            [[self.decoder_start_token_id] + it["target_ids"][:-1] for it in items], self.pad_token_id
        )
        targets, _ = pad_rows([it["target_ids"] for it in items], IGNORE_INDEX)
        return {
            "pixel_values": pixel_values,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "decoder_input_ids": decoder_input_ids,
            "targets": targets,
        }
