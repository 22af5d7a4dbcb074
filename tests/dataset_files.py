"""Tiny dataset files in the public formats (COCO, Karpathy, NoCaps, VQAv2, GQA, VizWiz, VisDial) for tests."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def write_image(path: Path, color=(200, 30, 30), size: int = 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def karpathy(root: Path) -> Path:
    """Four images: train, restval, val, test; images under val2014/ as Karpathy's filepath says."""
    images = []
    for i, split in enumerate(["train", "restval", "val", "test"]):
        name = f"COCO_val2014_{i + 1:012d}.jpg"
        write_image(root / "val2014" / name, (60 * i, 100, 100))
        sentences = [
            {"tokens": ["a", "red", "square"], "raw": f"A red square number {i}.", "imgid": i, "sentid": 2 * i},
            {"tokens": ["a", "square"], "raw": f"a square {i}", "imgid": i, "sentid": 2 * i + 1},
        ]
        images.append(
            {
                "filepath": "val2014",
                "sentids": [2 * i, 2 * i + 1],
                "filename": name,
                "imgid": i,
                "split": split,
                "sentences": sentences,
                "cocoid": i + 1,
            }
        )
    return write_json(root / "dataset_coco.json", {"images": images, "dataset": "coco"})


def coco_captions(root: Path, domains: bool = False) -> Path:
    """Official COCO caption layout; with `domains`, NoCaps' (one image per domain)."""
    names = ["in-domain", "near-domain", "out-domain"]
    images, anns = [], []
    for i in range(3):
        name = f"{i:04d}.jpg"
        write_image(root / "images" / name, (0, 80 * i, 0))
        image = {"id": 10 + i, "file_name": name, "height": 32, "width": 32}
        if domains:
            image["domain"] = names[i]
        images.append(image)
        anns += [{"image_id": 10 + i, "id": 100 + 2 * i + j, "caption": f"caption {j} of image {i}"} for j in range(2)]
    return write_json(root / "captions.json", {"info": {}, "images": images, "annotations": anns})


def vqa(root: Path) -> tuple[Path, Path]:
    """VQAv2 questions + annotations (3 questions on 2 COCO val2014 images)."""
    for image_id in (42, 73):
        write_image(root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg")
    questions = [
        {"image_id": 42, "question": "What color is the square?", "question_id": 420},
        {"image_id": 42, "question": "How many squares?", "question_id": 421},
        {"image_id": 73, "question": "Is it red?", "question_id": 730},
    ]
    answers = {420: ["red"] * 8 + ["dark red", "maroon"], 421: ["1"] * 6 + ["one"] * 4, 730: ["yes"] * 10}
    types = {420: ("other", "what color is the"), 421: ("number", "how many"), 730: ("yes/no", "is it")}
    anns = [
        {
            "question_type": types[q][1],
            "multiple_choice_answer": answers[q][0],
            "image_id": img,
            "answer_type": types[q][0],
            "question_id": q,
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers[q])
            ],
        }
        for q, img in ((420, 42), (421, 42), (730, 73))
    ]
    q = write_json(
        root / "v2_OpenEnded_mscoco_val2014_questions.json",
        {
            "info": {},
            "task_type": "Open-Ended",
            "data_type": "mscoco",
            "data_subtype": "val2014",
            "questions": questions,
            "license": {},
        },
    )
    a = write_json(
        root / "v2_mscoco_val2014_annotations.json",
        {"info": {}, "data_type": "mscoco", "data_subtype": "val2014", "annotations": anns, "license": {}},
    )
    return q, a


def gqa(root: Path) -> Path:
    write_image(root / "images" / "n161313.jpg")
    write_image(root / "images" / "2354786.jpg")
    data = {
        "201307251": {
            "imageId": "n161313",
            "question": "Is the square red?",
            "answer": "yes",
            "fullAnswer": "Yes, the square is red.",
            "isBalanced": True,
            "groups": {"global": None},
            "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"},
        },
        "05515938": {
            "imageId": "2354786",
            "question": "What color is the square?",
            "answer": "red",
            "fullAnswer": "The square is red.",
            "isBalanced": True,
            "types": {"structural": "query", "semantic": "attr", "detailed": "color"},
        },
    }
    return write_json(root / "val_balanced_questions.json", data)


def vizwiz(root: Path) -> Path:
    data = []
    for i, (answerable, answer, kind) in enumerate([(1, "red", "other"), (0, "unanswerable", "unanswerable")]):
        name = f"VizWiz_val_{i:08d}.jpg"
        write_image(root / "val" / name)
        data.append(
            {
                "image": name,
                "question": f"What is this {i}?",
                "answerable": answerable,
                "answer_type": kind,
                "answers": [{"answer": answer, "answer_confidence": "yes"}] * 10,
            }
        )
    return write_json(root / "val.json", data)


def visdial(root: Path, split: str = "val2018", dialogs: int = 2) -> tuple[Path, Path]:
    """`dialogs` dialogs of 3 rounds, 4 options per round (the real files have 10 rounds and 100 options)."""
    questions = ["what color is it", "is it big", "how many", "any people"]
    answers = ["red", "no", "one", "yes", "blue", "two"]
    image_ids = [185565, 284024, *range(300000, 300000 + dialogs - 2)][:dialogs]
    written = []
    for d, image_id in enumerate(image_ids):
        write_image(root / "images" / f"VisualDialog_{split}_{image_id:012d}.jpg")
        rounds = []
        for r in range(3):
            gt = (r + d) % 4
            options = [(r + k) % len(answers) for k in range(4)]
            rounds.append(
                {"question": (r + d) % len(questions), "answer": options[gt], "answer_options": options, "gt_index": gt}
            )
        written.append({"image_id": image_id, "caption": f"a square {d}", "dialog": rounds})
    path = write_json(
        root / f"visdial_1.0_{split[:-4]}.json",
        {"version": "1.0", "split": split, "data": {"questions": questions, "answers": answers, "dialogs": written}},
    )
    dense = write_json(root / "dense.json", [{"image_id": 185565, "round_id": 2, "gt_relevance": [0.0, 1.0, 0.5, 0.0]}])
    return path, dense
