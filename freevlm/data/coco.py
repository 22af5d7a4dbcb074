"""COCO captions: Karpathy's `dataset_coco.json` (with its splits) and the official `captions_*.json`.

NoCaps ships in the official COCO layout plus a `domain` per image, so `read_coco_captions` reads it too
(see `nocaps.py`).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from .records import CaptionRecord, DatasetError, image_path, nonempty, read_json, require, require_list

KARPATHY_SPLITS = ("train", "restval", "val", "test")


def read_karpathy(
    path: str | os.PathLike, image_root: str | os.PathLike, split: str, check_images: bool = True
) -> list[CaptionRecord]:
    """Images of one Karpathy split; `train` includes `restval`, as every Karpathy-split paper trains on both.

    The image lives at `image_root/filepath/filename` (`filepath` is absent in the Flickr files).
    """
    path = Path(path)
    if split not in KARPATHY_SPLITS:
        raise DatasetError(f"unknown Karpathy split {split!r}: one of {KARPATHY_SPLITS}")
    wanted = {"train", "restval"} if split == "train" else {split}
    data = read_json(path)
    records = []
    for i, image in enumerate(require_list(data, "images", path, "the file")):
        where = f"image #{i}"
        if require(image, "split", path, where) not in wanted:
            continue
        name = require(image, "filename", path, where)
        image_id = image.get("cocoid", image.get("imgid", i))
        where = f"image #{i} (id {image_id}, {name})"
        sentences = require_list(image, "sentences", path, where)
        refs = [require(s, "raw", path, f"sentence #{j} of {where}") for j, s in enumerate(sentences)]
        if not refs:
            raise DatasetError(f"{path}: {where} has no sentences")
        file = image_path(image_root, os.path.join(image.get("filepath", ""), name), path, where, check_images)
        records.append(CaptionRecord(file, image_id, refs))
    return nonempty(records, path, f"split {split!r}")


def read_coco_captions(
    path: str | os.PathLike, image_root: str | os.PathLike, check_images: bool = True, domain: str | None = None
) -> list[CaptionRecord]:
    """Every image of an official COCO-format file, with its captions (none in an `image_info_*` test file).

    `domain` keeps only images whose `domain` field equals it (NoCaps).
    """
    path = Path(path)
    data = read_json(path)
    refs: dict[int, list[str]] = defaultdict(list)
    if "annotations" in data:
        for i, ann in enumerate(require_list(data, "annotations", path, "the file")):
            where = f"annotation #{i}"
            refs[require(ann, "image_id", path, where)].append(require(ann, "caption", path, where))
    records = []
    for i, image in enumerate(require_list(data, "images", path, "the file")):
        image_id = require(image, "id", path, f"image #{i}")
        where = f"image #{i} (id {image_id})"
        name = require(image, "file_name", path, where)
        if domain is not None and require(image, "domain", path, where) != domain:
            continue
        if "annotations" in data and not refs.get(image_id):
            raise DatasetError(f"{path}: {where} has no caption in 'annotations'")
        file = image_path(image_root, name, path, where, check_images)
        records.append(CaptionRecord(file, image_id, list(refs.get(image_id, [])), image.get("domain")))
    return nonempty(records, path, "this file" if domain is None else f"domain {domain!r}")
