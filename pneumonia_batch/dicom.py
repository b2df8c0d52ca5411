"""DICOM: header-only eligibility and the grey pixel pipeline of PS3.3/PS3.4.

Pixel order, as the standard defines it: stored values -> Modality LUT
(rescale or LUT sequence, C.11.1) -> VOI LUT (window or LUT sequence,
C.11.2) -> presentation (MONOCHROME1 inverted *after* VOI, C.7.6.3.1.2).
The result is scaled to 8 bits from the range that step actually produces,
never from the dtype's maximum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .preprocess import check_size, luminance, own_range

# The radiograph SOP classes (PS3.4 B.5), whose class says what their Modality would.
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
RADIOGRAPH_SOP_CLASSES = {CR_IMAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
CHEST_MODALITIES = {"CR", "DX"}
# BodyPartExamined is free text in practice; these are the chest spellings seen in archives.
CHEST_BODY_PARTS = {"CHEST", "THORAX", "TORAX", "THORAX_CHEST", "LUNG", "LUNGS", "PORT CHEST",
                    "CHEST_PA", "CHEST_AP", "CHEST PA", "CHEST AP", "TORACE", "BRUSTKORB", "POITRINE", "PECHO"}
FRONTAL_VIEWS = {"PA", "AP"}
# Transfer syntaxes that may be lossy: JPEG baseline/extended, JPEG-LS near-lossless,
# JPEG 2000 and HTJ2K (either mode).
LOSSY_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.81",
                  "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203"}


@dataclass(frozen=True)
class DicomHeader:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    modality: str
    body_part: str
    view_position: str
    patient_id: str
    accession_number: str
    study_date: str
    transfer_syntax_uid: str
    number_of_frames: int

    lossy_compression: bool = False

    @property
    def lossy(self) -> bool:
        """Whether this copy may have lost information (C.7.6.1.1.5, or a lossy syntax)."""
        return self.lossy_compression or self.transfer_syntax_uid in LOSSY_SYNTAXES


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value).strip() if value is not None else ""


def read_dataset(path: Path, stop_before_pixels: bool, defer_size: int | None = None):
    """Read a DICOM file, with or without preamble / file meta.

    Files written without a file meta header have no transfer syntax; pydicom
    reads them by guessing the encoding, and decoding their pixels needs that
    guess recorded as the transfer syntax.  ``defer_size``: values longer than
    this are left on disk until used.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, defer_size=defer_size)
    except InvalidDicomError:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True, defer_size=defer_size)
    if not ds.file_meta.get("TransferSyntaxUID"):  # absent, or sent empty
        if ds.original_encoding[0] is None:  # nothing was parsed
            raise InvalidDicomError("no DICOM elements found")
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


HEADER_VALUE_LIMIT = 1 << 16  # bytes; identifying elements are far shorter
HEADER_TAGS = {keyword: pydicom.datadict.tag_for_keyword(keyword) for keyword in (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "Modality", "BodyPartExamined", "ViewPosition",
    "PatientID", "AccessionNumber", "StudyDate", "NumberOfFrames", "LossyImageCompression")}


