"""VizWiz VQA: one annotations JSON, a list of `{"image", "question", "answers", "answer_type", "answerable"}`.

Ten crowd answers per question (scored with the VQA accuracy); "unanswerable" is a legitimate answer and
`answerable` says whether the question can be answered from the image. Test files have no answers.
"""

from __future__ import annotations

import os
from pathlib import Path

from .records import DatasetError, VQARecord, image_path, nonempty, read_json, require


def read_vizwiz(path: str | os.PathLike, image_root: str | os.PathLike, check_images: bool = True) -> list[VQARecord]:
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a list of questions, got {type(data).__name__}")
    records = []
    for i, q in enumerate(data):
        name = require(q, "image", path, f"question #{i}")
        where = f"question #{i} ({name})"
        text = require(q, "question", path, where)
        answers = [require(a, "answer", path, f"answer #{j} of {where}") for j, a in enumerate(q.get("answers", []))]
        answerable = q.get("answerable")
        file = image_path(image_root, name, path, where, check_images)
        records.append(
            VQARecord(
                file, name, text, answers, q.get("answer_type"), None, None if answerable is None else bool(answerable)
            )
        )
    return nonempty(records, path, "its questions")
