"""Labelled chest X-ray folders (Kaggle/Kermany layout) and the patient-level split.

Layout: ``DIR/{NORMAL,PNEUMONIA}/*`` or ``DIR/{train,val,test}/{NORMAL,PNEUMONIA}/*``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from .model import CLASS_NAMES

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}

# Kermany file names carry the patient: personN_bacteria_M / personN_virus_M for
# pneumonia, IM-NNNN-... and NORMAL2-IM-NNNN-... for normal.
_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_"),
    re.compile(r"^((?:NORMAL2-)?IM-\d+)-"),
)


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: int  # index into CLASS_NAMES


def patient_of(path: Path) -> str:
    """The patient token of a Kermany file name; the file stem if there is none."""
    name = Path(path).name
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1)
    return Path(path).stem


def list_labelled(directory: Path) -> list[LabelledImage]:
    """Images under ``directory/{NORMAL,PNEUMONIA}``, sorted for reproducibility."""
    directory = Path(directory)
    items = []
    for label, name in enumerate(CLASS_NAMES):
        class_dir = directory / name
        if not class_dir.is_dir():
            continue
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                items.append(LabelledImage(path, label))
    if not items:
        raise FileNotFoundError(f"no images under {directory}/{{{','.join(CLASS_NAMES)}}}")
    return items


def resolve_split(data_dir: Path, split: str) -> Path:
    """``DATA_DIR/split`` when the folder has splits, else DATA_DIR itself."""
    data_dir = Path(data_dir)
    candidate = data_dir / split
    return candidate if candidate.is_dir() else data_dir


def split_by_patient(items: list[LabelledImage], val_fraction: float,
                     seed: int) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """Hold out ``val_fraction`` of each class's patients, never splitting a patient."""
    if not 0 < val_fraction < 1:
        raise ValueError("val_fraction must be between 0 and 1")
    rng = random.Random(seed)
    val_patients: set[tuple[int, str]] = set()
    for label in range(len(CLASS_NAMES)):
        patients = sorted({patient_of(i.path) for i in items if i.label == label})
        rng.shuffle(patients)
        n_val = max(1, round(len(patients) * val_fraction))
        val_patients.update((label, p) for p in patients[:n_val])
    train = [i for i in items if (i.label, patient_of(i.path)) not in val_patients]
    val = [i for i in items if (i.label, patient_of(i.path)) in val_patients]
    return train, val
