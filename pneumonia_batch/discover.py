"""Walk a studies folder, identify every file, decide eligibility, group studies.

Every regular file under the folder becomes exactly one ``InputFile`` with a
kind and, when it will not be scored, a status and reason.  Nothing is
dropped except operating-system litter (``.DS_Store``, ``Thumbs.db``...).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from . import dicom, images
from .preprocess import NothingToScreen

IGNORED_NAMES = {".DS_Store", "Thumbs.db", "desktop.ini", "._.DS_Store"}


def one_line(text: str) -> str:
    """An error as one line of a report, result.json, audit event or run summary (Keras's span many)."""
    return " ".join(text.split())


def readable(text: str) -> str:
    """``text`` with the undecodable bytes of a file name written as ``\\xNN``.

    Python keeps such bytes (a Latin-1 name on an SMB share) as lone surrogates,
    which no UTF-8 report, log or SQLite row can hold.
    """
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class InputFile:
    """One file found under the studies folder and what became of it."""

    rel: str  # POSIX path relative to the studies folder
    path: Path
    size: int = 0
    mtime: float = 0.0
    kind: str = "other"  # dicom, png, jpeg, other
    header: dicom.DicomHeader | None = None
    status: str = "pending"  # pending, scored, skipped, error, deferred
    reason: str = ""
    probability: float | None = None
    note: str = ""
    header_note: str = ""  # what pydicom repaired in the header, this run; the decode's note follows it

    @property
    def is_image(self) -> bool:
        return self.kind in ("dicom", "png", "jpeg")

    def finish(self, status: str, reason: str = "") -> None:
        self.status, self.reason = status, readable(reason)  # codec messages may quote the path
        if status != "scored":  # a restored copy skipped as a duplicate, or deferred, has no score
            self.probability = None

    @property
    def why_not_scored(self) -> str:
        """As reports show it: a skip's reason code, or ``error: ...`` / ``deferred: ...``."""
        return self.reason if self.status == "skipped" else f"{self.status}: {self.reason}"


def count_reasons(reasons: Iterable[str]) -> str:
    """``not_frontal_view (1); error: empty file (2)``, in order of first appearance."""
    counts: dict[str, int] = {}
    for reason in reasons:
        counts[reason] = counts.get(reason, 0) + 1
    return "; ".join(f"{reason} ({n})" for reason, n in counts.items())


@dataclass
class Study:
    key: str  # DICOM StudyInstanceUID, or the folder / file a PNG or JPEG study is
    study_id: str
    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""
    files: list[InputFile] = field(default_factory=list)

    @property
    def scored(self) -> list[InputFile]:
        return [f for f in self.files if f.status == "scored"]

    @property
    def probability(self) -> float | None:
        """The study's pneumonia probability: the highest of its scored images."""
        scores = [f.probability for f in self.scored]
        return max(scores) if scores else None

    @property
    def status(self) -> str:
        if any(f.status == "deferred" for f in self.files):
            return "deferred"
        if self.scored:
            return "scored"
        if any(f.status == "error" for f in self.files):
            return "error"
        return "skipped"

    @property
    def reason(self) -> str:
        """Why files of the study were not scored, e.g. ``not_frontal_view (1); error: ... (1)``."""
        return count_reasons(f.why_not_scored for f in self.files if f.status in ("skipped", "error", "deferred"))


# A receiver that writes under a temporary name and then renames (rsync, many DICOM nodes) can take a
# listed file away before it is read: not an error the user can act on, and its study is not yet
# complete; it is looked at again next run.
GONE = "gone since the folder was listed (moved or renamed meanwhile)"


def walk(root: Path, confined: bool = True) -> list[InputFile]:
    """Every file under ``root``, sorted; with ``confined``, symlinks are never followed out of it."""
    root = Path(root)
    real_root = root.resolve()
    found: list[InputFile] = []
    unreadable: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=unreadable.append):
        dirnames.sort()
        base = Path(dirpath)
        for name in dirnames:
            if (base / name).is_symlink():  # os.walk lists but does not enter these
                item = InputFile(rel=readable((base / name).relative_to(root).as_posix()), path=base / name)
                item.finish("skipped", "symlinked_folder_not_followed")
                found.append(item)
        for name in sorted(filenames):
            if name in IGNORED_NAMES:
                continue
            path = base / name
            item = InputFile(rel=readable(path.relative_to(root).as_posix()), path=path)
            found.append(item)
            if path.is_symlink():
                try:
                    target = path.resolve(strict=True)
                except (OSError, RuntimeError):
                    item.finish("error", "broken_or_looping_symlink")
                    continue
                if confined and not target.is_relative_to(real_root):
                    item.finish("skipped", "symlink_outside_folder")
                    continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                item.finish("deferred", GONE)
                continue
            except OSError as exc:
                item.finish("error", f"cannot stat: {exc.strerror}")
                continue
            item.size, item.mtime = stat.st_size, stat.st_mtime
    for error in unreadable:
        folder = Path(error.filename)
        item = InputFile(rel=readable(folder.relative_to(root).as_posix()), path=folder)
        item.finish("error", f"folder not readable: {error.strerror}")
        found.append(item)
    return found


