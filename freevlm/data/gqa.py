"""GQA balanced questions: `{question_id: {"imageId", "question", "answer", "types": {"structural", ...}}}`.

Images are `<imageId>.jpg` under the images folder. GQA has one answer per question (exact-match accuracy).
"""

from __future__ import annotations

import os
from pathlib import Path

from .records import DatasetError, VQARecord, image_path, nonempty, read_json, require


def read_gqa(path: str | os.PathLike, image_root: str | os.PathLike, check_images: bool = True) -> list[VQARecord]:
    """One record per question; `answer_type` is the question's structural type (verify, query, choose...)."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected an object mapping question ids to questions")
    records = []
    for qid, q in data.items():
        where = f"question {qid}"
        image_id = require(q, "imageId", path, where)
        text = require(q, "question", path, where)
        answers = [q["answer"]] if isinstance(q, dict) and "answer" in q else []  # test questions have none
        types = q.get("types") or {}
        file = image_path(image_root, f"{image_id}.jpg", path, where, check_images)
        records.append(VQARecord(file, qid, text, answers, types.get("structural"), types.get("semantic")))
    return nonempty(records, path, "its questions")
