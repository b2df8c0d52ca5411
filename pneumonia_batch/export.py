"""Export of flagged studies for radiologist review.

Each flagged study gets a folder with copies of its original files, a Grad-CAM
overlay per scored image and ``result.json``.  The
top-level ``worklist.csv`` and ``index.html`` are rebuilt from every study
folder present, so a study once exported stays listed: later runs only add, and
a study exported again keeps listing the copies of earlier nights.
Folder and file names come from identifiers that may contain anything, so
they are reduced to safe characters and suffixed with a hash of the study
key (and, for a PNG/JPEG study, of the screened folder): unique, stable across
runs, and always inside the export folder, where a link someone placed is
replaced rather than written through.
"""

from __future__ import annotations

import base64
import errno
import filecmp
import hashlib
import html
import io
import json
import math
import os
import re
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import same_file, write_atomic, write_json_atomic
from .discover import Study, one_line, readable
from .model import ModelError, ModelInfo
from .report import csv_text

RESULT_FILE = "result.json"
PAGE_FILES = ("worklist.csv", "index.html")  # at the top of the export, rebuilt every run
# a file screening could not read, failing to copy for the same reason, is no export failure
UNREADABLE = (errno.EACCES, errno.EPERM, errno.ENOENT)
THUMBNAIL_PREFIX = "data:image/jpeg;base64,"
SUFFIX_LIMIT = 10  # with its dot: ".jpeg", ".dicom"; a longer one is cut
RESERVED_WINDOWS_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                          *(f"LPT{i}" for i in range(1, 10))}
WORKLIST_COLUMNS = ["study_id", "patient_id", "accession_number", "study_date", "probability",
                    "threshold", "folder"]


def safe_name(text: str, fallback: str, limit: int = 40) -> str:
    """Letters, digits, '.', '-' and '_' only; no leading dots; not a Windows device name."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._-")[:limit].rstrip("._-")
    if not cleaned:
        cleaned = fallback
    if cleaned.split(".")[0].upper() in RESERVED_WINDOWS_NAMES:
        cleaned = "_" + cleaned
    return cleaned


def safe_file_name(name: str, limit: int = 40) -> str:
    """safe_name of a file's name, cut short in its stem only: the suffix (.dcm, .jpeg) is what
    opens the copy in a viewer.  A name within the limit comes out as safe_name makes it."""
    cleaned = safe_name(name, "file", limit=len(name))
    stem, suffix = os.path.splitext(cleaned)
    suffix = suffix[:SUFFIX_LIMIT].rstrip("._-")
    if len(cleaned) <= limit or not re.search("[A-Za-z]", suffix):  # digits: a UID's last part, no suffix
        return safe_name(name, "file", limit)
    return safe_name(stem, "file", limit=limit - len(suffix)) + suffix


def study_folder_name(record: dict, screened: Path) -> str:
    """``<patient id>_<study date>_<hash>``.  A PNG/JPEG study is only a top-level folder of the
    screened folder (``path:child001``), a name the next screened folder may use for another
    patient: its hash covers the screened folder too, resolved, so the same folder on later nights
    keeps its study folder.  A DICOM study's UID is its own wherever it arrives from."""
    key = record["study_key"].encode()
    if record["study_key"].startswith("path:"):
        key += b"\0" + os.fsencode(Path(screened).resolve())  # a folder name need not be UTF-8
    digest = hashlib.sha256(key).hexdigest()[:10]
    return "_".join([safe_name(record["patient_id"], "no-patient-id"),
                     safe_name(record["study_date"], "no-date"), digest])


def _inside(root: Path, path: Path) -> Path:
    try:
        resolved = path.resolve(strict=path.is_symlink())
    except (OSError, RuntimeError) as exc:  # a link to itself: RuntimeError before Python 3.13
        raise ValueError(f"a broken or looping link in the export folder: {path}") from exc
    if not resolved.is_relative_to(root.resolve()):
        raise ValueError(f"refusing to write outside the export folder: {path}")
    return path


def exported_name(item) -> str:
    """The file's name behind a hash of its path, size and mtime: a replaced file gets a new name
    (and a new overlay) instead of being shadowed by the old export."""
    digest = hashlib.sha256(f"{item.rel}\0{item.size}\0{item.mtime}".encode()).hexdigest()[:8]
    return f"{digest}_{safe_file_name(Path(item.rel).name)}"


