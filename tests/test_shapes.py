"""The shapes world: deterministic, its text agrees with its pixels, the OOD split holds out its pairs, files valid."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from freevlm.data.coco import read_coco_captions
from freevlm.data.shapes import (
    BACKGROUND,
    COLOURS,
    HELD_OUT,
    NUMBERS,
    SHAPES,
    SPLITS,
    generate_split,
    make_example,
    render,
    vocabulary,
    write_split,
)
from freevlm.data.vqa import read_vqa


@pytest.fixture(scope="module")
def sample():
    return [e for split in SPLITS for e in generate_split(split, 100, seed=7)]


def test_deterministic_for_a_seed():
    a, b = generate_split("train", 30, seed=3), generate_split("train", 30, seed=3)
    assert a == b
    assert [render(e.scene).tobytes() for e in a] == [render(e.scene).tobytes() for e in b]
    assert generate_split("train", 30, seed=4) != a
    assert make_example("train", 17, seed=3) == a[17]  # any example alone, in any order


def test_pixels_show_the_described_objects(sample):
    for e in sample:
        pixels = np.asarray(render(e.scene))
        allowed = {BACKGROUND} | {COLOURS[o.colour] for o in e.scene.objects}
        assert {tuple(p) for p in pixels.reshape(-1, 3)} <= allowed
        for o in e.scene.objects:
            assert tuple(pixels[o.y, o.x]) == COLOURS[o.colour], (e.image_id, o)
            area = (pixels == COLOURS[o.colour]).all(-1).sum()
            assert area >= (2 * o.radius) ** 2 * 0.25  # drawn at about its size, not a dot


def _objects(scene, words):
    """Objects a phrase like 'large circle', 'red', 'small red circle' refers to."""
    keys = set(words.split())
    return [o for o in scene.objects if keys <= {o.size, o.colour, o.shape}]


def _answer(scene, question):
    """An independent reading of each question template, straight from the object list."""
    q = question.removesuffix(" ?")
    if m := re.fullmatch(r"what color is the (.+)", q):
        (o,) = _objects(scene, m[1])
        return o.colour
    if m := re.fullmatch(r"what shape is the (.+) object", q):
        (o,) = _objects(scene, m[1])
        return o.shape
    if q == "how many shapes are there":
        return str(len(scene.objects))
    if m := re.fullmatch(r"how many (\w+) shapes are there", q):
        return str(len(_objects(scene, m[1])))
    if m := re.fullmatch(r"which side of the image is the (.+) on", q):
        (o,) = _objects(scene, m[1])
        return "left" if o.x < scene.image_size / 2 else "right"
    if m := re.fullmatch(r"is the (\w+ \w+) (to the left of|to the right of|above|below) the (\w+ \w+)", q):
        (a,), (b,) = _objects(scene, m[1]), _objects(scene, m[3])
        dx, dy = b.x - a.x, b.y - a.y
        actual = (
            ("to the left of" if dx > 0 else "to the right of")
            if abs(dx) >= abs(dy)
            else ("above" if dy > 0 else "below")
        )
        return "yes" if actual == m[2] else "no"
    if m := re.fullmatch(r"is there an? (\w+) (\w+) in the image", q):
        return "yes" if _objects(scene, f"{m[1]} {m[2]}") else "no"
    raise AssertionError(f"unknown question template: {question}")


def test_answers_and_captions_follow_from_the_scene(sample):
    vocab = set(vocabulary())
    types = set()
    for e in sample:
        for qa in e.questions:
            assert _answer(e.scene, qa.question) == qa.answer, (e.image_id, qa)
            types.add(qa.question_type)
            assert set(qa.question.split()) <= vocab
        assert len(set(e.captions)) == 5
        for caption in e.captions:
            assert 6 <= len(caption.split()) <= 30, caption
            assert set(caption.split()) <= vocab
        objs = e.scene.objects
        canonical = e.captions[0]
        assert canonical.startswith(f"{NUMBERS[len(objs)]} shape")
        # the canonical caption walks the objects left to right, each placed against the one before it
        walk = canonical.split(" : ", 1)[1].split(" , ")
        assert len(walk) == len(objs)
        for k, (phrase, o) in enumerate(zip(walk, objs)):
            assert re.sub(r"^an? ", "", phrase).startswith(o.description), (canonical, o)
            if k:
                a, b = o, objs[k - 1]
                dx, dy = a.x - b.x, a.y - b.y
                expected = "to its right" if abs(dx) >= abs(dy) else ("above it" if dy < 0 else "below it")
                assert phrase.endswith(expected), (canonical, k)
    assert types == {"colour", "shape", "count", "position", "existence"}


def test_answers_are_balanced_enough_to_need_the_image(sample):
    yes_no = [qa.answer for e in sample for qa in e.questions if qa.answer_type == "yes/no"]
    assert 0.35 < yes_no.count("yes") / len(yes_no) < 0.65
    colours = {e.scene.objects[0].colour for e in sample}
    shapes = {o.shape for e in sample for o in e.scene.objects}
    assert colours == set(COLOURS) and shapes == set(SHAPES)


def test_ood_split_holds_out_colour_shape_pairs():
    held = {f"{c} {s}" for c, s in HELD_OUT}
    for split in [s for s in SPLITS if s != "ood"]:
        for e in generate_split(split, 300, seed=1):
            assert not {(o.colour, o.shape) for o in e.scene.objects} & HELD_OUT
            texts = e.captions + [qa.question for qa in e.questions]
            assert not any(pair in text for pair in held for text in texts), e.image_id
    for e in generate_split("ood", 300, seed=1):
        assert {(o.colour, o.shape) for o in e.scene.objects} & HELD_OUT


def test_written_split_is_valid_coco_and_vqav2(tmp_path):
    files = write_split(tmp_path, "dev", 12, seed=2)
    coco = json.loads(files.captions.read_text())
    assert {"images", "annotations"} <= coco.keys()
    ids = [img["id"] for img in coco["images"]]
    assert len(set(ids)) == 12 and len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"]) == 60
    for img in coco["images"]:
        with Image.open(tmp_path / img["file_name"]) as im:
            assert im.format == "PNG" and im.size == (img["width"], img["height"]) == (64, 64)
    questions = json.loads(files.questions.read_text())
    annotations = json.loads(files.annotations.read_text())
    assert questions["data_subtype"] == "dev"
    assert [q["question_id"] for q in questions["questions"]] == [a["question_id"] for a in annotations["annotations"]]
    for ann in annotations["annotations"]:
        assert len(ann["answers"]) == 10 and ann["answer_type"] in ("yes/no", "number", "other")
        assert {a["answer"] for a in ann["answers"]} == {ann["multiple_choice_answer"]}
    # the project's own readers take the files as they are
    captions = read_coco_captions(files.captions, files.root)
    assert [r.references for r in captions] == [e.captions for e in generate_split("dev", 12, seed=2)]
    vqa = read_vqa(files.questions, files.annotations, files.root, image_name=files.image_name)
    assert len(vqa) == 72 and all(r.image.is_file() for r in vqa)


def test_the_demo_tokenizer_gives_ptb_tokens_on_shapes_captions():
    """The demo scores CIDEr-only runs with `demo.stats.tokenize` instead of PTB's Java tokenizer: same tokens."""
    from freevlm.demo.stats import tokenize
    from freevlm.eval.captions import tokenize as ptb

    captions = {
        e.image_id: e.captions + [qa.question for qa in e.questions]
        for split in ("train", "ood")
        for e in generate_split(split, 60, seed=5)
    }
    assert tokenize(captions) == ptb(captions)
