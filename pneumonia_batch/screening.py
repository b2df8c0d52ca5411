"""One screening run: discover -> (state) -> score -> report -> (state, audit log, export)."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sqlite3
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import discover
from .atomic import CannotWrite
from .model import ModelError, ModelInfo
from .pipeline import score
from .report import RunSummary, study_record, write_report


@dataclass
class ScreenOptions:
    directory: Path
    out: Path
    fmt: str
    model: ModelInfo
    batch_size: int = 16
    workers: int = 1
    runtime: str = "auto"
    header_filter: bool = True
    state: Path | None = None
    include_previous: bool = False
    min_age: float = 0.0
    log_file: Path | None = None
    export_dir: Path | None = None


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


class AuditLog:
    """JSON lines, one per event, flushed as written.  Never pixel data."""

    def __init__(self, path: Path | None, run_id: str):
        self.path = path
        self.cut_short = bool(path) and _ends_mid_line(path)  # then our first line starts a new one
        self.handle = _open_to_append(path) if path else None
        self.run_id = run_id

    def event(self, kind: str, **fields) -> None:
        if self.handle:
            line = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
                    "event": kind, "run_id": self.run_id, **fields}
            try:
                self.handle.write(("\n" if self.cut_short else "") + json.dumps(line) + "\n")
                self.cut_short = False
                self.handle.flush()
            except OSError as exc:  # a full disk says only "No space left on device": name the log
                handle, self.handle = self.handle, None
                with suppress(OSError):  # the line is still buffered: closing fails the same way
                    handle.close()
                raise CannotWrite(self.path, exc, "the audit log") from exc

    def close(self) -> None:
        if self.handle:
            self.handle.close()


def failure_message(exc: BaseException, state_path: Path | None) -> str:
    """What a run a failure stopped says, on stderr and in the audit log alike."""
    if isinstance(exc, sqlite3.Error):  # "file is not a database": which file, SQLite does not say
        return f"--state {state_path}: {exc}"
    return str(exc)


def log_refused_run(path: Path | None, directory: Path, error: str) -> None:
    """The one line of a run stopped before it started (no model, an output folder it cannot write,
    a lock held, a damaged state), so the log has every night.  A log that cannot take it changes
    nothing: the error is on stderr, and the exit code is the error's."""
    with suppress(OSError):
        audit = AuditLog(path, new_run_id())
        try:
            audit.event("run_failed", directory=str(directory), error=discover.one_line(error))
        finally:
            audit.close()