def export_would_replace(path: Path, export_dir: Path) -> bool:
    """Whether the export may write over ``path``: its worklist and page, or anything in a study
    folder (one holding a result.json)."""
    real = Path(os.path.realpath(path))
    return ((real.name in PAGE_FILES and same_file(real.parent, export_dir))
            or (real.parent / RESULT_FILE).is_file() and same_file(real.parent.parent, export_dir))


def _copy_refusal(path: Path, real_root: Path) -> str:
    """Why a file of a flagged study is listed but not copied, or "" to copy it.

    Only regular files inside the screened folder leave it: screening does not follow a link out
    of the folder, and the export must not either (it may reach another patient's data, or
    /dev/zero).  A file gone since the scan is copied, so the copy's error reports it.
    """
    if not os.path.lexists(path):
        return ""
    try:
        real = path.resolve(strict=True)
        mode = real.stat().st_mode
    except (OSError, RuntimeError):
        return "a broken or looping link"
    if not real.is_relative_to(real_root):
        return "outside the screened folder"
    return "" if stat.S_ISREG(mode) else "not a regular file"


def _is_export_file(path: Path) -> bool:
    """A file the export wrote: the review share may be writable by many, and a link placed there
    (to a file outside, say) is replaced, never written through or taken for the export's own."""
    return path.is_file() and not path.is_symlink()


def _copy(source: Path, target: Path) -> None:
    """A copy of the content with its modification time, never a hard link or the link itself.

    A hard link would share one inode, and so its permissions and every later in-place edit,
    between the archive and the review share.  The copy is made under a temporary name, then
    renamed: a run stopped half-way through it leaves no truncated file that later runs would
    take for the export.
    """
    if _is_export_file(target) and not same_file(source, target):  # an older export's hard link is replaced
        return
    partial = target.with_name(f".{target.name}.partial")
    partial.unlink(missing_ok=True)  # a link left in its place would be written through
    try:
        shutil.copyfile(source.resolve(), partial)  # the review share's own permissions, not the archive's
        modified = source.stat().st_mtime_ns
        os.utime(partial, ns=(modified, modified))
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


@dataclass
class ExportOutcome:
    flagged: int = 0
    exported: int = 0  # with a study folder, whole or not
    incomplete: dict[str, str] = field(default_factory=dict)  # study key -> the first problem

    def problem(self) -> str:
        """"" when every flagged study was exported whole, else a line for the run summary."""
        if not self.incomplete:
            return ""
        first = next(iter(self.incomplete.values()))
        without_folder = self.flagged - self.exported
        return (f"{len(self.incomplete)} of {self.flagged} flagged studies not exported whole (first: {first})"
                + (f"; {without_folder} without a study folder" if without_folder else "")
                + ("; a study folder's result.json lists each file's error"
                   if len(self.incomplete) > without_folder else ""))


