"""PNG and JPEG files: recognition by signature and decoding to an 8-bit grey image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .preprocess import MAX_PIXELS, check_size, grey_to_image, luminance, own_range, too_large

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
    with _opened(path) as image:
        check_size(image.width, image.height)  # before any pixel is decoded
        if min_side and image.format == "JPEG":
            image.draft("L", (min_side, min_side))
        rawmode = image.tile[0].args if image.format == "PNG" and len(image.tile) == 1 else None
        image.load()
        if rawmode in PNG16_LOW_BYTES:
            image = _png16_grey(path, rawmode, image)
        ImageOps.exif_transpose(image, in_place=True)  # upright as viewers show it (phone and web exports)
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            # Pillow's convert("L") would clip every value above 255 to white; like DICOM
            # without a VOI, these are scaled from their own range.
            return grey_to_image(own_range(np.asarray(image, np.float32)))
        return image.convert("L") if image.mode != "L" else image.copy()


def _opened(path: Path) -> Image.Image:
    """``Image.open``, with Pillow's refusal of an image over twice ``MAX_PIXELS`` as screening's own."""
    try:
        return Image.open(path)
    except Image.DecompressionBombError as exc:
        raise too_large(f"more than {2 * MAX_PIXELS:,} pixels") from exc


# Pillow opens a 16-bit grey+alpha or colour PNG as 8 bits a sample, keeping each sample's high byte:
# 12-bit values would come out near black.  Decoding the same stream again with an unpacker of the
# same width gives the low bytes (grey+alpha: all four bytes of a pixel, as RGBA).
PNG16_LOW_BYTES = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L", "LA;16B": "RGBA"}


def _png16_grey(path: Path, rawmode: str, high: Image.Image) -> Image.Image:
    """The full 16-bit grey values (luminance for colour) of the PNG whose high bytes are ``high``,
    as a mode 'F' image carrying ``high``'s EXIF, for ``read_grey`` to scale from their own range."""
    with Image.open(path) as again:
        again.tile = [again.tile[0]._replace(args=PNG16_LOW_BYTES[rawmode])]
        again.load()
        low = np.asarray(again, np.float32)
    if rawmode == "LA;16B":  # bytes: grey high, grey low, alpha high, alpha low
        values = low[..., 0] * 256 + low[..., 1]
    else:
        values = luminance(np.asarray(high, np.float32)[..., :3] * 256 + low[..., :3])
    grey = Image.fromarray(values)
    grey.info.update(high.info)  # the EXIF orientation, if any
    return grey
