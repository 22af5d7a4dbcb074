"""Plain records the dataset readers yield, and the checks that make a malformed file fail with its name.

Every reader turns one public annotation format into these dataclasses, so the evaluation loop never sees a
format. Errors name the file and the record (index and id) so a broken download is found in one look.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


class DatasetError(ValueError):
    """A dataset file that is missing, not in the expected format, or points at images that are not there."""


@dataclass
class CaptionRecord:
    image: Path
    image_id: int | str
    references: list[str]  # empty for splits without public captions
    domain: str | None = None  # NoCaps: "in-domain" / "near-domain" / "out-domain"


@dataclass
class VQARecord:
    image: Path
    question_id: int | str
    question: str
    answers: list[str]  # the human answers (10 for VQAv2 / OK-VQA / VizWiz, 1 for GQA); empty without labels
    answer_type: str | None = None  # "yes/no" / "number" / "other" / "unanswerable" (VizWiz); GQA: structural type
    question_type: str | None = None
    answerable: bool | None = None  # VizWiz only


@dataclass
class VisDialRecord:
    image: Path
    image_id: int
    round: int  # 1-based, as in the dense annotations
    caption: str
    history: list[tuple[str, str]]  # the (question, answer) rounds before this one
    question: str
    options: list[str]  # the 100 candidate answers
    gt_index: int | None  # index of the ground-truth answer in `options` (None on the test split)
    relevance: list[float] | None = field(default=None)  # dense relevance of each option, where annotated


def read_json(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path} is not valid JSON: {err}") from err


def require(obj, key: str, path: Path, where: str):
    """`obj[key]`, or a `DatasetError` naming the file, the record and the missing key."""
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: {where} should be a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise DatasetError(f"{path}: {where} has no '{key}' field")
    return obj[key]


def require_list(obj, key: str, path: Path, where: str) -> list:
    value = require(obj, key, path, where)
    if not isinstance(value, list):
        raise DatasetError(f"{path}: '{key}' of {where} should be a list, got {type(value).__name__}")
    return value


def image_path(root: str | os.PathLike, name: str, path: Path, where: str, check: bool) -> Path:
    """The image a record points at under `root`; with `check`, a record whose image is absent is an error."""
    image = Path(root) / name
    if check and not image.is_file():
        raise DatasetError(f"{path}: {where} points at image {image}, which does not exist")
    return image


def nonempty(records: list, path: Path, what: str) -> list:
    if not records:
        raise DatasetError(f"{path}: no records for {what}")
    return records


def split_records(records: Sequence, fraction: float, seed: int = 0) -> tuple[list, list]:
    """(kept, held out), each in the records' order: a seeded random `fraction` of the images (at least one) held
    out with all their records, so no held-out image is also in the kept part (the paper: 80/20 by image)."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    images = sorted({r.image for r in records})
    random.Random(seed).shuffle(images)
    held = set(images[: max(1, round(len(images) * fraction))])
    return [r for r in records if r.image not in held], [r for r in records if r.image in held]