def read_header(path: Path) -> DicomHeader:
    """The identifying and eligibility tags, without touching pixel data."""
    # Any file that is not PNG or JPEG is tried as DICOM without preamble; in a
    # video or an archive, a "length" of gigabytes would otherwise be read into memory.
    ds = read_dataset(path, stop_before_pixels=True, defer_size=HEADER_VALUE_LIMIT)
    # a DICOMDIR has none of an image's elements: its file meta names its class
    if not any(k in ds for k in ("SOPClassUID", "StudyInstanceUID", "Modality", "PatientID")) and \
            _text(ds.file_meta, "MediaStorageSOPClassUID") != MEDIA_STORAGE_DIRECTORY:
        raise InvalidDicomError("no DICOM identifying elements")
    for keyword, tag in HEADER_TAGS.items():  # a deferred value would be read when used: refuse it first
        element = ds.get_item(tag, keep_deferred=True) if tag in ds else None
        if element is not None and (getattr(element, "length", 0) or 0) > HEADER_VALUE_LIMIT:
            raise InvalidDicomError(f"{keyword} claims {element.length} bytes: not a DICOM header")
    frames = ds.get("NumberOfFrames", 1)
    try:
        frames = int(frames or 1)
    except (TypeError, ValueError):
        frames = 1
    sop_class = _text(ds, "SOPClassUID") or _text(ds.file_meta, "MediaStorageSOPClassUID")
    return DicomHeader(
        sop_class_uid=sop_class,
        sop_instance_uid=_text(ds, "SOPInstanceUID") or _text(ds.file_meta, "MediaStorageSOPInstanceUID"),
        study_instance_uid=_text(ds, "StudyInstanceUID"),
        modality=_text(ds, "Modality").upper(),
        body_part=_text(ds, "BodyPartExamined").upper(),
        view_position=_text(ds, "ViewPosition").upper(),
        patient_id=_text(ds, "PatientID"),
        accession_number=_text(ds, "AccessionNumber"),
        study_date=_text(ds, "StudyDate"),
        transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "")),
        number_of_frames=frames,
        lossy_compression=_text(ds, "LossyImageCompression") == "01",
    )


def is_image_sop_class(uid: str) -> bool:
    """An image storage SOP class, as the standard names them (PS3.6 Annex A): not a report,
    presentation state, segmentation, dose grid, waveform or document."""
    # the dictionary itself: making a UID of a malformed value would print pydicom's warning
    return "Image Storage" in pydicom.uid.UID_dictionary.get(uid, ("",))[0]


def skip_reason(header: DicomHeader) -> str | None:
    """Why a DICOM instance is not a frontal chest radiograph, or None if it may be one.

    A missing BodyPartExamined or ViewPosition is common in archives and is not a
    reason to skip; a value that contradicts a frontal chest view is.
    """
    if header.sop_class_uid == MEDIA_STORAGE_DIRECTORY:
        return "dicomdir"
    if not is_image_sop_class(header.sop_class_uid):
        return "not_an_image_sop_class"
    # A CR or DX SOP class says what the Modality would; any other image (a secondary capture, a
    # CT) needs it said: a CT, MR or ultrasound image is skipped for its Modality, like an OT one.
    implied = header.sop_class_uid in RADIOGRAPH_SOP_CLASSES
    if header.modality not in CHEST_MODALITIES and not (implied and not header.modality):
        return f"modality_{header.modality.lower() or 'missing'}"
    if header.body_part and header.body_part not in CHEST_BODY_PARTS:
        return "not_chest"
    if header.view_position and header.view_position not in FRONTAL_VIEWS:
        return "not_frontal_view"
    return None


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """VOI window to [0, 1] (PS3.3 C.11.2.1.2 and C.11.2.1.3)."""
    if width <= 0 and function in ("SIGMOID", "LINEAR_EXACT"):  # the standard requires width > 0
        raise ValueError(f"window width {width} <= 0 is invalid for {function}")
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width < 1:
        raise ValueError(f"window width {width} < 1 is invalid for LINEAR")
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _first_window(ds) -> tuple[float, float] | None:
    """The first (centre, width) pair; None when either is missing or empty, as archives send them."""
    pair = []
    for keyword in ("WindowCenter", "WindowWidth"):
        value = ds.get(keyword)
        if isinstance(value, pydicom.multival.MultiValue):
            value = value[0] if len(value) else None
        if value is None or str(value).strip() == "":
            return None
        pair.append(float(value))
    if not all(map(_finite, pair)):  # would give a blank image, scored as if it were one
        raise ValueError(f"window centre/width {pair[0]}/{pair[1]} is not a finite number")
    return pair[0], pair[1]