def export_flagged(export_dir: Path, studies: list[Study], records: list[dict], info: ModelInfo,
                   screened: Path) -> ExportOutcome:
    """Export this run's flagged studies from the folder ``screened`` and rebuild the worklist
    and page.  A file that could not be copied or drawn makes its study incomplete."""
    export_dir = Path(export_dir)
    if export_dir.is_symlink() and not export_dir.exists():  # mkdir would only say "File exists"
        raise OSError(f"{export_dir} is a link to {os.readlink(export_dir)}, which does not exist")
    export_dir.mkdir(parents=True, exist_ok=True)
    real_root = Path(screened).resolve()
    screened_name = readable(str(real_root))  # a night's paths are relative to the folder it screened
    flagged = [(s, r) for s, r in zip(studies, records) if r["flagged"]]
    outcome = ExportOutcome(flagged=len(flagged))
    model = None
    for study, record in flagged:
        folder = export_dir / study_folder_name(record, real_root)
        try:  # the study, named: its folder's name is partly a hash
            _inside(export_dir, folder).mkdir(exist_ok=True)
        except ValueError as exc:  # a link placed where its folder goes
            outcome.incomplete[record["study_key"]] = f"study {record['study_id']}: {exc}"
            continue  # the other studies, the worklist and the page are still made
        except OSError as exc:  # a file in its place
            outcome.incomplete[record["study_key"]] = one_line(
                f"study {record['study_id']}: cannot make {folder}: {exc.strerror or exc}")
            continue
        outcome.exported += 1
        earlier = _earlier_images(folder)
        known_thumbnails = {image["overlay"]: thumbnail for image in earlier
                            if (thumbnail := _stored_thumbnail(image)) and isinstance(image.get("overlay"), str)}
        images = []
        problems = []
        scored = study.scored
        for item in study.files:
            name = exported_name(item)
            entry = {"file": item.rel, "screened": screened_name, "exported_as": name, "status": item.status,
                     "reason": item.reason, "probability": item.probability, "note": item.note}
            refusal = _copy_refusal(item.path, real_root)
            if refusal:
                entry.update(exported_as=None, not_exported=refusal)
            else:
                try:
                    _copy(item.path, folder / name)  # a safe name: no separator, no leading dot
                except OSError as exc:  # gone since the scan, a full disk: listed, and retried
                    entry.update(exported_as=None, export_error=one_line(exc.strerror or str(exc)))
                    if not (item.status == "error" and exc.errno in UNREADABLE):  # its error row says so
                        problems.append(f"{item.rel}: {entry['export_error']}")
            if item in scored and entry["exported_as"]:
                # Named by the model too: a model update draws its own heatmaps, never shows the last one's.
                overlay_name = f"overlay_{name}.model-{info.sha256[:8]}.png"
                overlay_path = folder / overlay_name
                made_now = False
                if not _is_export_file(overlay_path):  # a rerun does not recompute it
                    if model is None:  # TensorFlow only when an overlay is really needed
                        from .model import load_keras_model

                        try:
                            model = load_keras_model(info.path, info.sha256)
                        except ModelError as exc:  # the run's summary is one line
                            raise ModelError(one_line(str(exc))) from exc
                    try:
                        _write_overlay(model, info, item, overlay_path)
                        made_now = True
                    except Exception as exc:  # the file changed or vanished since it was scored
                        entry["overlay_error"] = one_line(f"{type(exc).__name__}: {exc}")[:300]
                        problems.append(f"{item.rel}: no overlay: {entry['overlay_error']}")
                if _is_export_file(overlay_path):
                    entry["overlay"] = overlay_name
                    # Made once, kept in result.json: rebuilding the page each night then reads
                    # no image, however large the export has grown.
                    stored = None if made_now else known_thumbnails.get(overlay_name)
                    try:
                        entry["thumbnail"] = stored or _thumbnail(overlay_path)
                    except (OSError, ValueError) as exc:  # a damaged overlay: the page links it instead
                        entry["thumbnail_error"] = one_line(f"{type(exc).__name__}: {exc}")[:300]
            images.append(entry)
        if problems:
            outcome.incomplete[record["study_key"]] = one_line(f"{record['study_id']}: {problems[0]}")
        kept = _kept_from_earlier(earlier, images, folder, screened_name)
        images = sorted(images + kept, key=lambda image: (image["file"], image.get("screened") or ""))
        result = {key: record[key] for key in record if key != "images"}
        scores = [image["probability"] for image in kept if image.get("status") == "scored"
                  and image["probability"] is not None]
        result.update(probability=max([record["probability"], *scores]), n_scored=record["n_scored"] + len(scores),
                      folder=folder.name, images=images, exported_by_run=record["run_id"], export_version=1)
        write_json_atomic(folder / RESULT_FILE, result, follow_link=False)
    rebuild_index(export_dir)
    return outcome


def _write_overlay(model, info: ModelInfo, item, target: Path) -> None:
    from .gradcam import heatmaps, overlay
    from .preprocess import RESAMPLE, read_grey_image, to_model_input, warnings_noted

    # Full resolution, one decode for both the heatmap input and the picture.  Scoring used the
    # reduced decode: probabilities moved by at most 0.0053 when measured, < 0.01 as tested.
    with warnings_noted([]):  # the scoring decode has put them in the image's note already
        grey, _ = read_grey_image(item.path, item.kind)
    cam = heatmaps(model, to_model_input(grey)[None], info.input_scale)[0]
    grey.thumbnail((512, 512), RESAMPLE)  # aspect kept; the heatmap is stretched to match
    picture = overlay(grey, cam)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    write_atomic(target, buffer.getvalue(), follow_link=False)