def identify(item: InputFile, header_filter: bool = True) -> None:
    """Set kind, header and, for files that will not be scored, status and reason."""
    if item.status != "pending":
        return
    if item.size == 0:
        item.finish("error", "empty file")
        return
    try:
        with open(item.path, "rb") as handle:
            head = handle.read(132)
    except FileNotFoundError:
        item.finish("deferred", GONE)
        return
    except OSError as exc:
        item.finish("error", f"cannot read: {exc.strerror}")
        return
    kind = images.image_kind(head)
    if kind:
        item.kind = kind
        return
    try:
        # pydicom warns of what it repaired (a name in another character set, a value of the wrong
        # length): the file's note, not a line on stderr that cron would mail every night
        with warnings.catch_warnings(record=True) as repaired:
            warnings.simplefilter("always")
            item.header = dicom.read_header(item.path)
        item.header_note = item.note = "; ".join(dict.fromkeys(f"header: {w.message}" for w in repaired))
    except FileNotFoundError:
        item.finish("deferred", GONE)
        return
    except Exception as exc:  # a damaged header raises anything from struct.error to KeyError
        if head[128:132] == b"DICM":
            item.kind = "dicom"
            item.finish("error", f"unreadable DICOM header: {exc}")
        else:
            item.finish("skipped", "not_an_image")
        return
    item.kind = "dicom"
    reason = eligibility_skip(item.header, header_filter)
    if reason:
        item.finish("skipped", reason)


def image_kind_of(path: Path) -> str | None:
    """'png', 'jpeg' or 'dicom' when screening would take a regular file for one (``identify``:
    DICOM with or without preamble), else None.  Nothing else is read from: the read end of
    /dev/stdout's pipe, or a FIFO, would wait for ever."""
    if not os.path.isfile(path):
        return None
    item = InputFile(rel=str(path), path=Path(path), size=os.path.getsize(path))
    identify(item, header_filter=False)
    return item.kind if item.is_image else None


# A DICOM file without its 128-byte preamble starts with its first tag: group 0002 (file meta) or
# 0008, little- or big-endian.
DICOM_WITHOUT_PREAMBLE_STARTS = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")


def may_be_dicom_cut_short(item: InputFile) -> bool:
    """Whether a file without a StudyInstanceUID may be a DICOM instance still being copied in.

    An empty file, one shorter than the preamble and its DICM prefix, one whose DICM prefix is still
    zeros (a copy that sets the file's size first: Windows onto a share, rsync --preallocate), or a
    DICOM header cut before the UID may yet name any study.  A PNG or JPEG, or a file that began as
    something else (a receiver's log being appended to), never will.
    """
    if (item.header and item.header.study_instance_uid) or item.kind in ("png", "jpeg"):
        return False
    if item.kind == "dicom" or item.size < 132:
        return True
    try:
        with open(item.path, "rb") as handle:
            head = handle.read(132)
    except OSError:  # unreadable for now: as likely a file still being written
        return True
    return head[128:132] == bytes(4) or head[:2] in DICOM_WITHOUT_PREAMBLE_STARTS


