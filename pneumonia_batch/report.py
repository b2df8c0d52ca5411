"""The per-study report (CSV or JSON), written atomically, and the run summary."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import write_atomic
from .discover import InputFile, Study

COLUMNS = ["study_id", "patient_id", "accession_number", "study_date", "files", "n_images",
           "n_scored", "probability", "threshold", "flagged", "status", "reason",
           "model_sha256", "run_id"]
# A cell starting with one of these is a formula to Excel, LibreOffice and Sheets; one starting
# with the quote that neutralises them gets another, so removing one quote always gives the text back.
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r", "'")


@dataclass
class RunSummary:
    """Counts and timings of one run; owns the exit code."""

    run_id: str
    model: str = ""
    model_sha256: str = ""
    threshold: float | None = None
    threshold_source: str = ""
    runtime: str = ""
    counts: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    export_error: str = ""

    def count(self, studies: list[Study], previous: int = 0) -> None:
        files = [f for s in studies for f in s.files]
        self.counts = {
            "studies": len(studies),
            "scored": sum(s.status == "scored" for s in studies),
            "flagged": sum(is_flagged(s, self.threshold) for s in studies),
            "skipped": sum(s.status == "skipped" for s in studies),
            "deferred": sum(s.status == "deferred" for s in studies),
            "error_studies": sum(s.status == "error" for s in studies),
            "files": len(files),
            "images_scored": sum(f.status == "scored" for f in files),
            "file_errors": sum(f.status == "error" for f in files),
            "previous_studies": previous,
        }

    @property
    def exit_code(self) -> int:
        """0 all read; 1 some files could not be read (they are in the report) or the export failed."""
        return 1 if self.counts.get("file_errors") or self.export_error else 0

    def line(self) -> str:
        c = self.counts
        previous = f" (+{c['previous_studies']} from earlier runs)" if c.get("previous_studies") else ""
        deferred = f", {c['deferred']} deferred" if c.get("deferred") else ""
        return (f"{c['scored']} studies scored, {c['flagged']} flagged, {c['skipped']} skipped"
                f"{deferred}, {c['file_errors']} file errors{previous} "
                f"in {self.timings.get('total_s', 0):.1f} s"
                + (f"; review export failed: {self.export_error}" if self.export_error else ""))


def is_flagged(study: Study, threshold: float | None) -> bool:
    probability = study.probability
    return probability is not None and threshold is not None and probability >= threshold


def safe_cell(value):
    """Neutralise spreadsheet formulas in text cells (OWASP CSV injection)."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def study_record(study: Study, threshold: float | None, model_sha256: str, run_id: str) -> dict:
    probability = study.probability
    return {
        "study_id": study.study_id,
        "study_key": study.key,
        "patient_id": study.patient_id,
        "accession_number": study.accession_number,
        "study_date": study.study_date,
        "files": [f.rel for f in study.files],
        "n_images": sum(f.is_image for f in study.files),
        "n_scored": len(study.scored),
        "probability": probability,  # unrounded: "flagged" compares this very value with the threshold
        "threshold": threshold,
        "flagged": is_flagged(study, threshold),
        "status": study.status,
        "reason": study.reason,
        "model_sha256": model_sha256,
        "run_id": run_id,
        "images": [image_record(f) for f in study.files],
    }


def image_record(item: InputFile) -> dict:
    header = item.header
    return {
        "file": item.rel,
        "kind": item.kind,
        "status": item.status,
        "reason": item.reason,
        "probability": item.probability,
        "sop_instance_uid": header.sop_instance_uid if header else "",
        "note": item.note,
    }


def _csv_file_name(name: str) -> str:
    """A name as listed in the ``;``-separated files cell: split on ``;``, then unquote
    (``urllib.parse.unquote``) to get the name back."""
    return name.replace("%", "%25").replace(";", "%3B")


def csv_text(columns: list[str], rows: list[dict]) -> str:
    """CSV with spreadsheet-safe cells.  CRLF line ends, as RFC 4180 has them: the writer then
    quotes any cell holding a CR (a file name may), which every reader would take for a line end."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\r\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: safe_cell(row.get(k)) for k in columns})
    return buffer.getvalue()


def render_csv(records: list[dict]) -> str:
    return csv_text(COLUMNS, [dict(record, files=";".join(map(_csv_file_name, record["files"])),
                                   flagged="true" if record["flagged"] else "false",
                                   probability="" if record["probability"] is None else repr(record["probability"]))
                              for record in records])


def render_json(records: list[dict], summary: RunSummary) -> str:
    return json.dumps({"run": summary.__dict__, "studies": records}, indent=2) + "\n"


def write_report(path: Path, fmt: str, records: list[dict], summary: RunSummary) -> None:
    text = render_csv(records) if fmt == "csv" else render_json(records, summary)
    write_atomic(path, text)
