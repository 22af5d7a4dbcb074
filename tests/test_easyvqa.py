"""easy-VQA from its package, in the VQAv2 format the project's reader and metrics take."""

import json

from freevlm.data import easyvqa
from freevlm.data.vqa import read_vqa


def test_splits_are_disjoint_by_image_and_complete():
    train, dev = easyvqa.load_split("train"), easyvqa.load_split("dev")
    assert {q.image_id for q in train}.isdisjoint({q.image_id for q in dev})
    assert len(train) + len(dev) == 38575  # all of the package's train questions
    assert (
        len({q.question_id for q in train + dev + easyvqa.load_split("test", limit=50)}) == len(train) + len(dev) + 50
    )


def test_written_split_reads_back_as_vqa_records(tmp_path):
    files = easyvqa.write_split(tmp_path, "test", limit=40)
    annotations = json.loads(files.annotations.read_text())["annotations"]
    assert all(len(a["answers"]) == 10 for a in annotations)
    records = read_vqa(files.questions, files.annotations, files.image_root, image_name=files.image_name)
    source = easyvqa.load_split("test", limit=40)
    assert [(r.question, r.answers[0], r.image) for r in records] == [(q.question, q.answer, q.image) for q in source]
    assert {r.answer_type for r in records} <= {"yes/no", "other"}
    assert all(r.image.is_file() for r in records)