def eligibility_skip(header: dicom.DicomHeader, header_filter: bool) -> str | None:
    """Why the instance is skipped; without the header filter, only what is never an image."""
    reason = dicom.skip_reason(header)
    return reason if reason and (header_filter or reason in ("dicomdir", "not_an_image_sop_class")) else None


DUPLICATE = "duplicate_instance_of "


def group_studies(files: list[InputFile]) -> list[Study]:
    """DICOM by StudyInstanceUID anywhere in the tree; other files by top-level folder.

    The same SOPInstanceUID received twice in one study (say a lossless and a
    lossy copy) is scored once: the lossless copy is kept, the other is skipped
    (and scored only if the kept copy fails to decode: ``spare_copies``).  An
    instance re-sent under a corrected StudyInstanceUID is another study's, and
    is scored for it.
    """
    studies: dict[str, Study] = {}
    kept_instances: dict[tuple[str, str], InputFile] = {}
    for item in files:
        header = item.header
        if header and header.study_instance_uid:
            key = f"dicom:{header.study_instance_uid}"
            study = studies.setdefault(key, Study(key, header.study_instance_uid))
            study.patient_id = study.patient_id or header.patient_id
            study.accession_number = study.accession_number or header.accession_number
            study.study_date = study.study_date or header.study_date
            if item.status in ("pending", "scored") and header.sop_instance_uid:  # scored: restored
                _keep_one_copy(item, kept_instances)
        else:
            top = item.rel.split("/", 1)[0]
            key = f"path:{top}"
            study = studies.setdefault(key, Study(key, top))
        study.files.append(item)
    return sorted(studies.values(), key=lambda s: s.study_id)


def _keep_one_copy(item: InputFile, kept: dict[tuple[str, str], InputFile]) -> None:
    uid = (item.header.study_instance_uid, item.header.sop_instance_uid)
    other = kept.setdefault(uid, item)
    if other is item:
        return
    if _preference(item) > _preference(other):
        kept[uid] = item
        item, other = other, item
    item.finish("skipped", DUPLICATE + other.rel)


def _preference(item: InputFile) -> tuple[bool, bool]:
    """Lossless before lossy; then a copy an earlier run scored before one not yet tried, which
    may be the damaged one."""
    return not item.header.lossy, item.status == "scored"


def duplicate_of(item: InputFile) -> str | None:
    """The file scored in place of this copy of a DICOM instance, or None."""
    if item.status == "skipped" and item.reason.startswith(DUPLICATE):
        return item.reason.removeprefix(DUPLICATE)
    return None


def spare_copies(files: list[InputFile]) -> list[InputFile]:
    """A kept copy that failed to decode (say, cut short in transfer), or decoded blank or too large,
    must not hide an intact copy of the same instance: the best of its duplicates is made pending to
    be scored instead, and the others now stand behind that one.  The failed copy keeps its row."""
    failed = {f.rel for f in files if f.status == "error" or f.reason in NothingToScreen.REASONS}
    candidates: dict[str, list[InputFile]] = {}
    for item in files:
        if (failed_copy := duplicate_of(item)) in failed:
            candidates.setdefault(failed_copy, []).append(item)
    spares = []
    for copies in candidates.values():
        spare = max(copies, key=_preference)  # the first of the best, in path order
        for other in copies:
            if other is not spare:
                other.finish("skipped", DUPLICATE + spare.rel)
        spare.finish("pending")
        spares.append(spare)
    return spares
