"""Build DICOM test files from a real chest radiograph, one property at a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (JPEGBaseline8Bit, ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID,
                         generate_uid)

from pneumonia_batch.dicom import DX_FOR_PRESENTATION, SECONDARY_CAPTURE

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "studies"
REAL_DX = EXAMPLES / "dicom" / "nih-dx-chest-nofinding.dcm"


def chest_pixels(size: int = 320, bits: int = 12) -> np.ndarray:
    """A real chest radiograph (NIH DX example), as unsigned ``bits``-bit stored values."""
    grey = pydicom.dcmread(REAL_DX).pixel_array
    image = Image.fromarray(grey).resize((size, size), Image.Resampling.BICUBIC)
    scale = (2 ** bits - 1) / 255.0
    return np.round(np.asarray(image, np.float64) * scale).astype(np.uint16)


def make_dataset(pixels: np.ndarray, *, photometric: str = "MONOCHROME2", modality: str = "DX",
                 sop_class: str = DX_FOR_PRESENTATION, bits_stored: int = 12, signed: bool = False,
                 study_uid: str | None = None, sop_uid: str | None = None, body_part: str = "CHEST",
                 view: str = "PA", patient_id: str = "P001", accession: str = "A001",
                 **elements) -> Dataset:
    """A file-format dataset around ``pixels`` (rows, cols), (frames, rows, cols) or RGB."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.AccessionNumber = accession
    ds.StudyDate = "20260101"
    if body_part:
        ds.BodyPartExamined = body_part
    if view:
        ds.ViewPosition = view
    rgb = photometric in ("RGB", "YBR_FULL")
    ds.SamplesPerPixel = 3 if rgb else 1
    if rgb:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    frames = pixels.shape[0] if pixels.ndim == 3 and not rgb else 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    allocated = 8 if bits_stored <= 8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    dtype = {(8, False): np.uint8, (16, False): np.uint16, (8, True): np.int8, (16, True): np.int16}
    ds.PixelData = pixels.astype(dtype[allocated, signed]).tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def save(ds: Dataset, path: Path, syntax: str | None = None, **options) -> Path:
    """Write ``ds`` (compressed to ``syntax`` if given) as a DICOM file."""
    if syntax:
        ds.compress(syntax, **options)
    ds.save_as(path, enforce_file_format=True)
    return path


def save_without_meta(ds: Dataset, path: Path) -> Path:
    """No preamble, no file meta header: a bare implicit VR little endian dataset."""
    bare = Dataset()
    bare.update({elem.tag: elem for elem in ds})
    bare.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return path


def save_jpeg_baseline(ds: Dataset, path: Path, quality: int = 95) -> Path:
    """8-bit grey pixels as JPEG baseline (process 1), encoded with Pillow."""
    from io import BytesIO

    frame = np.frombuffer(ds.PixelData, np.uint8).reshape(ds.Rows, ds.Columns)
    buffer = BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(path, enforce_file_format=True)
    return path


__all__ = ["chest_pixels", "make_dataset", "save", "save_without_meta", "save_jpeg_baseline",
           "SECONDARY_CAPTURE", "EXAMPLES"]
