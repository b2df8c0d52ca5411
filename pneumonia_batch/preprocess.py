"""From a decoded grey image to the model's input, identical for training data,
evaluation and screening.

The Kermany training images were made with ``Image.open(p).convert("RGB").resize((224, 224))``:
Pillow's antialiased bicubic resize, aspect ratio squashed.  Screening inputs
go through the same resize so the model sees the distribution it learnt.
"""

from __future__ import annotations

import warnings

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


def too_large(size: str) -> ValueError:
    return ValueError(f"image too large: {size}; screening decodes at most {MAX_PIXELS:,} pixels")


def read_grey_image(path, kind: str, min_side: int | None = None) -> tuple[Image.Image, str]:
    """Decode a DICOM, PNG or JPEG file to an 8-bit grey image, and a note: multi-frame, and what
    the decoders warned of (a damaged EXIF block, padding after the pixel data), which would
    otherwise reach stderr, and cron's mail, every night.

    A blank image (every pixel one grey: a constant image, every value outside its window, a
    rescale slope of 0) is refused: scored, it would come out as a confident finding.
    """
    from . import dicom, images

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        if kind == "dicom":
            grey, note = dicom.decode_grey(path, min_side)
            image = grey_to_image(grey)
        else:
            image, note = images.read_grey(path, min_side), ""
    low, high = image.getextrema()
    if low == high:
        raise ValueError(f"blank image: every pixel shows grey level {low} of 255, nothing to screen")
    notes = [note] + [f"decode: {w.message}" for w in warned]
    return image, "; ".join(dict.fromkeys(n for n in notes if n))


def model_input_from_file(path: str, kind: str, size: int = INPUT_SIZE,
                          reduced: bool = True) -> tuple[np.ndarray, str]:
    """Decode one file and return (model input, note).  Runs in decode workers."""
    image, note = read_grey_image(path, kind, DECODE_MIN_SIDE if reduced else None)
    return to_model_input(image, size), note
