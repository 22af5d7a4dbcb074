"""VQAv2 and OK-VQA: a questions JSON and (except on test splits) an annotations JSON, matched by question id.

Both use the VQA format: `{"data_subtype": "val2014", "questions": [{"image_id", "question", "question_id"}]}` and
`{"annotations": [{"question_id", "answers": [{"answer", ...}] * 10, "answer_type", "question_type", ...}]}`.
Images are the COCO files `COCO_<data_subtype>_<12-digit id>.jpg`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .records import DatasetError, VQARecord, image_path, nonempty, read_json, require, require_list

COCO_IMAGE_NAME = "COCO_{subtype}_{image_id:012d}.jpg"


def write_vqa(questions: Path, annotations: Path, info: dict, data_type: str, split: str, rows: list[dict]) -> None:
    """Write generated questions in the VQA format `read_vqa` reads, each answer as ten annotators all giving it.

    `rows`: one dict a question, with `question_id`, `image_id`, `question`, `question_type`, `answer_type`, `answer`.
    """
    head = {"info": info, "data_type": data_type, "data_subtype": split, "license": {}}
    qs = [{"image_id": r["image_id"], "question": r["question"], "question_id": r["question_id"]} for r in rows]
    anns = [
        {
            "question_id": r["question_id"],
            "image_id": r["image_id"],
            "question_type": r["question_type"],
            "answer_type": r["answer_type"],
            "multiple_choice_answer": r["answer"],
            "answers": [{"answer": r["answer"], "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)],
        }
        for r in rows
    ]
    questions.write_text(json.dumps({**head, "task_type": "Open-Ended", "questions": qs}))
    annotations.write_text(json.dumps({**head, "annotations": anns}))


def read_vqa(
    questions: str | os.PathLike,
    annotations: str | os.PathLike | None,
    image_root: str | os.PathLike,
    image_name: str = COCO_IMAGE_NAME,
    check_images: bool = True,
) -> list[VQARecord]:
    """One record per question; without `annotations` (test-dev/test) the answers are empty.

    `image_name` is a format string over `subtype` (the questions file's `data_subtype`) and `image_id`; pass
    "{image_id:012d}.jpg" for COCO 2017 file names.
    """
    q_path = Path(questions)
    q_data = read_json(q_path)
    subtype = q_data.get("data_subtype", "") if isinstance(q_data, dict) else ""
    labels = {}
    if annotations is not None:
        a_path = Path(annotations)
        for i, ann in enumerate(require_list(read_json(a_path), "annotations", a_path, "the file")):
            qid = require(ann, "question_id", a_path, f"annotation #{i}")
            where = f"annotation #{i} (question {qid})"
            answers = [
                require(a, "answer", a_path, f"answer #{j} of {where}")
                for j, a in enumerate(require_list(ann, "answers", a_path, where))
            ]
            if not answers:
                raise DatasetError(f"{a_path}: {where} has no answers")
            labels[qid] = (answers, ann.get("answer_type"), ann.get("question_type"))
    records = []
    for i, q in enumerate(require_list(q_data, "questions", q_path, "the file")):
        qid = require(q, "question_id", q_path, f"question #{i}")
        where = f"question #{i} (id {qid})"
        image_id = require(q, "image_id", q_path, where)
        text = require(q, "question", q_path, where)
        if annotations is not None and qid not in labels:
            raise DatasetError(f"{annotations}: no annotation for {where} of {q_path}")
        answers, answer_type, question_type = labels.get(qid, ([], None, None))
        name = image_name.format(subtype=subtype, image_id=image_id)
        file = image_path(image_root, name, q_path, where, check_images)
        records.append(VQARecord(file, qid, text, answers, answer_type, question_type))
    return nonempty(records, q_path, "its questions")