def _finite(value) -> bool:
    """Whether a header value reads as one finite number (not NaN, an infinity, text or several)."""
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _padding(ds, frame: np.ndarray) -> np.ndarray:
    """Mask of the stored values marked as padding by Pixel Padding Value (and Range Limit)."""
    value, limit = ds.get("PixelPaddingValue"), ds.get("PixelPaddingRangeLimit")
    if not isinstance(value, int):  # absent, or bytes when its VR (US or SS) was never resolved
        return np.zeros(frame.shape, bool)
    low, high = sorted((value, limit if isinstance(limit, int) else value))
    return (frame >= low) & (frame <= high)


def to_grey(ds, frame: np.ndarray) -> np.ndarray:
    """Stored values of one frame -> presentation values in [0, 1], float32."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":  # white is the palette's brightest entry, not the image's
        if missing := [f"{c} Palette Color Lookup Table" for c in ("Red", "Green", "Blue")
                       if f"{c}PaletteColorLookupTableDescriptor" not in ds]:
            raise ValueError(f"PALETTE COLOR image without its palette (no {', '.join(missing)})")
        entries, first, _ = (int(v) for v in ds.RedPaletteColorLookupTableDescriptor)
        palette = pydicom.pixels.apply_color_lut(np.arange(first, first + (entries or 1 << 16)), ds)
        rgb = pydicom.pixels.apply_color_lut(frame, ds).astype(np.float32)
        return luminance(rgb) / float(palette.max() or 1)
    if frame.ndim == 3:  # RGB / YBR: pydicom has already converted YBR to RGB
        return luminance(frame.astype(np.float32)) / float(2 ** int(ds.BitsStored) - 1)

    for keyword in ("RescaleSlope", "RescaleIntercept"):  # sent empty: no rescale (this copy only)
        if keyword in ds and ds[keyword].value in (None, ""):
            del ds[keyword]
    rescaled = "ModalityLUTSequence" not in ds and "RescaleSlope" in ds and "RescaleIntercept" in ds
    for keyword in ("RescaleSlope", "RescaleIntercept") if rescaled else ():  # as pydicom applies them: both or none
        if not _finite(ds[keyword].value):
            raise ValueError(f"{keyword} {ds[keyword].value!r} is not a finite number")
    values = pydicom.pixels.apply_modality_lut(frame, ds).astype(np.float32, copy=False)
    if ds.get("VOILUTSequence"):  # present and not empty
        item = ds.VOILUTSequence[0]
        entries, first, bits = (int(v) for v in item.LUTDescriptor)
        if bits == 8:  # pydicom 3.0 looks an 8-bit LUT up with uint8 indices, wrapping any over 255
            item.LUTDescriptor = [entries, first, 16]  # (this copy only); its entries read the same
        # A LUT is indexed by integers: round the modality output rather than let floats truncate.
        # Values past either end take that end's entry; clipping here, not in pydicom, because
        # pydicom's uint16 indices wrap values more than 65535 above the first one mapped.
        indices = np.clip(np.rint(values), first, first + (entries or 1 << 16) - 1).astype(np.int64)
        voi = pydicom.pixels.apply_voi(indices, ds, index=0).astype(np.float32, copy=False)
        grey = voi / float(2 ** bits - 1)
    elif window := _first_window(ds):
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper() or "LINEAR"
        grey = _window(values, *window, function)
    else:  # padding (the area outside the collimator, say) would stretch the range (C.7.5.1.1.2)
        grey = own_range(values, counted=~_padding(ds, frame))
    inverse = str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE"
    if photometric == "MONOCHROME1" or inverse:
        grey = 1.0 - grey
    return np.clip(grey, 0.0, 1.0).astype(np.float32, copy=False)


def check_pixel_data(ds) -> None:
    """Refuse, before decoding, pixel data that is missing, described by values no decoder can use,
    too large to decode safely, or (uncompressed) shorter than its header promises."""
    uid = ds.file_meta.TransferSyntaxUID
    if not ds.get("PixelData"):  # absent, or sent empty
        floats = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        raise ValueError(f"no pixel data (only {floats[0]}, which is not a radiograph's)" if floats
                         else "no pixel data")
    frames = ds.get("NumberOfFrames")  # pydicom reads "+1" and "1.0" as 1, leaves "abc" as text
    if frames not in (None, "") and not (isinstance(frames, int) and frames >= 0):
        raise ValueError(f"NumberOfFrames {str(frames)!r} is not a number of frames")
    check_size(int(ds.get("Columns") or 0), int(ds.get("Rows") or 0))
    if not uid.is_compressed:
        expected = pydicom.pixels.utils.get_expected_length(ds)
        actual = len(ds.PixelData)
        if actual < expected:
            raise ValueError(f"pixel data truncated: {actual} of {expected} bytes")


JPEG2000_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}


def _reduced_frame(ds, min_side: int) -> np.ndarray | None:
    """Stored values of a JPEG 2000 image at half size, when that keeps ``min_side``.

    A JPEG 2000 image's half resolution is its wavelet low-pass band, which the
    decoder reads without decoding the finest bands: about four times faster
    than a full decode.  One level only: some encoders' streams lack deeper
    levels, and Pillow rounds deeper reduced sizes differently from the codec.
    Other syntaxes, and anything unusual (colour, palette, signed, multi-frame),
    return None and are decoded in full.  So does an image without a window or
    VOI LUT: it is scaled by its own min..max, and the low-pass band has
    different extremes (a single hot pixel averaged away, overshoot at the
    collimator edge), so its contrast would differ from the full decode's.
    """
    syntax = str(ds.file_meta.TransferSyntaxUID)
    if syntax not in JPEG2000_SYNTAXES or min(int(ds.Rows), int(ds.Columns)) // 2 < min_side:
        return None
    if str(ds.get("PhotometricInterpretation", "")).upper() not in ("MONOCHROME1", "MONOCHROME2"):
        return None
    if not (ds.get("VOILUTSequence") or _first_window(ds)):
        return None
    if (int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("PixelRepresentation", 0)) != 0
            or int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.BitsStored) > 16):
        return None
    import io

    from PIL import Image
    from pydicom.encaps import generate_frames

    codestream = next(generate_frames(ds.PixelData, number_of_frames=1))
    precision = _codestream_precision(codestream)
    if precision is None:
        return None
    with Image.open(io.BytesIO(codestream)) as image:
        image.reduce = 1
        image.load()
        values = np.asarray(image)
    if image.mode == "I;16":  # Pillow stretches the codestream's N-bit samples to 16 bits
        values = values >> (16 - precision)
    return values


def _codestream_precision(codestream: bytes) -> int | None:
    """Bits per sample of an unsigned JPEG 2000 codestream's first component (ISO 15444-1 A.5.1).

    This, not BitsStored, is what the decoder scales by, and the two differ in
    real files (a 12-bit image in a 16-bit codestream).  None for anything else
    (a JP2 file instead of a codestream, signed samples).
    """
    if codestream[:4] != b"\xff\x4f\xff\x51" or len(codestream) < 43:
        return None
    ssiz = codestream[42]  # SOC, SIZ marker, Lsiz, Rsiz, 8 x 4-byte sizes, Csiz, then Ssiz
    precision = (ssiz & 0x7F) + 1
    return None if ssiz & 0x80 or precision > 16 else precision


def decode_grey(path: Path, min_side: int | None = None) -> tuple[np.ndarray, str]:
    """Decode the (first) frame of a DICOM image to presentation grey in [0, 1].

    With ``min_side``, large images may be decoded at reduced resolution, as
    long as both sides stay at least ``min_side`` pixels.  Returns the image and
    a note (non-empty when only the first of several frames was used).
    """
    ds = read_dataset(path, stop_before_pixels=False)
    check_pixel_data(ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    frame = None
    if min_side:
        try:
            frame = _reduced_frame(ds, min_side)
        except Exception:  # Pillow is stricter than the codec (an overwritten end marker): decode in full
            pass
    if frame is None:
        frame = pydicom.pixels.pixel_array(ds, index=0) if frames > 1 else ds.pixel_array
    note = f"first of {frames} frames" if frames > 1 else ""
    return to_grey(ds, frame), note
