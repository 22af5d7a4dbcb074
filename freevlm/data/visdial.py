"""VisDial v1.0: dialogs over COCO images, 100 candidate answers per round, optional dense relevance.

Format: `{"split": "val2018", "data": {"questions": [str], "answers": [str], "dialogs": [{"image_id", "caption",
"dialog": [{"question": int, "answer": int, "answer_options": [int] * 100, "gt_index": int}]}]}}` where the ints
index `questions` / `answers`. On test only the last round of each dialog has options (and no answer). The dense
file is a list of `{"image_id", "round_id" (1-based), "gt_relevance": [float] * 100}` (older releases: "relevance").
"""

from __future__ import annotations

import os
from pathlib import Path

from .records import DatasetError, VisDialRecord, image_path, nonempty, read_json, require, require_list


def default_image_names(split: str) -> list[str]:
    """VisDial's own val/test images, or the COCO 2014 images its train dialogs are built on."""
    if split.startswith("train"):
        return ["COCO_train2014_{image_id:012d}.jpg", "COCO_val2014_{image_id:012d}.jpg"]
    return ["VisualDialog_" + split + "_{image_id:012d}.jpg"]


def read_visdial(
    path: str | os.PathLike,
    image_root: str | os.PathLike,
    dense: str | os.PathLike | None = None,
    image_names: list[str] | None = None,
    check_images: bool = True,
) -> list[VisDialRecord]:
    """One record per round that has answer options; `dense` adds relevance to the rounds it annotates.

    `image_names` are format strings over `image_id`, tried in order (default from the file's split).
    """
    path = Path(path)
    data = read_json(path)
    split = require(data, "split", path, "the file")
    body = require(data, "data", path, "the file")
    questions = require_list(body, "questions", path, "'data'")
    answers = require_list(body, "answers", path, "'data'")
    relevance = _read_dense(Path(dense)) if dense is not None else {}
    names = image_names or default_image_names(split)
    records = []
    for d, dialog in enumerate(require_list(body, "dialogs", path, "'data'")):
        image_id = require(dialog, "image_id", path, f"dialog #{d}")
        where = f"dialog #{d} (image {image_id})"
        caption = require(dialog, "caption", path, where)
        image = _find_image(image_root, names, image_id, path, where, check_images)
        history: list[tuple[str, str]] = []
        for r, turn in enumerate(require_list(dialog, "dialog", path, where), start=1):
            at = f"round {r} of {where}"
            question = _lookup(questions, require(turn, "question", path, at), path, at, "questions")
            if "answer_options" in turn:
                options = [_lookup(answers, i, path, at, "answers") for i in turn["answer_options"]]
                if not options:
                    raise DatasetError(f"{path}: {at} has an empty 'answer_options'")
                gt = turn.get("gt_index")
                if gt is not None and not 0 <= gt < len(options):
                    raise DatasetError(f"{path}: {at} has gt_index {gt} outside its {len(options)} options")
                rel = relevance.get((image_id, r))
                if rel is not None and len(rel) != len(options):
                    raise DatasetError(
                        f"{dense}: image {image_id} round {r} has {len(rel)} relevances for {len(options)} options"
                    )
                records.append(VisDialRecord(image, image_id, r, caption, list(history), question, options, gt, rel))
            if "answer" in turn:
                history.append((question, _lookup(answers, turn["answer"], path, at, "answers")))
    return nonempty(records, path, "rounds with answer options")


def _lookup(table: list, index, path: Path, where: str, name: str) -> str:
    if not isinstance(index, int) or not 0 <= index < len(table):
        raise DatasetError(f"{path}: {where} refers to {name}[{index!r}], outside the {len(table)} {name}")
    return table[index]


def _find_image(root, names: list[str], image_id: int, path: Path, where: str, check: bool) -> Path:
    candidates = [Path(root) / n.format(image_id=image_id) for n in names]
    for c in candidates:
        if c.is_file():
            return c
    if check:
        raise DatasetError(f"{path}: {where} has no image: none of {[str(c) for c in candidates]} exists")
    return image_path(root, names[0].format(image_id=image_id), path, where, False)


def _read_dense(path: Path) -> dict[tuple[int, int], list[float]]:
    entries = read_json(path)
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: expected a list of dense annotations, got {type(entries).__name__}")
    out = {}
    for i, entry in enumerate(entries):
        where = f"entry #{i}"
        key = (require(entry, "image_id", path, where), require(entry, "round_id", path, where))
        rel = entry.get("gt_relevance", entry.get("relevance"))
        if not isinstance(rel, list):
            raise DatasetError(f"{path}: {where} (image {key[0]}) has no 'gt_relevance' list")
        out[key] = [float(x) for x in rel]
    return out
