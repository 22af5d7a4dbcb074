"""Image files in, with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError


class ImageError(ValueError):
    """An image that is missing or cannot be decoded."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB; a missing or corrupt file is an `ImageError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise ImageError(f"image {path} is too large to decode safely: {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"cannot read image {path}: {err}") from err
