"""Labelled chest X-ray folders (Kaggle/Kermany layout) and the patient-level split.

Layout: ``DIR/{NORMAL,PNEUMONIA}/...`` or ``DIR/{train,val,test}/{NORMAL,PNEUMONIA}/...``,
files at any depth.  Files are identified and filtered as screening does them,
so an evaluation measures what screening would do with the same files.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from . import discover
from .model import CLASS_NAMES
from .pipeline import decode_for_model

# Training reads PNG and JPEG files only, the kinds of the Kermany data.  Widening this would
# change the validation split that calibrate rebuilds for a model trained on a folder that
# also holds DICOM files.
TRAINING_KINDS = ("png", "jpeg")

VALIDATION_SPLIT = "the patient-held-out validation split of the training data"

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
    kind: str  # png, jpeg or dicom: how the file is decoded


@dataclass(frozen=True)
class UnusedFile:
    """A file under a class folder that was not used, and why (a screening reason code)."""

    path: Path
    reason: str


def patient_of(path: Path) -> str:
    """The patient token of a Kermany file name; the file stem if there is none."""
    name = Path(path).name
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(name)
        if match:
            return match.group(1)
    return Path(path).stem


def list_labelled(directory: Path, kinds: tuple[str, ...] = ("png", "jpeg", "dicom"),
                  ) -> tuple[list[LabelledImage], list[UnusedFile]]:
    """Images under ``directory/{NORMAL,PNEUMONIA}`` at any depth, sorted, and the files not used.

    A file is used when screening would score it (an eligible DICOM instance,
    scored once however many copies arrive; a PNG or a JPEG) and its kind is one
    of ``kinds`` (``TRAINING_KINDS`` for training data); every other file is
    returned with its reason.  Symlinks may lead anywhere: data sets are often
    assembled from links.
    """
    directory = Path(directory)
    found: list[tuple[int, discover.InputFile]] = []
    folders = class_folders(directory)
    for label, folder in folders:
        for item in discover.walk(folder, confined=False):
            item.rel = f"{folder.name}/{item.rel}"  # duplicates are named across both classes
            discover.identify(item)
            found.append((label, item))
    _one_file_once(found)
    discover.group_studies([item for _, item in found])  # marks second copies of an instance
    _one_instance_one_label(found)
    items: list[LabelledImage] = []
    # A folder or file beside the class folders (a "Pneumonia_viral" folder, a stray image) is not
    # read; listed, so that a class spelt otherwise is not dropped unseen.
    unused = [UnusedFile(child, "outside_class_folders") for child in _children(directory)
              if child not in {folder for _, folder in folders} and child.name not in discover.IGNORED_NAMES]
    for label, item in found:
        if item.status != "pending":
            unused.append(UnusedFile(item.path, item.why_not_scored))
        elif item.kind not in kinds:
            unused.append(UnusedFile(item.path, f"{item.kind}_not_used_for_training"))
        else:
            items.append(LabelledImage(item.path, label, item.kind))
    if not items:
        raise FileNotFoundError(f"no usable images under {directory}/{{{','.join(CLASS_NAMES)}}}")
    return items, unused


def _children(directory: Path) -> list[Path]:
    try:
        return sorted(Path(directory).iterdir())
    except OSError:
        return []


def _one_file_once(found: list[tuple[int, discover.InputFile]]) -> None:
    """One file reached by several names (links, as data sets are often assembled) is used once: a
    second name is a duplicate, and a file filed under both classes has no label to trust."""
    names: dict[tuple[int, int], list[tuple[int, discover.InputFile]]] = {}
    for label, item in found:
        if item.status == "pending":
            try:
                stat = os.stat(item.path)  # through links
            except OSError:  # gone since the walk: decoding reports it
                continue
            names.setdefault((stat.st_dev, stat.st_ino), []).append((label, item))
    for same_file in names.values():
        (first_label, first), *others = same_file
        if {label for label, _ in same_file} != {first_label}:
            _not_used_for_conflict("file", [item for _, item in same_file])
            continue
        for _, item in others:
            item.finish("skipped", f"duplicate_of {first.rel}")


def _one_instance_one_label(found: list[tuple[int, discover.InputFile]]) -> None:
    """A DICOM instance sent into both class folders has no label to trust: no copy is used."""
    by_name = {item.rel: (label, item) for label, item in found}
    for label, item in found:
        kept_label, kept = by_name.get(discover.duplicate_of(item), (label, None))
        if kept_label != label:
            _not_used_for_conflict("DICOM instance", [kept, item])


def _not_used_for_conflict(what: str, copies: list[discover.InputFile]) -> None:
    reason = f"label_conflict: the same {what} is filed under both classes ({'; '.join(c.rel for c in copies)})"
    for copy in copies:
        copy.finish("skipped", reason)


def list_training(directory: Path) -> tuple[list[LabelledImage], list[UnusedFile]]:
    """``list_labelled`` for training: the images of ``TRAINING_KINDS`` that decode as screening
    decodes them, and the other files with why.  A file that does not decode would otherwise
    stop training inside an epoch; it is found here, before any training, and the patient
    split is made of the images that decode."""
    listed, unused = list_labelled(directory, TRAINING_KINDS)
    items = []
    for item in listed:
        _, _, why_not = decode_for_model(str(item.path), item.kind)
        if why_not:
            unused.append(UnusedFile(item.path, discover.readable(why_not)))
        else:
            items.append(item)
    return items, unused


def class_folders(directory: Path) -> list[tuple[int, Path]]:
    """The class folders directly under ``directory`` with their labels, whatever their case
    (``normal/``, ``Pneumonia/``): a folder missed for its spelling would drop a class unseen."""
    labels = {name: label for label, name in enumerate(CLASS_NAMES)}
    return [(labels[child.name.upper()], child) for child in _children(directory)
            if child.name.upper() in labels and child.is_dir()]


def class_folder_holding(path: Path, data_dir: Path) -> Path | None:
    """The class folder of ``data_dir``, or of one of its split folders, that holds ``path`` (which
    need not exist yet), compared as the file system sees folders: through links, and in another
    letter case on a share that ignores it.  A class folder that does not exist yet counts too, in
    any case (``normal/``): the output would make it one."""
    for start in {Path(os.path.abspath(path)), Path(os.path.realpath(path))}:
        for root in {Path(os.path.abspath(data_dir)), Path(os.path.realpath(data_dir))}:
            if start.is_relative_to(root):
                parts = start.relative_to(root).parts[:2]  # DATA_DIR/CLASS or DATA_DIR/split/CLASS
                for depth, part in enumerate(parts):
                    if part.upper() in CLASS_NAMES:
                        return root.joinpath(*parts[:depth + 1])
    try:
        splits = [child for child in Path(data_dir).iterdir() if child.is_dir()]
    except OSError:  # an unreadable DATA_DIR is reported by the command that reads it
        splits = []
    folders = [folder for directory in (data_dir, *splits) for _, folder in class_folders(directory)]
    for start in {Path(os.path.abspath(path)), Path(os.path.realpath(path))}:  # as named, and its target
        for ancestor in (start, *start.parents):
            if ancestor.exists():
                for folder in folders:
                    if os.path.samefile(ancestor, folder):
                        return folder
    return None


def resolve_split(data_dir: Path, split: str) -> Path:
    """``DATA_DIR/split`` when the folder has splits, else DATA_DIR itself."""
    data_dir = Path(data_dir)
    if (data_dir / split).is_dir():
        return data_dir / split
    if class_folders(data_dir):
        return data_dir
    others = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    raise FileNotFoundError(f"{data_dir} holds neither a {split} split nor {'/'.join(CLASS_NAMES)} folders"
                            + (f" (its folders: {', '.join(others)})" if others else ""))


def rebuild_validation_split(data_dir: Path, training: dict) -> list[LabelledImage]:
    """The validation split a model was trained with, rebuilt from its training record.

    Refuses data that does not split into the recorded sizes: a threshold chosen
    on other images must not be recorded as chosen on the validation split.
    """
    items, _ = list_training(resolve_split(data_dir, "train"))
    return recorded_split(items, training, str(data_dir))[1]


def training_patients(training: dict | None) -> set[str] | None:
    """The patient tokens a model was trained on, from its metadata's training record: its own
    list and those of the models it was fine-tuned from (``started_from``), as far as they have
    one; None when none does (models from before the list)."""
    tokens = None
    while training:
        if training.get("training_patients") is not None:
            tokens = (tokens or set()) | set(training["training_patients"])
        training = (training.get("started_from") or {}).get("training")
    return tokens


def recorded_split(items: list[LabelledImage], training: dict,
                   where: str) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """``items`` split as a model's training record says, refused (ValueError) unless they split
    into its recorded sizes, that is unless they are its data; ``where`` names them."""
    try:
        fraction, seed = training["validation_fraction"], training["seed"]
        recorded = training["n_train"], training["n_validation"]
    except KeyError as missing:
        raise ValueError(f"the model's training record lacks {missing}: the validation split cannot be "
                         "rebuilt; use --local with labelled images of your own") from None
    if training.get("limit_per_class"):
        raise ValueError(f"the model was trained with --limit {training['limit_per_class']} (a smoke run): its "
                         "validation split cannot be rebuilt; use --local with labelled images")
    train, val = split_by_patient(items, fraction, seed)
    if (len(train), len(val)) != tuple(recorded):
        raise ValueError(f"{where} splits into {len(train)} training and {len(val)} validation images, "
                         f"but the model was trained on {recorded[0]} and validated on {recorded[1]} "
                         f"(from {training.get('data', 'data not recorded')}): this is not its training "
                         "data. Use --local to choose the threshold on labelled images of your own")
    return train, val


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
