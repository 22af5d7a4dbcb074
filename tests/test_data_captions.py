import json

import dataset_files as files
import pytest

from freevlm.data.coco import read_coco_captions, read_karpathy
from freevlm.data.nocaps import read_nocaps
from freevlm.data.records import DatasetError
from freevlm.data.specs import DatasetSpec, read_dataset
from freevlm.training import Record, load_coco_captions, split_records


def test_karpathy_splits_round_trip(tmp_path):
    path = files.karpathy(tmp_path)
    val = read_karpathy(path, tmp_path, "val")
    assert len(val) == 1
    assert val[0].image == tmp_path / "val2014" / "COCO_val2014_000000000003.jpg"
    assert val[0].image_id == 3
    assert val[0].references == ["A red square number 2.", "a square 2"]
    assert [r.image_id for r in read_karpathy(path, tmp_path, "train")] == [1, 2]  # train includes restval
    assert [r.image_id for r in read_karpathy(path, tmp_path, "test")] == [4]


def test_karpathy_errors_name_file_and_record(tmp_path):
    path = files.karpathy(tmp_path)
    data = json.loads(path.read_text())
    del data["images"][2]["sentences"]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"dataset_coco\.json.*image #2 \(id 3.*'sentences'"):
        read_karpathy(path, tmp_path, "val")
    with pytest.raises(DatasetError, match="unknown Karpathy split"):
        read_karpathy(path, tmp_path, "dev")


def test_missing_image_is_named(tmp_path):
    path = files.karpathy(tmp_path)
    (tmp_path / "val2014" / "COCO_val2014_000000000004.jpg").unlink()
    with pytest.raises(DatasetError, match=r"image #3 \(id 4.*COCO_val2014_000000000004\.jpg.*does not exist"):
        read_karpathy(path, tmp_path, "test")
    assert read_karpathy(path, tmp_path, "test", check_images=False)[0].image.name == "COCO_val2014_000000000004.jpg"


def test_empty_split_is_an_error(tmp_path):
    path = files.karpathy(tmp_path)
    data = json.loads(path.read_text())
    data["images"] = [im for im in data["images"] if im["split"] != "test"]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"dataset_coco\.json: no records for split 'test'"):
        read_karpathy(path, tmp_path, "test")


def test_training_records_come_from_the_same_reader(tmp_path):
    """One reader for evaluation and training: Karpathy `train` includes `restval` in both, one record per caption."""
    path = files.karpathy(tmp_path)
    records = load_coco_captions(path, split="train", prompt="p")
    assert [(r.image_id, r.target) for r in records] == [
        (1, "A red square number 0."),
        (1, "a square 0"),
        (2, "A red square number 1."),
        (2, "a square 1"),
    ]
    assert [r.image for r in records[::2]] == [str(r.image) for r in read_karpathy(path, tmp_path, "train")]
    with pytest.raises(DatasetError, match="unknown Karpathy split None"):
        load_coco_captions(path)  # all splits at once would train on the test images


def test_split_records_holds_out_whole_images(tmp_path):
    records = [Record(f"{i % 5}.png", "", f"caption {i}") for i in range(20)]
    kept, held = split_records(records, 0.4, seed=3)
    assert len({r.image for r in held}) == 2 and not {r.image for r in held} & {r.image for r in kept}
    assert kept == [r for r in records if r not in held] and held == [r for r in records if r in held]  # in order
    assert split_records(records, 0.4, seed=3) == (kept, held) != split_records(records, 0.4, seed=4)
    assert len(split_records(records, 0.01)[1]) == 4  # at least one image
    with pytest.raises(ValueError, match="fraction must be in"):
        split_records(records, 1.0)


def test_official_captions_round_trip(tmp_path):
    path = files.coco_captions(tmp_path)
    records = read_coco_captions(path, tmp_path / "images")
    assert [r.image_id for r in records] == [10, 11, 12]
    assert records[1].references == ["caption 0 of image 1", "caption 1 of image 1"]
    assert records[1].image == tmp_path / "images" / "0001.jpg"
    assert records[0].domain is None


def test_official_captions_errors(tmp_path):
    path = files.coco_captions(tmp_path)
    data = json.loads(path.read_text())
    del data["annotations"][3]["caption"]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"captions\.json: annotation #3 \(id 103\) has no 'caption' field"):
        read_coco_captions(path, tmp_path / "images")
    data = json.loads(files.coco_captions(tmp_path).read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 12]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"image #2 \(id 12\) has no caption"):
        read_coco_captions(path, tmp_path / "images")
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="captions.json is not valid JSON"):
        read_coco_captions(path, tmp_path / "images")


def test_nocaps_domains(tmp_path):
    path = files.coco_captions(tmp_path, domains=True)
    records = read_nocaps(path, tmp_path / "images")
    assert [r.domain for r in records] == ["in-domain", "near-domain", "out-domain"]
    near = read_nocaps(path, tmp_path / "images", domain="near-domain")
    assert [(r.image_id, r.domain) for r in near] == [(11, "near-domain")]
    with pytest.raises(DatasetError, match="unknown NoCaps domain"):
        read_nocaps(path, tmp_path / "images", domain="far")
    plain = files.coco_captions(tmp_path / "plain")
    with pytest.raises(DatasetError, match=r"image #0 \(id 10\) has no 'domain' field"):
        read_nocaps(plain, tmp_path / "plain" / "images", domain="in-domain")


def test_spec_reads_and_limits(tmp_path):
    path = files.karpathy(tmp_path)
    spec = DatasetSpec("coco-karpathy", [str(path)], str(tmp_path), split="train", limit=1)
    assert spec.task == "captions"
    assert [r.image_id for r in read_dataset(spec)] == [1]
    with pytest.raises(DatasetError, match="needs a split"):
        read_dataset(DatasetSpec("coco-karpathy", [str(path)], str(tmp_path)))
    with pytest.raises(DatasetError, match="unknown dataset format"):
        read_dataset(DatasetSpec("flickr", [str(path)], str(tmp_path)))
