"""Image files in, with errors that name the file."""

from __future__ import annotations

import io
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
    return decode_image(path, str(path))


def decode_image(source: str | os.PathLike | bytes, name: str) -> Image.Image:
    """An image file's path or bytes as RGB; bytes that are no image, or an image so large that decoding it is a
    decompression bomb (over PIL's `Image.MAX_IMAGE_PIXELS`), are an `ImageError` naming `name`."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            if Image.MAX_IMAGE_PIXELS and image.width * image.height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(
                    f"{image.width} x {image.height} pixels, over the limit of {Image.MAX_IMAGE_PIXELS}"
                )
            return image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise ImageError(f"image {name} is too large to decode safely: {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"cannot read image {name}: {err}") from err
