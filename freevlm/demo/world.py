"""Stage 1, data: the shapes world's splits (COCO-caption and VQAv2 formats) and the easy-VQA package's questions,
written once into the cache and read back as records."""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..data import easyvqa, shapes
from ..data.coco import read_coco_captions
from ..data.records import CaptionRecord, VQARecord
from ..data.vqa import read_vqa
from ..eval.evaluate import CAPTION_PROMPT, VQA_PROMPT
from ..training.data import Record
from .config import DemoConfig

SPLITS = ("train", "dev", "test", "ood", "calibration")


@dataclass
class World:
    captions: dict[str, list[CaptionRecord]]  # by split (SPLITS)
    vqa: dict[str, list[VQARecord]]  # shapes questions: train, test (a sample of `vqa_test_questions`)
    easyvqa: dict[str, list[VQARecord]]  # train, test

    def caption_records(self, split: str = "train") -> list[Record]:
        """One caption per image (its first template): the exits' training text."""
        return [Record(str(r.image), CAPTION_PROMPT, r.references[0], r.image_id) for r in self.captions[split]]

    def backbone_records(self, vqa_per_image: int) -> list[Record]:
        """The canonical caption of every training image and the VQA answers, with the prompts evaluation uses.

        One caption per image (the first template) makes the target deterministic: with minutes of CPU, a model
        trained on all five templates spends its capacity on which template comes next."""
        seen: dict = {}  # questions taken per image so far
        shapes_vqa = []
        for r in self.vqa["train"]:
            seen[r.image] = seen.get(r.image, 0) + 1
            if seen[r.image] <= vqa_per_image:
                shapes_vqa.append(r)
        return self.caption_records("train") + [
            Record(str(r.image), VQA_PROMPT.format(question=r.question), r.answers[0], r.question_id)
            for r in [*shapes_vqa, *self.easyvqa["train"]]
        ]


def load_world(cfg: DemoConfig) -> World:
    """The splits `cfg` asks for, written into its cache unless they are there already."""
    fields = ("seed", "train_images", "dev_images", "test_images", "ood_images", "easyvqa_train", "calibration_images")
    root = Path(cfg.cache) / f"data-{cfg.recipe_key(*fields)}"
    sizes = dict(zip(SPLITS, (cfg.train_images, cfg.dev_images, cfg.test_images, cfg.ood_images)))
    sizes["calibration"] = cfg.calibration_images
    if not (root / "done").is_file():
        shutil.rmtree(root, ignore_errors=True)
        for split, n in sizes.items():
            shapes.write_split(root / "shapes", split, n, seed=cfg.seed)
        for split, limit in (("train", cfg.easyvqa_train), ("test", cfg.vqa_test_questions)):
            files = easyvqa.write_split(root / "easyvqa", split, limit)
            (root / "easyvqa" / f"image_root_{split}.txt").write_text(str(files.image_root))
        (root / "done").write_text("ok")
    sh, ev = root / "shapes", root / "easyvqa"
    vqa = {
        s: read_vqa(sh / f"questions_{s}.json", sh / f"annotations_{s}.json", sh, image_name=shapes.IMAGE_NAME)
        for s in ("train", "test")
    }
    vqa["test"] = random.Random(cfg.seed).sample(vqa["test"], min(cfg.vqa_test_questions, len(vqa["test"])))
    return World(
        captions={s: read_coco_captions(sh / f"captions_{s}.json", sh) for s in sizes},
        vqa=vqa,
        easyvqa={
            s: read_vqa(
                ev / f"easyvqa_questions_{s}.json",
                ev / f"easyvqa_annotations_{s}.json",
                (ev / f"image_root_{s}.txt").read_text(),
                image_name=easyvqa.IMAGE_NAME,
            )
            for s in ("train", "test")
        },
    )
