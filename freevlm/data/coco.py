"""COCO captions: Karpathy's `dataset_coco.json` (with its splits) and the official `captions_*.json`, for
evaluation and training alike (`read_captions` tells the two apart).

NoCaps ships in the official COCO layout plus a `domain` per image, so `read_coco_captions` reads it too
(see `nocaps.py`).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from .records import CaptionRecord, DatasetError, image_path, nonempty, read_json, require, require_list

KARPATHY_SPLITS = ("train", "restval", "val", "test")


def read_captions(
    path: str | os.PathLike,
    image_root: str | os.PathLike,
    split: str | None = None,
    check_images: bool = True,
    domain: str | None = None,
    allow_empty: bool = False,
) -> list[CaptionRecord]:
    """Images and their captions from either layout, told apart by content: Karpathy's `dataset_coco.json` (`split`
    picks one; `train` includes `restval`) or the official `captions_*.json` (`domain`: NoCaps). `allow_empty`:
    the caller reports an empty file itself."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(
            f"{path} is not a COCO captions file: expected 'images' + 'annotations' (captions_*.json) "
            "or 'images' with 'sentences' (Karpathy dataset_coco.json)"
        )
    if "sentences" in (data["images"] or [{}])[0]:
        records = _karpathy(data, path, image_root, split, check_images)
    elif split is not None:
        raise DatasetError(f"{path} is an official COCO file, which has no splits (split {split!r})")
    else:
        records = _official(data, path, image_root, check_images, domain)
    if allow_empty:
        return records
    return nonempty(records, path, f"split {split!r}" if split else f"domain {domain!r}" if domain else "this file")


def read_karpathy(
    path: str | os.PathLike, image_root: str | os.PathLike, split: str, check_images: bool = True
) -> list[CaptionRecord]:
    """Images of one Karpathy split; `train` includes `restval`, as every Karpathy-split paper trains on both.

    The image lives at `image_root/filepath/filename` (`filepath` is absent in the Flickr files).
    """
    return read_captions(path, image_root, split, check_images)


def _karpathy(data: dict, path: Path, image_root: str | os.PathLike, split: str | None, check_images: bool) -> list:
    if split not in KARPATHY_SPLITS:
        raise DatasetError(f"unknown Karpathy split {split!r}: one of {KARPATHY_SPLITS}")
    wanted = {"train", "restval"} if split == "train" else {split}
    records = []
    for i, image in enumerate(require_list(data, "images", path, "the file")):
        where = f"image #{i}"
        if require(image, "split", path, where) not in wanted:
            continue
        name = require(image, "filename", path, where)
        image_id = image.get("cocoid", image.get("imgid", i))
        where = f"image #{i} (id {image_id}, {name})"
        sentences = require_list(image, "sentences", path, where)
        refs = [_caption(s, "raw", path, f"sentence #{j} of {where}") for j, s in enumerate(sentences)]
        if not refs:
            raise DatasetError(f"{path}: {where} has no sentences")
        file = image_path(image_root, os.path.join(image.get("filepath", ""), name), path, where, check_images)
        records.append(CaptionRecord(file, image_id, refs))
    return records


def read_coco_captions(
    path: str | os.PathLike, image_root: str | os.PathLike, check_images: bool = True, domain: str | None = None
) -> list[CaptionRecord]:
    """Every image of an official COCO-format file, with its captions (none in an `image_info_*` test file).

    `domain` keeps only images whose `domain` field equals it (NoCaps).
    """
    return read_captions(path, image_root, check_images=check_images, domain=domain)


def _official(data: dict, path: Path, image_root: str | os.PathLike, check_images: bool, domain: str | None) -> list:
    images = require_list(data, "images", path, "the file")
    ids = {require(image, "id", path, f"image #{i}") for i, image in enumerate(images)}
    refs: dict[int, list[str]] = defaultdict(list)
    if "annotations" in data:
        for i, ann in enumerate(require_list(data, "annotations", path, "the file")):
            where = f"annotation #{i} (id {ann.get('id')})" if isinstance(ann, dict) else f"annotation #{i}"
            image_id = require(ann, "image_id", path, where)
            if image_id not in ids:
                raise DatasetError(f"{path}: {where} names image_id {image_id} with no image")
            refs[image_id].append(_caption(ann, "caption", path, where))
    records = []
    for i, image in enumerate(images):
        image_id = image["id"]
        where = f"image #{i} (id {image_id})"
        name = require(image, "file_name", path, where)
        if domain is not None and require(image, "domain", path, where) != domain:
            continue
        if "annotations" in data and not refs.get(image_id):
            raise DatasetError(f"{path}: {where} has no caption in 'annotations'")
        file = image_path(image_root, name, path, where, check_images)
        records.append(CaptionRecord(file, image_id, list(refs.get(image_id, [])), image.get("domain")))
    return records


def _caption(obj, key: str, path: Path, where: str) -> str:
    """A caption, stripped: non-empty text (an empty training target would teach the model to stop at once)."""
    value = require(obj, key, path, where)
    if not isinstance(value, str):
        raise DatasetError(f"{path}: {where} has a caption that is {type(value).__name__}, not text: {value!r}")
    if not value.strip():
        raise DatasetError(f"{path}: {where} has an empty caption")
    return value.strip()