def _stored_thumbnail(image) -> str | None:
    value = image.get("thumbnail") if isinstance(image, dict) else None
    return value if isinstance(value, str) and value.startswith(THUMBNAIL_PREFIX) else None


def _earlier_images(folder: Path) -> list[dict]:
    """The images of the study's earlier result.json (which a person may have edited or damaged:
    anything unexpected is ignored)."""
    try:
        result = json.loads((folder / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return []
    images = result.get("images") if isinstance(result, dict) else None
    return [image for image in images if isinstance(image, dict)] if isinstance(images, list) else []


def _kept_from_earlier(earlier: list[dict], images: list[dict], folder: Path, screened: str) -> list[dict]:
    """The entries of earlier nights that stay listed: their copies are still here (a study's
    instances may be moved out of the screened folder once read; the export only grows), and
    tonight neither lists the same file of the same screened folder (an entry from before
    ``screened`` was recorded counts as tonight's folder) nor copied the same bytes (a file
    renamed since, an instance re-sent under another name)."""
    listed = {(entry["screened"], entry["file"]) for entry in images}
    copies = [folder / entry["exported_as"] for entry in images if entry["exported_as"]]
    return [image for image in earlier
            if _still_exported(image, folder) and (image.get("screened") or screened, image["file"]) not in listed
            # sizes first, then bytes
            and not any(filecmp.cmp(folder / image["exported_as"], copy, shallow=False) for copy in copies)]


def _still_exported(image: dict, folder: Path) -> bool:
    """An earlier entry whose copy is still in the study's folder, with a plain name and a score
    to list: a probability from 0 to 1, or none (a hand edit may have put anything there, and a
    name with a separator would reach outside)."""
    name, probability, screened = image.get("exported_as"), image.get("probability"), image.get("screened")
    return (isinstance(image.get("file"), str) and (screened is None or isinstance(screened, str))
            and isinstance(name, str) and name == Path(name).name
            and not name.startswith(".") and _is_export_file(folder / name)
            and (probability is None or (type(probability) in (int, float) and 0 <= probability <= 1)))


def _is_listable(result) -> bool:
    """A result.json of this export version with every field the worklist and page use."""
    return (isinstance(result, dict) and result.get("export_version") == 1
            and isinstance(result.get("images"), list)
            and all(isinstance(result.get(k), str) for k in ("study_id", "folder"))
            and all(isinstance(result.get(k), (str, type(None)))
                    for k in ("patient_id", "accession_number", "study_date"))
            and all(isinstance(result.get(k), (int, float)) and not isinstance(result.get(k), bool)
                    for k in ("probability", "threshold", "n_scored")))


def _load_results(export_dir: Path) -> list[dict]:
    results = []
    for result_file in sorted(export_dir.glob(f"*/{RESULT_FILE}")):
        try:
            result = json.loads(result_file.read_text())
        except (OSError, ValueError):
            continue
        if _is_listable(result) and result["folder"] == result_file.parent.name:
            results.append(result)
    return sorted(results, key=lambda r: (-r["probability"], r["folder"]))


def rebuild_index(export_dir: Path) -> None:
    results = _load_results(export_dir)
    worklist, page = (export_dir / name for name in PAGE_FILES)
    write_atomic(worklist, csv_text(WORKLIST_COLUMNS, results), follow_link=False)
    write_atomic(page, render_html(export_dir, results), follow_link=False)


def _thumbnail(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as image:
        image.thumbnail((320, 320))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=85)
    return THUMBNAIL_PREFIX + base64.b64encode(buffer.getvalue()).decode()


def _picture(folder: Path, image, threshold) -> str:
    """One image of a card: its thumbnail linking to the overlay, or a plain link without one, and
    under it the image's own probability (the card shows the study's, its highest)."""
    if not (isinstance(image, dict) and isinstance(image.get("overlay"), str)
            and isinstance(image.get("file"), str) and (folder / image["overlay"]).is_file()):
        return ""
    thumbnail = _stored_thumbnail(image)
    if thumbnail is None:  # exported before thumbnails were kept: made at each rebuild
        try:
            thumbnail = _thumbnail(folder / image["overlay"])
        except (OSError, ValueError):
            thumbnail = None
    link = f'{html.escape(folder.name)}/{html.escape(image["overlay"])}'
    caption = _caption(image, threshold)
    if thumbnail is None:
        return f'<a href="{link}">{caption}</a> '
    return (f'<figure><a href="{link}"><img alt="{html.escape(image["file"])}" src="{html.escape(thumbnail)}">'
            f'</a><figcaption>{caption}</figcaption></figure>')


def _caption(image, threshold) -> str:
    """``file: 0.037 (below threshold)``.  Each heatmap is scaled to its own image's peak, so an
    image of a flagged study that scored low shows red too: its own probability says how little."""
    probability = image.get("probability")
    if isinstance(probability, bool) or not isinstance(probability, (int, float)) or not math.isfinite(probability):
        return html.escape(image["file"])
    below = " (below threshold)" if probability < threshold else ""
    return f'{html.escape(image["file"])}: {probability:.3f}{below}'


def _note(image) -> str:
    """Why an image of the study was not scored, and what the report noted of it (``first of 3
    frames``): the card's probability is its scored images' alone, and a reader must know which."""
    if not (isinstance(image, dict) and isinstance(image.get("file"), str)):
        return ""
    said = []
    status, reason = image.get("status"), image.get("reason")
    if status in ("skipped", "error") and isinstance(reason, str) and reason:
        said.append(f"not scored ({reason if status == 'skipped' else f'error: {reason}'})")
    if isinstance(image.get("note"), str) and image["note"]:
        said.append(image["note"])
    if not said:
        return ""
    return f'<div class="note">{html.escape(image["file"])}: {html.escape("; ".join(said))}</div>'


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data: 'self'; style-src 'unsafe-inline'">
<title>Pneumonia screening: flagged studies</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; background: #f4f4f4; color: #222; }}
.card {{ background: #fff; border-radius: 6px; padding: 1rem; margin-bottom: 1rem; box-shadow: 0 1px 3px #0003; }}
.card h2 {{ margin: 0 0 .4rem; font-size: 1.1rem; }}
.ids {{ color: #555; font-size: .9rem; }}
.prob {{ font-weight: bold; color: #a40000; }}
.images figure {{ display: inline-block; vertical-align: top; margin: .4rem .4rem 0 0; }}
.images img {{ border: 1px solid #ccc; max-width: 320px; }}
.images figcaption {{ font-size: .85rem; color: #555; }}
.note {{ font-size: .85rem; color: #555; }}
</style></head><body>
<h1>Flagged studies ({count})</h1>
<p class="note">A screening aid, not a diagnosis: the model was trained on paediatric frontal chest
X-rays from one centre. Heatmaps (Grad-CAM) show where the model looked, not a finding; each is
scaled to its own image, so an image that scored low shows red too: its probability is under it.
Highest probability first.</p>
{cards}
</body></html>
"""


def render_html(export_dir: Path, results: list[dict]) -> str:
    cards = []
    for r in results:
        pictures = "".join(_picture(export_dir / r["folder"], i, r["threshold"]) for i in r["images"])
        notes = "".join(_note(i) for i in r["images"])
        cards.append(
            f'<div class="card" data-study="{html.escape(r["study_id"])}">'
            f'<h2>{html.escape(r["study_id"])}</h2>'
            f'<div class="ids">patient {html.escape(r["patient_id"] or "-")} &middot; accession '
            f'{html.escape(r["accession_number"] or "-")} &middot; date {html.escape(r["study_date"] or "-")}</div>'
            f'<div>probability <span class="prob">{r["probability"]:.3f}</span> (threshold '
            f'{r["threshold"]:.3f}) &middot; {r["n_scored"]} image(s) scored &middot; '
            f'folder <code>{html.escape(r["folder"])}</code></div>'
            f'<div class="images">{pictures}</div>{notes}</div>')
    return PAGE.format(count=len(results), cards="\n".join(cards))