def _open_to_append(path: Path):
    """The log, opened once: a FIFO nobody reads is refused rather than waited on, lock held, until
    the next night (a probe that opened and closed it first would end a reader such as ``cat``)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o666)
    except OSError as exc:
        raise CannotWrite(path, exc, "the audit log") from exc
    os.set_blocking(fd, True)  # a slow reader is waited for
    return open(fd, "a", encoding="utf-8")


def _ends_mid_line(path: Path) -> bool:
    """Whether a log file ends part-way through a line, as a disk that filled mid-write leaves it."""
    try:
        if not os.path.getsize(path):  # empty, or a device or FIFO: nothing to read back (nor block on)
            return False
        with open(path, "rb") as handle:
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"
    except OSError:
        return False


def screen(options: ScreenOptions, progress: Callable | None = None,
           log: Callable[[str], None] = lambda m: None) -> RunSummary:
    """Screen the folder and write the report; raises state.LockHeld if another run is active."""
    from .state import State, StateLock

    started = time.perf_counter()
    info = options.model
    summary = RunSummary(run_id=new_run_id(), model=str(info.path), model_sha256=info.sha256,
                         threshold=info.threshold, threshold_source=info.threshold_source)
    with ExitStack() as stack:
        state = None
        try:
            if options.state:
                stack.enter_context(StateLock(options.state))
                state = State(options.state, options.directory)
                stack.callback(state.close)
        except Exception as exc:  # a lock held, a damaged state: the night is in the log all the same
            log_refused_run(options.log_file, options.directory, failure_message(exc, options.state))
            raise
        audit = AuditLog(options.log_file, summary.run_id)
        stack.callback(audit.close)

        def note_unfinished(exc_type, exc, traceback):  # a run that ends without run_end says why
            if exc_type is KeyboardInterrupt:
                audit.event("run_interrupted")
            elif exc is not None:  # a model, state or disk failure: exit 4
                with suppress(CannotWrite):  # the log itself may be what failed
                    audit.event("run_failed", error=discover.one_line(failure_message(exc, options.state)))

        stack.push(note_unfinished)
        audit.event("run_start", directory=str(options.directory), model=str(info.path),
                    model_sha256=info.sha256, threshold=info.threshold)

        is_own = _own_outputs(options)
        files = [f for f in discover.walk(options.directory) if not is_own(f.path)]
        restored = _restore_or_identify(files, state, info, options.header_filter)
        studies = discover.group_studies(files)
        restored -= {f.rel for f in files if f.status == "pending"}  # a stored duplicate grouping now keeps
        reported = state.reported_keys() if state else set()
        this_run = [s for s in studies if _needs_reporting(s, restored, reported)]
        _defer_arriving(this_run, options.min_age)
        summary.timings["discover_s"] = round(time.perf_counter() - started, 3)
        work = [f for s in this_run for f in s.files]
        pending = sum(f.status == "pending" for f in work)
        log(f"{len(files)} files, {len(studies)} studies, {len(this_run)} to report, {pending} images to score")

        study_of = {f.rel: s for s in studies for f in s.files}

        batch_clock = []  # (time, images) as batches finish: steady-state throughput

        def commit(batch):
            if state:
                state.save_images(batch, study_of, info.sha256, info.threshold, summary.run_id)

        def scored_batch(batch):
            batch_clock.append((time.perf_counter(), len(batch)))
            commit(batch)

        loaded = []

        def runner():  # loaded once, and only when there is something to score
            from .inference import make_runner

            if not loaded:
                loading = time.perf_counter()
                loaded.append(make_runner(info, options.runtime, options.batch_size))
                summary.runtime = loaded[0].name
                summary.timings["model_load_s"] = round(time.perf_counter() - loading, 3)
            return loaded[0]

        scoring = time.perf_counter()
        ticker = progress(pending) if progress and pending else None
        try:
            to_score = work
            while to_score:
                score(to_score, runner, options.batch_size, options.workers, on_batch=scored_batch,
                      on_file=(lambda _: ticker.update(1)) if ticker else None)
                to_score = discover.spare_copies(work)
        finally:
            if ticker:
                ticker.close()
        summary.timings["scoring_s"] = round(time.perf_counter() - scoring, 3)
        if len(batch_clock) > 2:  # from the first batch out to the last: start-up excluded
            images = sum(n for _, n in batch_clock[1:])
            summary.timings["steady_img_s"] = round(images / (batch_clock[-1][0] - batch_clock[0][0]), 2)

        commit([f for f in work if f.status != "scored"])  # skips and errors are outcomes too
        records = [study_record(s, info.threshold, info.sha256, summary.run_id) for s in this_run]
        for study in this_run:
            for item in study.files:
                audit.event("file", file=item.rel, study_id=study.study_id, status=item.status,
                            reason=item.reason, probability=item.probability, note=item.note)
        earlier_keys = reported - {s.key for s in this_run}  # only counted unless asked for
        previous = state.previous_studies(earlier_keys) if state and options.include_previous else []
        summary.count(this_run, previous=len(earlier_keys))
        report_records = records + previous
        unexported: list[str] = []  # flagged studies the export missed in part or whole
        if options.export_dir:
            from .export import export_flagged

            exporting = time.perf_counter()
            try:
                exported = export_flagged(options.export_dir, this_run, records, info, options.directory)
                summary.counts["exported"] = exported.exported
                summary.export_error = exported.problem()
                unexported = list(exported.incomplete)
            except (OSError, ValueError, ModelError) as exc:  # the report matters more: write it regardless
                unexported = [r["study_key"] for r in records if r["flagged"]]
                summary.export_error = f"{exc} ({len(unexported)} flagged studies of this run not exported)"
            if summary.export_error:
                audit.event("export_failed", error=summary.export_error)
            summary.timings["export_s"] = round(time.perf_counter() - exporting, 3)
        summary.timings["total_s"] = round(time.perf_counter() - started, 3)
        with _stop_signals_held():
            write_report(options.out, options.fmt, report_records, summary)
            if state:
                # studies a failed export missed stay unreported, so the next run exports them; so do
                # deferred ones, whose files (a skipped one, say) may all be restored next run
                deferred = [r["study_key"] for r in records if r["status"] == "deferred"]
                state.save_studies(records, info.sha256, info.threshold, unreported=unexported + deferred)
                state.record_run(summary.run_id, summary.counts)
            audit.event("run_end", counts=summary.counts, timings=summary.timings, runtime=summary.runtime,
                        exit_code=summary.exit_code)
    return summary


@contextmanager
def _stop_signals_held():
    """The report, the state's record of it and run_end are written together: a Ctrl-C or a stop
    arriving now lets them finish (the run is as good as done) rather than leave a report the
    state does not know of, reported again by the next run."""
    if threading.current_thread() is not threading.main_thread():  # handlers are the main thread's
        yield
        return
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.getsignal(signum) for signum in held}
    for signum in held:
        signal.signal(signum, lambda *args: None)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _restore_or_identify(files: list[discover.InputFile], state, info: ModelInfo,
                         header_filter: bool) -> set[str]:
    """Take the state's outcome for each unchanged file, identify the others; the restored paths."""
    known = state.known_images(info.sha256, info.threshold) if state else {}
    restored = set()
    for item in files:
        row = known.get(item.rel)
        if row and item.status in ("pending", "skipped") and state.restore(item, row, header_filter):
            restored.add(item.rel)
        else:
            discover.identify(item, header_filter=header_filter)
    return restored


