"""The state database of incremental (nightly) runs, and its lock.

One SQLite file remembers every image and study screened under a folder:
file identity (relative path, size, mtime, SOPInstanceUID or content hash),
the model and threshold used, and the outcome.  Results are committed per
batch, so a run killed half-way loses at most one batch.  The lock is an
``flock`` on a file beside the database: the kernel releases it on any exit,
kill -9 included, so there is never a stale lock to clean up.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import sqlite3
from contextlib import suppress
from dataclasses import asdict
from pathlib import Path

from .atomic import CannotWrite
from .dicom import DicomHeader
from .discover import DUPLICATE, InputFile, Study, eligibility_skip, readable
from .model import sha256_of
from .preprocess import NothingToScreen

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    root TEXT NOT NULL, rel TEXT NOT NULL, size INTEGER, mtime REAL, identity TEXT,
    kind TEXT, header TEXT, status TEXT, reason TEXT, probability REAL, note TEXT,
    study_key TEXT, model_sha256 TEXT, threshold REAL, run_id TEXT, screened_at TEXT,
    PRIMARY KEY (root, rel));
CREATE TABLE IF NOT EXISTS studies (
    root TEXT NOT NULL, study_key TEXT NOT NULL, record TEXT, flagged INTEGER,
    model_sha256 TEXT, threshold REAL, run_id TEXT, screened_at TEXT,
    PRIMARY KEY (root, study_key));
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, root TEXT, finished TEXT, counts TEXT);
"""


class LockHeld(Exception):
    """Another run holds the state lock."""


class StateLock:
    """An exclusive, non-blocking flock on ``<state>.lock`` naming its holder."""

    def __init__(self, state_path: Path):
        self.path = Path(str(state_path) + ".lock")
        self.handle = None

    def __enter__(self):
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown process"
            handle.close()
            raise LockHeld(f"another run holds {self.path} ({holder})") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}, started {now()}\n")
            handle.flush()
        except OSError as exc:  # a full disk: name the lock, not just the errno
            with suppress(OSError):  # the line is still buffered: closing fails the same way
                handle.close()
            raise CannotWrite(self.path, exc, "the state's lock") from exc
        self.handle = handle
        return self

    def __exit__(self, *exc):
        self.handle.close()  # closing releases the flock


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def content_identity(item: InputFile) -> str:
    """SOPInstanceUID for DICOM, else the sha256 of the file's bytes."""
    if item.header and item.header.sop_instance_uid:
        return f"sop:{item.header.sop_instance_uid}"
    if item.kind in ("png", "jpeg"):
        return f"sha256:{sha256_of(item.path)}"
    return ""


class State:
    """Screening results of earlier runs for one studies folder."""

    def __init__(self, path: Path, root: Path):
        self.db = sqlite3.connect(path, timeout=30)
        self.db.executescript(SCHEMA)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.root = readable(str(Path(root).resolve()))

    def close(self) -> None:
        self.db.close()

    def known_images(self, model_sha256: str, threshold: float) -> dict[str, dict]:
        """Rows screened with this model and threshold, by relative path."""
        rows = self.db.execute(
            "SELECT rel, size, mtime, kind, header, status, reason, probability, note, study_key "
            "FROM images WHERE root = ? AND model_sha256 = ? AND threshold = ?",
            (self.root, model_sha256, threshold))
        keys = ("rel", "size", "mtime", "kind", "header", "status", "reason", "probability", "note",
                "study_key")
        return {row[0]: dict(zip(keys, row)) for row in rows}

    def restore(self, item: InputFile, row: dict, header_filter: bool = True) -> bool:
        """Take an earlier outcome for an unchanged file; False if the file changed.

        Errors are never taken: a crashed decoder, a full memory, a permission
        fixed with chmod or a codec installed since may all have passed, so
        the file is tried again (and its study reported again) on every run.
        Nor is an outcome the header decided (scored, skipped for the header's own
        reason, or skipped when decoded as blank or too large) that this run's
        header filter decides otherwise.  A copy
        skipped as a duplicate comes back eligible: grouping decides the copies
        of an instance again every run, as the one scored in its place may since
        have gone or been overwritten.
        """
        if item.status == "skipped":  # a link the walk skipped, as before: nothing new to report
            return (row["status"], row["reason"]) == ("skipped", item.reason)
        if row["size"] != item.size or row["mtime"] != item.mtime or row["status"] == "error":
            return False
        status, reason = row["status"], row["reason"]
        if status == "skipped" and reason.startswith(DUPLICATE):
            status, reason = "pending", ""
        header = DicomHeader(**json.loads(row["header"])) if row["header"] else None
        header_skip = reason if status == "skipped" and reason not in NothingToScreen.REASONS else None
        if header and header_skip != eligibility_skip(header, header_filter):
            return False
        item.kind, item.header = row["kind"], header
        item.status, item.reason, item.note = status, reason, row["note"]
        # kept apart for a decode again (a stored duplicate made pending): its note follows this
        item.header_note = "; ".join(part for part in (row["note"] or "").split("; ") if part.startswith("header: "))
        item.probability = row["probability"]
        return True

    def save_images(self, items: list[InputFile], study_of: dict[str, Study], model_sha256: str,
                    threshold: float, run_id: str) -> None:
        """Record finished files (not pending, not deferred) and commit."""
        stamp = now()
        rows = [(self.root, f.rel, f.size, f.mtime, content_identity(f) if f.status == "scored" else "",
                 f.kind, json.dumps(asdict(f.header)) if f.header else None, f.status, f.reason,
                 f.probability, f.note, study_of[f.rel].key, model_sha256, threshold, run_id, stamp)
                for f in items if f.status not in ("pending", "deferred")]
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO images VALUES "
                                "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)

    def save_studies(self, records: list[dict], model_sha256: str, threshold: float,
                     unreported: list[str] = ()) -> None:
        """Record the reported studies, in one transaction with the ``unreported`` ones counted as
        never reported, so the next run reports (and exports) them."""
        stamp = now()
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO studies VALUES (?,?,?,?,?,?,?,?)",
                [(self.root, r["study_key"], json.dumps(r), int(r["flagged"]), model_sha256, threshold,
                  r["run_id"], stamp) for r in records if r["status"] != "deferred"])
            self.db.executemany("DELETE FROM studies WHERE root = ? AND study_key = ?",
                                [(self.root, key) for key in unreported])

    def reported_keys(self) -> set[str]:
        """Studies that a completed run has put in a report."""
        rows = self.db.execute("SELECT study_key FROM studies WHERE root = ?", (self.root,))
        return {key for (key,) in rows}

    def previous_studies(self, keys: set[str]) -> list[dict]:
        """Study records that earlier runs under this folder reported, for ``keys``."""
        rows = self.db.execute("SELECT study_key, record FROM studies WHERE root = ?", (self.root,))
        return [json.loads(record) for key, record in rows if key in keys]

    def record_run(self, run_id: str, counts: dict) -> None:
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO runs VALUES (?,?,?,?)",
                            (run_id, self.root, now(), json.dumps(counts)))
