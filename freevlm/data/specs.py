"""A dataset named by its format, its files and a split: what `freevlm eval` and `freevlm sweep` read."""

from __future__ import annotations

from dataclasses import dataclass, field

from .coco import read_coco_captions, read_karpathy
from .gqa import read_gqa
from .nocaps import read_nocaps
from .records import DatasetError
from .visdial import read_visdial
from .vizwiz import read_vizwiz
from .vqa import read_vqa

# format -> (task, what `files` holds)
FORMATS = {
    "coco-karpathy": ("captions", "dataset_coco.json"),
    "coco": ("captions", "captions_*.json"),
    "nocaps": ("captions", "nocaps_*.json"),
    "vqav2": ("vqa", "questions JSON [annotations JSON]"),
    "okvqa": ("vqa", "questions JSON [annotations JSON]"),
    "gqa": ("vqa", "balanced questions JSON"),
    "vizwiz": ("vqa", "annotations JSON"),
    "visdial": ("visdial", "dialogs JSON [dense annotations JSON]"),
}


@dataclass
class DatasetSpec:
    format: str
    files: list[str]
    images: str
    split: str | None = None  # Karpathy split; NoCaps domain (None: all domains)
    limit: int | None = None  # keep the first `limit` records (quick runs)
    check_images: bool = True
    extra: dict = field(default_factory=dict)  # reader keywords (e.g. image_name for VQA with COCO 2017 files)

    @property
    def task(self) -> str:
        return FORMATS[self.format][0]

    @property
    def vqa_metric(self) -> str:
        """GQA is scored by exact match, the others with the ten-human VQA accuracy."""
        return "exact" if self.format == "gqa" else "vqa"


def read_dataset(spec: DatasetSpec) -> list:
    if spec.format not in FORMATS:
        raise DatasetError(f"unknown dataset format {spec.format!r}: one of {sorted(FORMATS)}")
    files, kw = list(spec.files), dict(spec.extra, check_images=spec.check_images)
    needed = (1, 2) if spec.format in ("vqav2", "okvqa", "visdial") else (1,)
    if len(files) not in needed:
        raise DatasetError(f"format {spec.format!r} takes {FORMATS[spec.format][1]}, got {len(files)} file(s)")
    if spec.format == "coco-karpathy":
        if spec.split is None:
            raise DatasetError("format 'coco-karpathy' needs a split (train, val, test, restval)")
        records = read_karpathy(files[0], spec.images, spec.split, **kw)
    elif spec.format == "coco":
        records = read_coco_captions(files[0], spec.images, **kw)
    elif spec.format == "nocaps":
        records = read_nocaps(files[0], spec.images, domain=spec.split, **kw)
    elif spec.format in ("vqav2", "okvqa"):
        records = read_vqa(files[0], files[1] if len(files) > 1 else None, spec.images, **kw)
    elif spec.format == "gqa":
        records = read_gqa(files[0], spec.images, **kw)
    elif spec.format == "vizwiz":
        records = read_vizwiz(files[0], spec.images, **kw)
    else:
        records = read_visdial(files[0], spec.images, dense=files[1] if len(files) > 1 else None, **kw)
    return records[: spec.limit] if spec.limit else records