def _own_outputs(options: ScreenOptions) -> Callable[[Path], bool]:
    """A test for the report, state, lock, log or export of this tool, when the user put them inside DIR.

    Outputs and DIR may each be named through symlinks: both sides are compared as named and
    resolved (SQLite writes its -wal and -shm files beside the resolved database).
    """
    def both(path) -> set[Path]:
        return {Path(os.path.abspath(path)), Path(os.path.realpath(path))}

    named = [options.out, options.log_file]
    if options.state:
        for state in both(options.state):
            named += [Path(f"{state}{suffix}") for suffix in ("", ".lock", "-wal", "-shm", "-journal")]
    outputs = set().union(*(both(p) for p in named if p is not None))
    root, real_root = Path(os.path.abspath(options.directory)), Path(os.path.realpath(options.directory))
    # An export folder that holds DIR (an export to "." say) writes beside DIR, not in it.
    exports = [e for e in (both(options.export_dir) if options.export_dir else ())
               if not root.is_relative_to(e) and not real_root.is_relative_to(e)]

    def is_own(path: Path) -> bool:
        # Walked paths are not resolved, which would raise on the loops an archive may hold;
        # only DIR itself is, once.
        absolute = Path(os.path.abspath(path))
        for where in (absolute, real_root / absolute.relative_to(root)):
            if where in outputs or any(where.is_relative_to(e) for e in exports):
                return True
        return False

    return is_own


def _needs_reporting(study: discover.Study, restored: set[str], reported: set[str]) -> bool:
    """A file new, changed or not restored from the state, or results a killed run scored but
    never reported.  Only the files not restored are scored: the others keep their results."""
    return any(f.rel not in restored for f in study.files) or study.key not in reported


# How far ahead of this machine's clock a file being copied in may be dated (a file server's clock)
CLOCK_SKEW_S = 3600


def _defer_arriving(studies: list[discover.Study], min_age: float) -> None:
    """A study with a file younger than ``min_age`` seconds is still being copied in.

    A DICOM file caught half-written may not have its StudyInstanceUID yet (or
    even its DICM prefix), so it cannot name its study: then every study with a
    file in its folder waits too.  So does every study beside a file gone since
    the folder was listed (a receiver's temporary name renamed meanwhile), with or
    without ``min_age``: its study may be missing the file under its new name.

    A file dated further ahead than the clock may be wrong (an hour, or ``min_age``
    if longer) says nothing of when it arrived (a modality's clock, kept by the
    copy): it would hold its study back until that date, so it holds back no one.
    """
    now = time.time()

    def is_recent(item: discover.InputFile) -> bool:
        return (min_age > 0 and item.mtime is not None
                and now - min_age < item.mtime <= now + max(min_age, CLOCK_SKEW_S))

    def is_gone(item: discover.InputFile) -> bool:
        return item.status == "deferred" and item.reason == discover.GONE

    def why(item: discover.InputFile) -> str:
        return discover.GONE if is_gone(item) else f"modified less than {min_age:g} s ago"

    unplaced = {f.rel: f for s in studies for f in s.files
                if is_gone(f) or (is_recent(f) and discover.may_be_dicom_cut_short(f))}
    waited_for = {f.path.parent: f for f in unplaced.values()}
    for study in studies:
        recent = [f for f in study.files if is_recent(f) or is_gone(f)]
        nearby = [waited_for[f.path.parent] for f in study.files if f.path.parent in waited_for]
        if not (recent or nearby):
            continue
        blocker = (recent or nearby)[0]
        for item in study.files:
            if item.status in ("pending", "scored") or (item.rel in unplaced and not is_gone(item)):
                waiting = "" if is_recent(item) else f"waiting for {blocker.rel}, "
                item.finish("deferred", waiting + why(item if is_recent(item) else blocker))
