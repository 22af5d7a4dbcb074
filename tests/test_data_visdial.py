import json

import dataset_files as files
import pytest

from freevlm.data.records import DatasetError
from freevlm.data.visdial import read_visdial


def test_visdial_round_trip_with_dense(tmp_path):
    path, dense = files.visdial(tmp_path)
    records = read_visdial(path, tmp_path / "images", dense=dense)
    assert len(records) == 6  # 2 dialogs x 3 rounds
    r = records[1]
    assert (r.image_id, r.round, r.caption) == (185565, 2, "a square 0")
    assert r.image == tmp_path / "images" / "VisualDialog_val2018_000000185565.jpg"
    assert r.question == "is it big"
    assert r.options == ["no", "one", "yes", "blue"]
    assert r.gt_index == 1 and r.options[r.gt_index] == "one"
    assert r.history == [("what color is it", "red")]  # round 1's question and its ground-truth answer
    assert r.relevance == [0.0, 1.0, 0.5, 0.0]
    assert records[0].relevance is None and records[0].history == []


def test_visdial_test_split_has_only_last_round(tmp_path):
    path, _ = files.visdial(tmp_path, split="test2018")
    data = json.loads(path.read_text())
    for dialog in data["data"]["dialogs"]:
        last = dialog["dialog"][-1]
        for turn in dialog["dialog"][:-1]:
            del turn["answer_options"], turn["gt_index"]
        del last["answer"], last["gt_index"]
    path.write_text(json.dumps(data))
    records = read_visdial(path, tmp_path / "images")
    assert [(r.round, r.gt_index, len(r.history)) for r in records] == [(3, None, 2), (3, None, 2)]


def test_visdial_errors(tmp_path):
    path, dense = files.visdial(tmp_path)
    data = json.loads(path.read_text())
    data["data"]["dialogs"][1]["dialog"][2]["answer_options"][0] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"round 3 of dialog #1 \(image 284024\) refers to answers\[99\]"):
        read_visdial(path, tmp_path / "images")
    path, dense = files.visdial(tmp_path)
    dense.write_text(json.dumps([{"image_id": 185565, "round_id": 2, "gt_relevance": [1.0]}]))
    with pytest.raises(DatasetError, match=r"dense\.json: image 185565 round 2 has 1 relevances for 4 options"):
        read_visdial(path, tmp_path / "images", dense=dense)
    (tmp_path / "images" / "VisualDialog_val2018_000000284024.jpg").unlink()
    with pytest.raises(DatasetError, match=r"dialog #1 \(image 284024\) has no image"):
        read_visdial(path, tmp_path / "images")
