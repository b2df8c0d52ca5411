"""One screening run: discover -> score -> report."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import discover
from .inference import make_runner
from .model import ModelInfo
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


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]


def screen(options: ScreenOptions, progress: Callable | None = None,
           log: Callable[[str], None] = lambda m: None) -> RunSummary:
    started = time.perf_counter()
    info = options.model
    summary = RunSummary(run_id=new_run_id(), model=str(info.path), model_sha256=info.sha256,
                         threshold=info.threshold, threshold_source=info.threshold_source)
    files = discover.walk(options.directory)
    for item in files:
        discover.identify(item, header_filter=options.header_filter)
    studies = discover.group_studies(files)
    summary.timings["discover_s"] = round(time.perf_counter() - started, 3)
    pending = [f for f in files if f.status == "pending"]
    log(f"{len(files)} files, {len(studies)} studies, {len(pending)} images to score")

    def runner():
        loading = time.perf_counter()
        instance = make_runner(info, options.runtime, options.batch_size)
        summary.runtime = instance.name
        summary.timings["model_load_s"] = round(time.perf_counter() - loading, 3)
        return instance

    scoring = time.perf_counter()
    ticker = progress(len(pending)) if progress else None
    try:
        score(files, runner, options.batch_size, options.workers,
              on_file=(lambda _: ticker.update(1)) if ticker else None)
    finally:
        if ticker:
            ticker.close()
    summary.timings["scoring_s"] = round(time.perf_counter() - scoring, 3)

    records = [study_record(s, info.threshold, info.sha256, summary.run_id) for s in studies]
    summary.count(studies)
    summary.timings["total_s"] = round(time.perf_counter() - started, 3)
    write_report(options.out, options.fmt, records, summary)
    return summary
