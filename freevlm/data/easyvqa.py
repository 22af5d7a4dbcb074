"""The `easy-vqa` package's images and questions as a VQAv2-format task nobody here wrote.

The shapes world is ours, so a model doing well on it could share our blind spots; easy-VQA (64x64 images of one
shape, 13 answers) is an outside check with the same readers and metrics. The package ships train and test only;
"dev" is the last tenth of the train images (by id), so thresholds can be chosen without touching test.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .vqa import write_vqa

SPLITS = ("train", "dev", "test")
DEV_FROM_IMAGE = 3600  # train images with id >= this form "dev"
IMAGE_NAME = "{image_id}.png"  # for `read_vqa(..., image_name=IMAGE_NAME)`, relative to `EasyVQAFiles.image_root`


@dataclass(frozen=True)
class EasyVQAQuestion:
    question_id: int
    image_id: int
    image: Path
    question: str
    answer: str


def _source(split: str) -> tuple[list, dict[int, str], int]:
    """(questions, image paths, question-id offset) of the package split a split of ours comes from."""
    import easy_vqa

    if split not in SPLITS:
        raise ValueError(f"unknown easy-vqa split {split!r}: one of {SPLITS}")
    if split == "test":
        return list(zip(*easy_vqa.get_test_questions())), easy_vqa.get_test_image_paths(), 1_000_000
    return list(zip(*easy_vqa.get_train_questions())), easy_vqa.get_train_image_paths(), 0


def load_split(split: str, limit: int | None = None) -> list[EasyVQAQuestion]:
    """The questions of a split in the package's order (first `limit` only, if given)."""
    rows, images, offset = _source(split)
    out = []
    for i, (question, answer, image_id) in enumerate(rows):
        if split != "test" and (image_id >= DEV_FROM_IMAGE) != (split == "dev"):
            continue
        out.append(EasyVQAQuestion(offset + i + 1, image_id, Path(images[image_id]), question, answer))
        if limit is not None and len(out) >= limit:
            break
    return out


@dataclass(frozen=True)
class EasyVQAFiles:
    questions: Path  # VQAv2 questions format
    annotations: Path  # VQAv2 annotations format
    image_root: Path  # the package's own image folder (nothing copied)
    image_name: str = IMAGE_NAME


def write_split(root: str | os.PathLike, split: str, limit: int | None = None) -> EasyVQAFiles:
    """VQAv2 questions/annotations JSON for a split (10 identical answers per question, as one annotator).

    Read back with `read_vqa(files.questions, files.annotations, files.image_root, image_name=IMAGE_NAME)`.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    items = load_split(split, limit)
    rows = [
        {
            "question_id": q.question_id,
            "image_id": q.image_id,
            "question": q.question,
            "question_type": _question_type(q.question),
            "answer_type": "yes/no" if q.answer in ("yes", "no") else "other",
            "answer": q.answer,
        }
        for q in items
    ]
    files = EasyVQAFiles(
        root / f"easyvqa_questions_{split}.json",
        root / f"easyvqa_annotations_{split}.json",
        items[0].image.parent if items else Path(),
    )
    info = {"description": f"easy-VQA (python package easy-vqa), split {split}"}
    write_vqa(files.questions, files.annotations, info, "easy-vqa", split, rows)
    return files


def _question_type(question: str) -> str:
    """VQAv2-style question type: the question's first words ('what color is', 'is there', 'does the image')."""
    words = question.rstrip("?").split()
    return " ".join(words[:3] if words[0] == "what" else words[:2])


def vocabulary() -> list[str]:
    """Every word and punctuation mark in the package's questions and answers (sorted)."""
    import easy_vqa

    words = set(easy_vqa.get_answers())
    for texts, _answers, _ in (easy_vqa.get_train_questions(), easy_vqa.get_test_questions()):
        for text in texts:
            words.update(re.findall(r"\w+|[^\w\s]", text.lower()))
    return sorted(words)
