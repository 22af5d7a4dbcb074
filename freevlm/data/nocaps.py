"""NoCaps (val/test): COCO-format captions whose images carry an in/near/out-of-domain label.

The paper reports NoCaps per domain; evaluation groups by `CaptionRecord.domain` for that.
"""

from __future__ import annotations

import os

from .coco import read_coco_captions
from .records import CaptionRecord, DatasetError

NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")


def read_nocaps(
    path: str | os.PathLike, image_root: str | os.PathLike, domain: str | None = None, check_images: bool = True
) -> list[CaptionRecord]:
    """All images (each with its domain), or only those of `domain`."""
    if domain is not None and domain not in NOCAPS_DOMAINS:
        raise DatasetError(f"unknown NoCaps domain {domain!r}: one of {NOCAPS_DOMAINS}")
    records = read_coco_captions(path, image_root, check_images=check_images, domain=domain)
    for record in records:
        if record.domain not in NOCAPS_DOMAINS:
            raise DatasetError(
                f"{path}: image (id {record.image_id}) has domain {record.domain!r}, expected one of {NOCAPS_DOMAINS}"
            )
    return records
