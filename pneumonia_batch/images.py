"""PNG and JPEG files: recognition by signature and decoding to an 8-bit grey image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .preprocess import grey_to_image, own_range

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"


def image_kind(head: bytes) -> str | None:
    """'png' or 'jpeg' from the first bytes of a file, else None."""
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head.startswith(JPEG_SIGNATURE):
        return "jpeg"
    return None


def read_grey(path: Path, min_side: int | None = None) -> Image.Image:
    """Decode a PNG or JPEG to mode 'L' (colour exports are reduced to grey).

    With ``min_side``, a large JPEG is decoded at a reduced DCT scale
    (``draft``), keeping both sides at least ``min_side`` pixels.
    """
    with Image.open(path) as image:
        if min_side and image.format == "JPEG":
            image.draft("L", (min_side, min_side))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # upright as viewers show it (phone and web exports)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            # Pillow's convert("L") would clip every value above 255 to white; like DICOM
            # without a VOI, these are scaled from their own range.
            return grey_to_image(own_range(np.asarray(image, np.float32)))
        return image.convert("L") if image.mode != "L" else image.copy()
