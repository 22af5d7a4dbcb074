import json

import dataset_files as files
import pytest

from freevlm.data.gqa import read_gqa
from freevlm.data.records import DatasetError
from freevlm.data.specs import DatasetSpec, read_dataset
from freevlm.data.vizwiz import read_vizwiz
from freevlm.data.vqa import read_vqa


def test_vqav2_round_trip(tmp_path):
    q, a = files.vqa(tmp_path)
    records = read_vqa(q, a, tmp_path / "val2014")
    assert [r.question_id for r in records] == [420, 421, 730]
    first = records[0]
    assert first.image == tmp_path / "val2014" / "COCO_val2014_000000000042.jpg"
    assert first.question == "What color is the square?"
    assert first.answers == ["red"] * 8 + ["dark red", "maroon"]
    assert (first.answer_type, first.question_type) == ("other", "what color is the")
    unlabeled = read_vqa(q, None, tmp_path / "val2014")  # test-dev: questions only
    assert [r.answers for r in unlabeled] == [[], [], []]


def test_vqav2_errors(tmp_path):
    q, a = files.vqa(tmp_path)
    data = json.loads(a.read_text())
    data["annotations"] = data["annotations"][:2]
    a.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"annotations\.json: no annotation for question #2 \(id 730\)"):
        read_vqa(q, a, tmp_path / "val2014")
    data = json.loads(q.read_text())
    del data["questions"][1]["image_id"]
    q.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"questions\.json: question #1 \(id 421\) has no 'image_id'"):
        read_vqa(q, None, tmp_path / "val2014")
    with pytest.raises(DatasetError, match="dataset file not found"):
        read_vqa(tmp_path / "nope.json", None, tmp_path)


def test_okvqa_spec_uses_the_vqa_format(tmp_path):
    q, a = files.vqa(tmp_path)
    spec = DatasetSpec("okvqa", [str(q), str(a)], str(tmp_path / "val2014"))
    assert spec.task == "vqa" and spec.vqa_metric == "vqa"
    assert len(read_dataset(spec)) == 3
    (tmp_path / "val2014" / "COCO_val2014_000000000073.jpg").unlink()
    with pytest.raises(DatasetError, match=r"question #2 \(id 730\) points at image .*000000000073\.jpg"):
        read_dataset(spec)


def test_gqa_round_trip(tmp_path):
    path = files.gqa(tmp_path)
    records = read_gqa(path, tmp_path / "images")
    assert [(r.question_id, r.answers, r.answer_type) for r in records] == [
        ("201307251", ["yes"], "verify"),
        ("05515938", ["red"], "query"),
    ]
    assert records[0].image == tmp_path / "images" / "n161313.jpg"
    assert DatasetSpec("gqa", [str(path)], str(tmp_path / "images")).vqa_metric == "exact"
    data = json.loads(path.read_text())
    del data["05515938"]["imageId"]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"val_balanced_questions\.json: question 05515938 has no 'imageId'"):
        read_gqa(path, tmp_path / "images")
    path.write_text("{}")
    with pytest.raises(DatasetError, match="no records"):
        read_gqa(path, tmp_path / "images")


def test_vizwiz_round_trip(tmp_path):
    path = files.vizwiz(tmp_path)
    records = read_vizwiz(path, tmp_path / "val")
    assert [(r.answerable, r.answer_type, r.answers[0]) for r in records] == [
        (True, "other", "red"),
        (False, "unanswerable", "unanswerable"),
    ]
    assert records[1].image == tmp_path / "val" / "VizWiz_val_00000001.jpg"
    assert len(records[0].answers) == 10
    data = json.loads(path.read_text())
    del data[1]["question"]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"val\.json: question #1 \(VizWiz_val_00000001\.jpg\) has no 'question'"):
        read_vizwiz(path, tmp_path / "val")
