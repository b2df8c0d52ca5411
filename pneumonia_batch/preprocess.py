"""From a decoded grey image to the model's input, identical for training data,
evaluation and screening.

The Kermany training images were made with ``Image.open(p).convert("RGB").resize((224, 224))``:
Pillow's antialiased bicubic resize, aspect ratio squashed.  Screening inputs
go through the same resize so the model sees the distribution it learnt.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import numpy as np
from PIL import Image

from .model import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE

RESAMPLE = Image.Resampling.BICUBIC


def to_model_input(grey: Image.Image, size: int = INPUT_SIZE) -> np.ndarray:
    """An 8-bit grey image -> (size, size, 3) uint8 with three equal channels."""
    if grey.mode != "L":
        grey = grey.convert("L")
    if grey.size != (size, size):
        grey = grey.resize((size, size), RESAMPLE)
    plane = np.asarray(grey, dtype=np.uint8)
    return np.repeat(plane[:, :, None], 3, axis=2)


def scale_batch(batch: np.ndarray, input_scale: str) -> np.ndarray:
    """uint8 RGB batch -> float32 in the range the model expects."""
    x = batch.astype(np.float32)
    if input_scale == "raw":
        return x
    x /= 255.0
    if input_scale == "unit":
        return x
    if input_scale == "imagenet":
        return (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    raise ValueError(f"unknown input scale {input_scale!r}")


def own_range(values: np.ndarray, counted: np.ndarray | None = None) -> np.ndarray:
    """Values scaled to [0, 1] from their own min..max: for pixels that carry no display range.

    ``counted`` (a mask) limits the min..max to some pixels; the others may fall outside [0, 1].
    """
    sample = values[counted] if counted is not None and counted.any() else values
    low, high = float(sample.min()), float(sample.max())
    return ((values - low) / (high - low) if high > low else np.zeros_like(values)).astype(np.float32)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Grey from RGB as ITU-R BT.601 weighs it, the weights Pillow's convert("L") uses."""
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def grey_to_image(grey: np.ndarray) -> Image.Image:
    """Presentation grey in [0, 1] -> 8-bit image, as an 8-bit export would store it."""
    return Image.fromarray(np.round(grey * 255.0).astype(np.uint8), mode="L")


# Reduced-resolution decoding keeps at least this many pixels per side, so the
# final antialiased resize still does most of the filtering.  Measured on 56 real
# paediatric JPEGs: at 2x the input size probabilities moved by up to 0.013, at
# 3x by at most 0.006.
DECODE_MIN_SIDE = 3 * INPUT_SIZE


# The most pixels a file may have to be decoded, DICOM or not: Pillow's own decompression-bomb limit
# (about 9459 x 9459).  A chest radiograph has under 25 million; decoding one costs up to about 20
# bytes a pixel (44 for a 16-bit colour PNG), so a small file claiming more could take gigabytes.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
# Blank: fewer grey levels than this, or this share of the pixels at one level (a blank exposure
# with a burned-in marker, a frame all outside its window).  Measured on the 5,357 real images of
# ../shared/data: at least 113 levels, and at most 44 % of the pixels at one level (a collimated CR).
BLANK_LEVELS = 16
BLANK_SHARE = 0.95


class NothingToScreen(ValueError):
    """A file that decodes, or could, but holds nothing the model can screen: a skip with a reason
    code (``blank_image``, ``image_too_large``) and the detail as the image's note, not an error.
    It follows from the file's content alone, so a run with ``--state`` takes it again for an
    unchanged file rather than decoding it, and reporting its study, every night."""

    REASONS = ("blank_image", "image_too_large")

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def too_large(size: str) -> NothingToScreen:
    return NothingToScreen("image_too_large", f"{size}; screening decodes at most {MAX_PIXELS:,} pixels")


def check_size(width: int, height: int) -> None:
    """Refuse, before decoding, an image whose header states more than ``MAX_PIXELS``."""
    if width * height > MAX_PIXELS:
        raise too_large(f"{width} x {height} pixels")


def check_not_blank(image: Image.Image) -> None:
    """Refuse an 8-bit grey image with nothing to screen: scored, a blank one comes out as a confident
    finding (0.999 from the shipped model)."""
    counts = image.histogram()
    levels, most, total = sum(1 for n in counts if n), max(counts), sum(counts)
    if levels < BLANK_LEVELS or most >= BLANK_SHARE * total:
        share = math.floor(most / total * 1000) / 10  # 99.98 % is not all of them
        raise NothingToScreen("blank_image", f"{levels} grey level{'s' * (levels > 1)}, {share:.1f}% of the "
                                             f"pixels at level {counts.index(most)}")


@contextmanager
def warnings_noted(notes: list[str]):
    """What a decoder warns of inside (a damaged EXIF block, bytes after the pixel data) is added to
    ``notes`` as ``decode: ...`` instead of reaching stderr, and cron's mail.  Warning filters are
    process-wide: for code that decodes on one thread (decode processes, evaluate, the review
    export), never in training's tf.data threads."""
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused: image_too_large
        try:
            yield
        finally:
            notes.extend(dict.fromkeys(f"decode: {w.message}" for w in warned))


def read_grey_image(path, kind: str, min_side: int | None = None) -> tuple[Image.Image, str]:
    """Decode a DICOM, PNG or JPEG file to an 8-bit grey image, and a note (e.g. multi-frame);
    ``NothingToScreen`` for one too large to decode safely or blank."""
    from . import dicom, images

    if kind == "dicom":
        grey, note = dicom.decode_grey(path, min_side)
        image = grey_to_image(grey)
    else:
        image, note = images.read_grey(path, min_side), ""
    check_not_blank(image)
    return image, note


def model_input_from_file(path: str, kind: str, size: int = INPUT_SIZE,
                          reduced: bool = True) -> tuple[np.ndarray, str]:
    """Decode one file and return (model input, note).  Runs in decode workers."""
    image, note = read_grey_image(path, kind, DECODE_MIN_SIDE if reduced else None)
    return to_model_input(image, size), note
