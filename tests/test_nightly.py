"""Unattended operation: incremental state, lock, kill -9 recovery, deferral, audit log, export."""

import csv
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pneumonia_batch.bench import process_tree
from pneumonia_batch.state import StateLock
from tests.dicom_factory import EXAMPLES, chest_pixels, make_dataset, save
from tests.test_cli import NORMAL_JPEG, PNEUMONIA_JPEG, ROOT, rows, run

OLD = time.time() - 3600
SHIPPED_SHA = json.loads((ROOT / "weights" / "densenet121_pneumonia.json").read_text())["sha256"]


def make_studies(root: Path, n: int) -> Path:
    for i in range(n):
        folder = root / f"child{i:03d}"
        folder.mkdir(parents=True)
        shutil.copy(PNEUMONIA_JPEG if i % 2 else NORMAL_JPEG, folder / "cxr.jpeg")
        os.utime(folder / "cxr.jpeg", (OLD, OLD))
    return root


def image_rows(state):
    with sqlite3.connect(state) as db:
        return {rel: (run_id, p) for rel, run_id, p in
                db.execute("SELECT rel, run_id, probability FROM images")}


@pytest.fixture
def no_tensorflow(tmp_path):
    """An environment in which importing TensorFlow or Keras fails loudly."""
    fake = tmp_path / "fake_site"
    for name in ("tensorflow", "keras"):
        (fake / name).mkdir(parents=True)
        (fake / name / "__init__.py").write_text(f"raise ImportError('{name} must not be imported')\n")
    return dict(os.environ, PYTHONPATH=str(fake))


def test_second_run_skips_everything_without_tensorflow(tmp_path, no_tensorflow):
    studies = make_studies(tmp_path / "studies", 3)
    state = tmp_path / "state.db"
    first = run(studies, "--out", tmp_path / "r1.csv", "--state", state)
    assert first.returncode == 0, first.stderr
    before = image_rows(state)
    assert len(before) == 3
    second = run(studies, "--out", tmp_path / "r2.csv", "--state", state, env=no_tensorflow)
    assert second.returncode == 0, second.stderr
    assert rows(tmp_path / "r2.csv") == []
    assert "(+3 from earlier runs)" in second.stderr
    assert image_rows(state) == before
    again = run(studies, "--out", tmp_path / "r3.csv", "--state", state, "--include-previous",
                env=no_tensorflow)
    previous = rows(tmp_path / "r3.csv")
    assert sorted(r["study_id"] for r in previous) == ["child000", "child001", "child002"]
    assert {r["probability"] for r in previous} == {r["probability"] for r in rows(tmp_path / "r1.csv")}
    assert again.returncode == 0


def test_only_new_files_are_scored_and_a_grown_study_is_reported_again(tmp_path):
    studies = make_studies(tmp_path / "studies", 2)
    state = tmp_path / "state.db"
    run(studies, "--out", tmp_path / "r1.csv", "--state", state)
    first = image_rows(state)
    shutil.copy(NORMAL_JPEG, studies / "child001" / "second.jpeg")
    make_studies(tmp_path / "more", 1)
    shutil.move(tmp_path / "more" / "child000", studies / "child999")
    result = run(studies, "--out", tmp_path / "r2.csv", "--state", state)
    assert result.returncode == 0, result.stderr
    assert sorted(r["study_id"] for r in rows(tmp_path / "r2.csv")) == ["child001", "child999"]
    after = image_rows(state)
    assert after["child000/cxr.jpeg"] == first["child000/cxr.jpeg"]  # untouched study not re-scored
    assert after["child001/cxr.jpeg"] == first["child001/cxr.jpeg"]  # nor the unchanged image of a grown one
    assert after["child001/second.jpeg"][0] == after["child999/cxr.jpeg"][0] != first["child000/cxr.jpeg"][0]
    grown = next(r for r in rows(tmp_path / "r2.csv") if r["study_id"] == "child001")
    assert grown["n_scored"] == "2"
    assert float(grown["probability"]) == pytest.approx(max(after["child001/cxr.jpeg"][1],
                                                            after["child001/second.jpeg"][1]), abs=1e-6)


def test_outputs_inside_the_folder_are_not_screened(tmp_path):
    studies = make_studies(tmp_path / "studies", 1)
    args = ["--state", studies / "state.db", "--log-file", studies / "audit.jsonl",
            "--export-flagged", studies / "review", "--threshold", "0"]
    run(studies, "--out", studies / "report.csv", *args)
    result = run(studies, "--out", studies / "report.csv", *args)
    assert result.returncode == 0, result.stderr
    assert rows(studies / "report.csv") == []  # nothing new: its own files are not studies


def test_links_skipped_once_are_not_reported_again(tmp_path):
    studies = make_studies(tmp_path / "studies", 1)
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(NORMAL_JPEG, tmp_path / "elsewhere" / "other.jpeg")
    (studies / "child000" / "outside.jpeg").symlink_to(tmp_path / "elsewhere" / "other.jpeg")
    (studies / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    state = tmp_path / "state.db"
    run(studies, "--out", tmp_path / "r1.csv", "--state", state)
    assert sorted(r["reason"] for r in rows(tmp_path / "r1.csv")) == [
        "symlink_outside_folder (1)", "symlinked_folder_not_followed (1)"]
    result = run(studies, "--out", tmp_path / "r2.csv", "--state", state)
    assert result.returncode == 0 and rows(tmp_path / "r2.csv") == []


@pytest.mark.parametrize("linked", ["report", "export", "state", "folder"])
def test_outputs_reached_through_symlinks_are_not_screened(linked, tmp_path):
    """An output named through a link into DIR, or DIR named through a link with the outputs
    named inside its target: either way they are this tool's files, not studies."""
    studies = make_studies(tmp_path / "studies", 1)
    (tmp_path / "links").mkdir()
    outputs = {"report": studies / "latest.csv", "export": studies / "review", "state": studies / "state.db"}
    directory = studies
    if linked == "folder":
        directory = tmp_path / "links" / "studies"
        directory.symlink_to(studies, target_is_directory=True)
    else:
        if linked == "export":
            outputs["export"].mkdir()
        link = tmp_path / "links" / outputs[linked].name
        link.symlink_to(outputs[linked])
        outputs[linked] = link
    args = ["--out", outputs["report"], "--export-flagged", outputs["export"], "--threshold", "0"]
    for night in (1, 2):
        result = run(directory, *args, "--state", outputs["state"] if linked == "state" else tmp_path / "s.db")
        assert result.returncode == 0, result.stderr
        assert [r["study_id"] for r in rows(outputs["report"])] == (["child000"] if night == 1 else [])


def test_other_threshold_rescores(tmp_path):
    studies = make_studies(tmp_path / "studies", 1)
    state = tmp_path / "state.db"
    run(studies, "--out", tmp_path / "r1.csv", "--state", state)
    run(studies, "--out", tmp_path / "r2.csv", "--state", state, "--threshold", "0.5")
    assert [r["threshold"] for r in rows(tmp_path / "r2.csv")] == ["0.5"]


def test_a_file_changed_in_size_or_date_alone_is_scored_and_reported_again(tmp_path):
    """A corrected re-send copied with ``cp -p`` keeps the old date but not the old size; a file
    touched again keeps its size: either way the stored result may be of other pixels."""
    studies = make_studies(tmp_path / "studies", 2)
    state = tmp_path / "state.db"
    assert run(studies, "--out", tmp_path / "r1.csv", "--state", state).returncode == 0
    first = image_rows(state)
    normal = studies / "child000" / "cxr.jpeg"
    shutil.copy(PNEUMONIA_JPEG, normal)  # another image, another size, the same date
    os.utime(normal, (OLD, OLD))
    assert normal.stat().st_size != NORMAL_JPEG.stat().st_size
    touched = studies / "child001" / "cxr.jpeg"
    os.utime(touched, (OLD - 60, OLD - 60))  # the same bytes, another date
    result = run(studies, "--out", tmp_path / "r2.csv", "--state", state)
    assert result.returncode == 0, result.stderr
    report = {r["study_id"]: r for r in rows(tmp_path / "r2.csv")}
    assert sorted(report) == ["child000", "child001"]
    after = image_rows(state)
    assert after["child000/cxr.jpeg"][0] == after["child001/cxr.jpeg"][0] != first["child000/cxr.jpeg"][0]
    # the re-sent image's own probability, not the stored one of the image it replaced
    assert float(report["child000"]["probability"]) == pytest.approx(first["child001/cxr.jpeg"][1], abs=1e-6)
    assert float(report["child000"]["probability"]) != pytest.approx(first["child000/cxr.jpeg"][1], abs=1e-3)
    assert float(report["child001"]["probability"]) == pytest.approx(first["child001/cxr.jpeg"][1], abs=1e-6)


def test_another_model_at_the_same_threshold_scores_again(tmp_path):
    """A new model's report must carry its own probabilities, not last night's model's under its name."""
    studies = make_studies(tmp_path / "studies", 1)
    state = tmp_path / "state.db"
    assert run(studies, "--out", tmp_path / "r1.csv", "--state", state).returncode == 0
    first = image_rows(state)
    model = model_copy(tmp_path, b"another model")
    new_sha = json.loads((tmp_path / "m.json").read_text())["sha256"]
    assert new_sha != SHIPPED_SHA
    result = run(studies, "--out", tmp_path / "r2.csv", "--state", state, "--model", model)
    assert result.returncode == 0, result.stderr
    (study,) = rows(tmp_path / "r2.csv")
    assert (study["study_id"], study["status"], study["model_sha256"]) == ("child000", "scored", new_sha)
    assert study["threshold"] == rows(tmp_path / "r1.csv")[0]["threshold"]
    assert image_rows(state)["child000/cxr.jpeg"][0] != first["child000/cxr.jpeg"][0]  # scored again
    with sqlite3.connect(state) as db:
        assert db.execute("SELECT model_sha256 FROM images").fetchall() == [(new_sha,)]


def test_include_previous_lists_a_grown_study_once_with_its_new_result(tmp_path):
    """A study reported last night that grew by an image: the full report has its new row only,
    not also last night's with one image fewer, and counts it as this run's, not an earlier one."""
    studies = make_studies(tmp_path / "studies", 2)
    state = tmp_path / "state.db"
    assert run(studies, "--out", tmp_path / "r1.csv", "--state", state).returncode == 0
    first = {r["study_id"]: r for r in rows(tmp_path / "r1.csv")}
    shutil.copy(NORMAL_JPEG, studies / "child001" / "second.jpeg")
    os.utime(studies / "child001" / "second.jpeg", (OLD, OLD))
    result = run(studies, "--out", tmp_path / "r2.csv", "--state", state, "--include-previous")
    assert result.returncode == 0, result.stderr
    report = rows(tmp_path / "r2.csv")
    assert sorted((r["study_id"], r["n_images"]) for r in report) == [("child000", "1"), ("child001", "2")]
    grown = next(r for r in report if r["study_id"] == "child001")
    assert grown["run_id"] != first["child001"]["run_id"]
    assert grown["files"] == "child001/cxr.jpeg;child001/second.jpeg"
    assert next(r for r in report if r["study_id"] == "child000") == first["child000"]
    assert "1 studies scored" in result.stderr and "(+1 from earlier runs)" in result.stderr


def test_one_state_file_for_two_folders_keeps_their_studies_apart(tmp_path):
    """Two nightly jobs sharing one --state: folder A's studies are no earlier runs of folder B, and
    B's study named like one of A's is reported for B, also when it is only B's report that is
    still owed (its flagged study's export failed)."""
    a = make_studies(tmp_path / "a", 2)
    b = make_studies(tmp_path / "b", 1)
    shutil.copy(PNEUMONIA_JPEG, b / "child000" / "cxr.jpeg")  # B's child000 is not A's
    os.utime(b / "child000" / "cxr.jpeg", (OLD, OLD))
    state = tmp_path / "state.db"
    assert run(a, "--out", tmp_path / "a.csv", "--state", state, "--threshold", "0").returncode == 0
    a_child000 = next(r for r in rows(tmp_path / "a.csv") if r["study_id"] == "child000")
    blocker = tmp_path / "share"
    blocker.write_text("the review share is not mounted")
    args = ["--state", state, "--threshold", "0", "--include-previous"]
    first = run(b, "--out", tmp_path / "b1.csv", *args, "--export-flagged", blocker / "review")
    assert first.returncode == 1 and "review export failed" in first.stderr
    assert "from earlier runs" not in first.stderr
    (study,) = rows(tmp_path / "b1.csv")
    assert (study["study_id"], study["files"]) == ("child000", "child000/cxr.jpeg")
    assert study["probability"] != a_child000["probability"]
    second = run(b, "--out", tmp_path / "b2.csv", *args)  # the export missed it: reported again
    assert second.returncode == 0, second.stderr
    assert "1 studies scored" in second.stderr and "from earlier runs" not in second.stderr
    assert [(r["study_id"], r["probability"]) for r in rows(tmp_path / "b2.csv")] == [
        ("child000", study["probability"])]
    third = run(b, "--out", tmp_path / "b3.csv", *args)  # nothing new: the full report is B's alone
    assert third.returncode == 0 and "(+1 from earlier runs)" in third.stderr, third.stderr
    assert [(r["study_id"], r["probability"]) for r in rows(tmp_path / "b3.csv")] == [
        ("child000", study["probability"])]


def test_concurrent_run_exits_3_naming_the_holder(tmp_path):
    studies = make_studies(tmp_path / "studies", 1)
    state = tmp_path / "state.db"
    with StateLock(state):
        result = run(studies, "--out", tmp_path / "r.csv", "--state", state)
    assert result.returncode == 3
    assert f"pid {os.getpid()}" in result.stderr
    assert not (tmp_path / "r.csv").exists()


def test_the_lock_line_of_a_dead_run_is_replaced_whole(tmp_path):
    """A lock file left by a run long gone, its line longer than ours: a concurrent run names the
    run holding the lock now, not a mix of it and the dead one (the pid an operator would kill)."""
    studies = make_studies(tmp_path / "studies", 1)
    state = tmp_path / "state.db"
    dead = "pid 987654321, started 2020-01-01T00:00:00+00:00 by a run that has long since ended\n"
    Path(f"{state}.lock").write_text(dead * 2)
    with StateLock(state):
        holder = Path(f"{state}.lock").read_text()
        result = run(studies, "--out", tmp_path / "r.csv", "--state", state)
    assert result.returncode == 3
    assert "987654321" not in result.stderr
    assert result.stderr == f"error: another run holds {state}.lock ({holder.strip()})\n"
    assert re.fullmatch(rf"pid {os.getpid()}, started [-0-9T:+]+\n", holder), holder



@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_lock_on_a_full_disk_is_named(tmp_path):
    """The lock is the first thing a run writes: on a full disk its message names it."""
    studies = make_studies(tmp_path / "studies", 1)
    state = tmp_path / "state.db"
    (tmp_path / "state.db.lock").symlink_to("/dev/full")  # opens like a file on a full disk
    result = run(studies, "--out", tmp_path / "r.csv", "--state", state)
    assert result.returncode == 4
    # the device refuses the lock's truncation (EINVAL) before the write a full disk refuses
    assert re.fullmatch(f"error: cannot write the state's lock {re.escape(str(tmp_path / 'state.db.lock'))}: "
                        "(Invalid argument|No space left on device)\n", result.stderr), result.stderr
    assert not (tmp_path / "r.csv").exists()

def as_at_a_terminal(args: list[str]) -> list[str]:
    """A test run started in the background (``&``, nohup) ignores SIGINT, and so would the screening
    process it starts: give it the default, as a terminal's Ctrl-C finds it.  Done by a small
    launcher that execs the command, not by ``preexec_fn``, which is unsafe in a process with
    threads (TensorFlow's, here)."""
    launcher = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                "os.execv(sys.argv[1], sys.argv[1:])")
    return [sys.executable, "-c", launcher, *args]


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie has already ended


def test_kill_9_mid_run_then_rerun_reports_each_study_once(tmp_path):
    studies = make_studies(tmp_path / "studies", 24)
    state = tmp_path / "state.db"
    args = [sys.executable, str(ROOT / "screen.py"), str(studies), "--out", str(tmp_path / "r1.csv"),
            "--state", str(state), "--batch-size", "2", "--no-progress"]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if state.exists() and 0 < len(image_rows(state)) < 24:
                break
        except sqlite3.OperationalError:  # caught between the run creating the file and its tables
            pass
        time.sleep(0.05)
    workers = process_tree(process.pid)[1:]
    assert workers, "the decode workers were not running"
    process.send_signal(signal.SIGKILL)
    process.wait()
    gone_by = time.time() + 10
    while time.time() < gone_by and any(alive(pid) for pid in workers):
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers), "decode workers outlived the killed run"
    done_before = len(image_rows(state))
    assert 0 < done_before < 24, "the run was not caught half-way"
    assert not (tmp_path / "r1.csv").exists()
    result = run(studies, "--out", tmp_path / "r2.csv", "--state", state, "--include-previous")
    assert result.returncode == 0, result.stderr
    report = rows(tmp_path / "r2.csv")
    assert sorted(r["study_id"] for r in report) == [f"child{i:03d}" for i in range(24)]
    assert all(r["status"] == "scored" for r in report)
    assert len(image_rows(state)) == 24


@pytest.mark.parametrize("stop, code, word", [(signal.SIGINT, 130, "interrupted"),  # Ctrl-C
                                              (signal.SIGTERM, 143, "terminated")])  # systemd's stop
def test_a_run_stopped_mid_way_exits_quietly_and_keeps_what_was_scored(stop, code, word, tmp_path):
    n = 400  # about 15 s of scoring, so the stop lands mid-run even when this process is slow to look
    studies = make_studies(tmp_path / "studies", n)
    state, log = tmp_path / "state.db", tmp_path / "audit.jsonl"
    args = [sys.executable, str(ROOT / "screen.py"), str(studies), "--out", str(tmp_path / "r1.csv"),
            "--state", str(state), "--log-file", str(log), "--batch-size", "2", "--no-progress"]
    # its own process group, as a terminal's Ctrl-C reaches the command and its decode workers
    process = subprocess.Popen(as_at_a_terminal(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT, start_new_session=True)
    started, stored = time.time(), []  # images stored at each look
    while time.time() < started + 300 and process.poll() is None:
        stored.append(len(image_rows(state)) if state.exists() else 0)
        if 0 < stored[-1] < n:
            break
        time.sleep(0.05)
    if process.poll() is not None:
        pytest.fail(f"the run ended before the stop was sent: {len(stored)} looks in {time.time() - started:.1f} s "
                    f"saw {sorted(set(stored))} images stored; its stderr: {process.communicate()[1]}")
    workers = process_tree(process.pid)[1:]
    os.killpg(process.pid, stop)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == code, stderr
    assert stderr.strip().splitlines() == [f"{word}: no report written; the images scored so far "
                                           f"are kept in {state}"]
    gone_by = time.time() + 10
    while time.time() < gone_by and any(alive(pid) for pid in workers):
        time.sleep(0.2)
    assert workers and not any(alive(pid) for pid in workers), "decode workers outlived the run"
    assert not (tmp_path / "r1.csv").exists()
    assert json.loads(log.read_text().splitlines()[-1])["event"] == "run_interrupted"
    kept = image_rows(state)
    assert 0 < len(kept) < n, "the run was not caught half-way"
    result = run(studies, "--out", tmp_path / "r2.csv", "--state", state)
    assert result.returncode == 0, result.stderr
    assert len(rows(tmp_path / "r2.csv")) == n
    after = image_rows(state)
    assert all(after[rel] == kept[rel] for rel in kept)  # nothing scored twice


def test_ctrl_c_while_the_decode_workers_start_is_one_line_too(tmp_path):
    studies = make_studies(tmp_path / "studies", 4)
    args = [sys.executable, str(ROOT / "screen.py"), str(studies), "--out", str(tmp_path / "r.csv"),
            "--no-progress"]
    process = subprocess.Popen(as_at_a_terminal(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT, start_new_session=True)

    def decode_worker_started():
        for pid in process_tree(process.pid)[1:]:
            try:
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
            except OSError:
                pass
        return False

    deadline = time.time() + 300
    while time.time() < deadline and not decode_worker_started() and process.poll() is None:
        time.sleep(0.005)
    time.sleep(0.1)  # the worker is still importing its modules
    os.killpg(process.pid, signal.SIGINT)
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == 130 and stderr.strip().splitlines() == ["interrupted: no report written"]


def test_a_stop_while_the_report_and_state_are_written_lets_them_finish():
    """Else the report would be written and the state not know of it: the next run would report
    those studies again, and the exit code would say no report was written."""
    probe = """
import os, signal, time
from pneumonia_batch.screening import _stop_signals_held
handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
with _stop_signals_held():
    os.kill(os.getpid(), signal.SIGINT)  # a KeyboardInterrupt, outside
    os.kill(os.getpid(), signal.SIGTERM)  # the end of this process, outside
    time.sleep(0.1)
    print("report and state written")
print((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers)
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["report and state written", "True"]


def test_study_still_arriving_is_deferred_then_picked_up(tmp_path):
    studies = make_studies(tmp_path / "studies", 2)
    shutil.copy(studies / "child001" / "cxr.jpeg", studies / "child001" / "lateral.jpeg")
    os.utime(studies / "child001" / "lateral.jpeg", (OLD, OLD))
    os.utime(studies / "child001" / "cxr.jpeg")  # just copied in
    state = tmp_path / "state.db"
    result = run(studies, "--out", tmp_path / "r1.csv", "--state", state, "--min-age", "60")
    assert "1 studies scored" in result.stderr  # the monitor watches the deferred count go down
    assert "0 skipped, 1 deferred, 0 file errors" in result.stderr
    first = {r["study_id"]: (r["status"], r["reason"]) for r in rows(tmp_path / "r1.csv")}
    assert first == {"child000": ("scored", ""), "child001": (
        "deferred", "deferred: modified less than 60 s ago (1); "
                    "deferred: waiting for child001/cxr.jpeg, modified less than 60 s ago (1)")}
    os.utime(studies / "child001" / "cxr.jpeg", (OLD, OLD))
    result = run(studies, "--out", tmp_path / "r2.csv", "--state", state, "--min-age", "60")
    assert {r["study_id"]: r["status"] for r in rows(tmp_path / "r2.csv")} == {"child001": "scored"}
    assert "1 studies scored" in result.stderr and "deferred" not in result.stderr



def test_a_reported_study_deferred_by_a_new_file_is_reported_once_it_settles(tmp_path):
    """A file that is not an X-ray (skipped, and so remembered at once) still being copied into a
    study reported last night: deferred tonight, reported again the next night, not forgotten."""
    studies = make_studies(tmp_path / "studies", 2)
    state = tmp_path / "state.db"
    run(studies, "--out", tmp_path / "r1.csv", "--state", state, "--min-age", "60")
    notes = studies / "child000" / "notes.txt"
    notes.write_text("clinical question: pneumonia? " * 8)  # too long, and not DICOM, to be one cut short
    half_a_minute_ago = time.time() - 30
    os.utime(notes, (half_a_minute_ago, half_a_minute_ago))  # and left alone since: the same file
    run(studies, "--out", tmp_path / "r2.csv", "--state", state, "--min-age", "60")
    assert [(r["study_id"], r["status"]) for r in rows(tmp_path / "r2.csv")] == [("child000", "deferred")]
    run(studies, "--out", tmp_path / "r3.csv", "--state", state, "--min-age", "10")
    third = rows(tmp_path / "r3.csv")
    assert [(r["study_id"], r["status"], r["n_scored"]) for r in third] == [("child000", "scored", "1")]
    assert third[0]["probability"] == [r for r in rows(tmp_path / "r1.csv") if r["study_id"] == "child000"][0][
        "probability"]


def test_a_file_dated_ahead_of_the_clock_holds_up_no_study(tmp_path):
    """A modality's clock a day fast, its date kept by the copy: screened tonight, not tomorrow.  A
    file dated half an hour ahead (a file server's clock, within the hour allowed for) still counts
    as arriving, though --min-age is only a minute."""
    studies = make_studies(tmp_path / "studies", 2)
    tomorrow, in_half_an_hour = time.time() + 86400, time.time() + 1800
    os.utime(studies / "child000" / "cxr.jpeg", (tomorrow, tomorrow))
    os.utime(studies / "child001" / "cxr.jpeg", (in_half_an_hour, in_half_an_hour))
    run(studies, "--out", tmp_path / "r.csv", "--min-age", "60")
    assert {r["study_id"]: r["status"] for r in rows(tmp_path / "r.csv")} == {"child000": "scored",
                                                                             "child001": "deferred"}


def test_a_file_renamed_away_while_the_folder_is_read_defers_its_folder(tmp_path, monkeypatch):
    """A receiver renames its temporary file between the listing and the reading: the study it was
    listed in may be missing that image under its new name, so it waits (not scored or flagged, and
    no error), and the next night reports it whole."""
    from click.testing import CliRunner

    from pneumonia_batch import cli, discover

    studies, state = make_studies(tmp_path / "studies", 2), tmp_path / "state.db"
    part = studies / "child001" / ".cxr2.jpeg.part"
    shutil.copy(PNEUMONIA_JPEG, part)
    os.utime(part, (OLD, OLD))
    listing = discover.walk

    def renamed_after_listing(*args, **kwargs):
        found = listing(*args, **kwargs)
        part.rename(studies / "child001" / "cxr2.jpeg")
        return found

    monkeypatch.setattr(discover, "walk", renamed_after_listing)
    args = ["--state", state, "--threshold", "0"]
    result = CliRunner().invoke(cli.screen, [str(a) for a in [studies, "--out", tmp_path / "r1.csv", *args,
                                                                "--no-progress"]])
    assert result.exit_code == 0, result.output
    first = {r["study_id"]: r for r in rows(tmp_path / "r1.csv")}
    assert (first["child000"]["status"], first["child000"]["flagged"]) == ("scored", "true")
    assert (first["child001"]["status"], first["child001"]["flagged"]) == ("deferred", "false")
    assert first["child001"]["reason"] == (f"deferred: {discover.GONE} (1); deferred: waiting for "
                                           f"child001/.cxr2.jpeg.part, {discover.GONE} (1)")
    monkeypatch.undo()
    second = run(studies, "--out", tmp_path / "r2.csv", *args)
    assert second.returncode == 0, second.stderr
    (child001,) = rows(tmp_path / "r2.csv")
    assert (child001["study_id"], child001["status"], child001["n_scored"]) == ("child001", "scored", "2")


def test_a_dicom_study_beside_a_file_renamed_away_waits_for_it(tmp_path):
    """The renamed file may be an instance of the DICOM study in its folder, which cannot be told
    from a name: that study waits, without --min-age too."""
    from pneumonia_batch import discover
    from pneumonia_batch.screening import _defer_arriving

    folder = tmp_path
    save(make_dataset(chest_pixels(64)), folder / "a.dcm")
    save(make_dataset(chest_pixels(64)), folder / "b.dcm.part")
    files = discover.walk(folder)
    (folder / "b.dcm.part").rename(folder / "b.dcm")
    for item in files:
        discover.identify(item)
    studies = discover.group_studies(files)
    _defer_arriving(studies, 0)
    statuses = {f.rel: (f.status, f.reason) for s in studies for f in s.files}
    assert statuses == {"a.dcm": ("deferred", f"waiting for b.dcm.part, {discover.GONE}"),
                        "b.dcm.part": ("deferred", discover.GONE)}


def test_audit_log_has_run_and_file_events(tmp_path):
    studies = make_studies(tmp_path / "studies", 2)
    (studies / "junk.txt").write_text("x")
    log = tmp_path / "audit.jsonl"
    run(studies, "--out", tmp_path / "r.csv", "--log-file", log)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["event"] for e in events][0] == "run_start" and events[-1]["event"] == "run_end"
    files = {e["file"]: e for e in events if e["event"] == "file"}
    assert set(files) == {"child000/cxr.jpeg", "child001/cxr.jpeg", "junk.txt"}
    assert files["junk.txt"]["status"] == "skipped"
    assert 0 <= files["child000/cxr.jpeg"]["probability"] <= 1
    assert events[-1]["counts"]["studies"] == 3 and len({e["run_id"] for e in events}) == 1


def test_export_is_safe_idempotent_and_only_grows(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    pixels = chest_pixels()
    for name, patient in [("a.dcm", "../../etc"), ("b.dcm", "CON"), ("c.dcm", "/abs/olute")]:
        save(make_dataset(pixels, patient_id=patient, WindowCenter=2048, WindowWidth=4096), studies / name)
    export = tmp_path / "review"
    args = ["--threshold", "0", "--export-flagged", export]
    result = run(studies, "--out", tmp_path / "r1.csv", *args)
    assert result.returncode == 0, result.stderr
    folders = sorted(p.name for p in export.iterdir() if p.is_dir())
    assert len(folders) == 3
    assert all(p.resolve().is_relative_to(export.resolve()) for p in export.rglob("*"))
    assert not (tmp_path / "etc").exists()
    assert any(f.startswith("_CON_") for f in folders) and any(f.startswith("etc_") for f in folders)
    for folder in folders:
        content = sorted(p.name for p in (export / folder).iterdir())
        assert content[0].endswith(".dcm") and content[1] == f"overlay_{content[0]}.model-{SHIPPED_SHA[:8]}.png"
        assert content[2] == "result.json"
    overlays = {p: p.stat().st_mtime_ns for p in export.rglob("overlay_*")}
    files = sorted(p for p in export.rglob("*") if p.parent != export)
    run(studies, "--out", tmp_path / "r2.csv", *args)
    assert sorted(p for p in export.rglob("*") if p.parent != export) == files  # nothing added twice
    assert {p: p.stat().st_mtime_ns for p in export.rglob("overlay_*")} == overlays  # not recomputed
    (studies / "a.dcm").unlink()
    run(studies, "--out", tmp_path / "r3.csv", *args)
    with open(export / "worklist.csv", newline="") as handle:
        worklist = list(csv.DictReader(handle))
    assert len(worklist) == 3  # the study whose file is gone stays listed
    probabilities = [float(r["probability"]) for r in worklist]
    assert probabilities == sorted(probabilities, reverse=True)
    page = (export / "index.html").read_text()
    assert page.count('src="data:image/jpeg;base64,') == 3
    for overlay in export.rglob("overlay_*"):
        overlay.write_bytes(b"not a picture")  # the nightly rebuild must not decode overlays again
    result = run(studies, "--out", tmp_path / "r4.csv", *args)
    assert result.returncode == 0, result.stderr
    assert (export / "index.html").read_text() == page


def test_stored_thumbnails_are_reused_until_their_overlay_is_rebuilt(tmp_path):
    studies = make_studies(tmp_path / "studies", 2)
    export = tmp_path / "review"
    args = ["--threshold", "0", "--export-flagged", export]
    assert run(studies, "--out", tmp_path / "r1.csv", *args).returncode == 0
    planted = "data:image/jpeg;base64,planted"  # a thumbnail no overlay would make
    kept, rebuilt = sorted(export.glob("*/result.json"))
    for result_file in (kept, rebuilt):
        result = json.loads(result_file.read_text())
        result["images"][0]["thumbnail"] = planted
        result_file.write_text(json.dumps(result))
    overlay = rebuilt.parent / json.loads(rebuilt.read_text())["images"][0]["overlay"]
    overlay.unlink()
    assert run(studies, "--out", tmp_path / "r2.csv", *args).returncode == 0
    assert json.loads(kept.read_text())["images"][0]["thumbnail"] == planted  # reused, not remade
    assert overlay.is_file()
    fresh = json.loads(rebuilt.read_text())["images"][0]["thumbnail"]
    assert fresh != planted and fresh.startswith("data:image/jpeg;base64,")


def test_damaged_result_files_and_overlays_never_stop_the_export(tmp_path):
    """result.json files are for people too: one edited or damaged by hand, or an overlay that no
    longer reads, costs that study its picture at most, never the run, the report or other studies."""
    studies = tmp_path / "studies"
    studies.mkdir()
    for index in range(3):
        save(make_dataset(chest_pixels(), patient_id=f"P{index}", WindowCenter=2048, WindowWidth=4096),
             studies / f"{index}.dcm")
    export = tmp_path / "review"
    args = ["--threshold", "0", "--export-flagged", export]
    assert run(studies, "--out", tmp_path / "r1.csv", *args).returncode == 0
    folders = {p.name.split("_")[0]: p for p in export.iterdir() if p.is_dir()}
    (folders["P0"] / "result.json").write_text('{"images": 5, "export_version": 1}')
    damaged = json.loads((folders["P1"] / "result.json").read_text())
    for image in damaged["images"]:
        image["thumbnail"] = 7
    (folders["P1"] / "result.json").write_text(json.dumps(damaged))
    for overlay in folders["P1"].glob("overlay_*"):
        overlay.write_bytes(b"not a picture")
    (folders["P2"] / "result.json").write_text('{"export_version": 1, "images": null, "probability": "high"}')
    (studies / "2.dcm").unlink()  # so P2 is not exported again: its damaged file stays as it is

    result = run(studies, "--out", tmp_path / "r2.csv", *args)
    assert result.returncode == 0, result.stderr
    assert len(rows(tmp_path / "r2.csv")) == 2
    repaired = json.loads((folders["P0"] / "result.json").read_text())
    assert repaired["images"][0]["thumbnail"].startswith("data:image/jpeg;base64,")
    (image,) = json.loads((folders["P1"] / "result.json").read_text())["images"]
    assert "thumbnail" not in image and image["thumbnail_error"].startswith("UnidentifiedImageError")
    page = (export / "index.html").read_text()
    assert page.count('class="card"') == 2  # P2's unreadable result is left out, not fatal
    assert page.count("<img ") == 1 and f'href="{folders["P1"].name}/{image["overlay"]}"' in page


def test_review_page_in_a_real_browser(tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Chromium is not installed")
    studies = tmp_path / "studies"
    shutil.copytree(EXAMPLES, studies)
    export = tmp_path / "review"
    result = run(studies, "--out", tmp_path / "r.csv", "--export-flagged", export)
    assert result.returncode == 0, result.stderr
    flagged = [r for r in rows(tmp_path / "r.csv") if r["flagged"] == "true"]
    assert flagged
    errors = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("requestfailed", lambda r: errors.append(f"request failed {r.url}"))
        page.goto((export / "index.html").as_uri())
        cards = page.locator(".card")
        assert cards.count() == len(flagged)
        shown = [float(t) for t in page.locator(".prob").all_inner_texts()]
        assert shown == sorted(shown, reverse=True)
        assert page.locator(".card img").count() == sum(int(r["n_scored"]) for r in flagged)
        widths = page.eval_on_selector_all(".card img", "imgs => imgs.map(i => i.naturalWidth)")
        assert all(w > 0 for w in widths)
        # each image's own probability under it: the card's is its study's highest, and every
        # heatmap is scaled to its own image, so a low-scoring image of a flagged study shows red too
        expected = []
        for folder in sorted(p for p in export.iterdir() if p.is_dir()):
            result = json.loads((folder / "result.json").read_text())
            expected += [f"{i['file']}: {i['probability']:.3f}" + (" (below threshold)" if i["probability"] <
                         result["threshold"] else "") for i in result["images"] if i.get("overlay")]
        assert sorted(page.locator(".card figcaption").all_inner_texts()) == sorted(expected)
        assert "NORMAL2-IM-1427-0001.jpeg" in " ".join(expected) and "(below threshold)" in " ".join(expected)
        page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
        browser.close()
    assert errors == []


def test_an_error_is_retried_on_the_next_run(tmp_path):
    """A file that failed once is tried again, even when its size and mtime did not change."""
    studies = make_studies(tmp_path / "studies", 2)
    good = (studies / "child001" / "cxr.jpeg").read_bytes()
    broken = good[:600] + bytes(len(good) - 600)  # same size, image data wiped
    (studies / "child001" / "cxr.jpeg").write_bytes(broken)
    os.utime(studies / "child001" / "cxr.jpeg", (OLD, OLD))
    state = tmp_path / "state.db"
    first = run(studies, "--out", tmp_path / "r1.csv", "--state", state)
    assert first.returncode == 1
    assert {r["study_id"]: r["status"] for r in rows(tmp_path / "r1.csv")} == {
        "child000": "scored", "child001": "error"}
    (studies / "child001" / "cxr.jpeg").write_bytes(good)  # repaired in place, mtime put back
    os.utime(studies / "child001" / "cxr.jpeg", (OLD, OLD))
    second = run(studies, "--out", tmp_path / "r2.csv", "--state", state)
    assert second.returncode == 0, second.stderr
    report = rows(tmp_path / "r2.csv")
    assert [(r["study_id"], r["status"]) for r in report] == [("child001", "scored")]
    assert float(report[0]["probability"]) > 0


def test_a_lossless_copy_arriving_later_replaces_the_scored_lossy_one(tmp_path):
    from pydicom.uid import JPEG2000Lossless

    studies = tmp_path / "studies"
    (studies / "study").mkdir(parents=True)
    pixels = chest_pixels(256)
    uids = {"study_uid": "1.2.826.0.1.3680043.8.498.1", "sop_uid": "1.2.826.0.1.3680043.8.498.2"}
    save(make_dataset(pixels, LossyImageCompression="01", **uids), studies / "study" / "lossy.dcm")
    state = tmp_path / "state.db"
    run(studies, "--out", tmp_path / "r1.csv", "--state", state)
    save(make_dataset(pixels, **uids), studies / "study" / "lossless.dcm", JPEG2000Lossless,
         generate_instance_uid=False)
    result = run(studies, "--out", tmp_path / "r2.csv", "--state", state)
    assert result.returncode == 0, result.stderr
    (study,) = rows(tmp_path / "r2.csv")
    assert study["n_scored"] == "1"
    assert "duplicate_instance_of study/lossless.dcm" in study["reason"]
    third = run(studies, "--out", tmp_path / "r3.csv", "--state", state)
    assert third.returncode == 0 and rows(tmp_path / "r3.csv") == []  # the stored duplicate stands



def test_an_instance_re_sent_under_a_corrected_study_is_scored_for_that_study(tmp_path):
    """The archive corrects a study's patient and re-sends its X-ray with the same SOPInstanceUID under
    a new StudyInstanceUID: the corrected study gets the score, not a skip naming last night's file."""
    studies = tmp_path / "studies"
    studies.mkdir()
    pixels, sop = chest_pixels(256), "1.2.826.0.1.3680043.8.498.2"
    save(make_dataset(pixels, study_uid="1.2.826.0.1.3680043.8.498.100", sop_uid=sop, patient_id="WRONG"),
         studies / "old.dcm")
    state = tmp_path / "state.db"
    run(studies, "--out", tmp_path / "r1.csv", "--state", state)
    save(make_dataset(pixels, study_uid="1.2.826.0.1.3680043.8.498.200", sop_uid=sop, patient_id="RIGHT"),
         studies / "new.dcm", generate_instance_uid=False)
    result = run(studies, "--out", tmp_path / "r2.csv", "--state", state)
    assert result.returncode == 0, result.stderr
    (corrected,) = rows(tmp_path / "r2.csv")
    assert (corrected["patient_id"], corrected["status"], corrected["n_scored"]) == ("RIGHT", "scored", "1")
    assert float(corrected["probability"]) == pytest.approx(float(rows(tmp_path / "r1.csv")[0]["probability"]),
                                                            abs=1e-6)


def test_a_note_is_not_repeated_when_a_stored_copy_is_scored_again(tmp_path):
    """A two-frame lossy instance scored, set aside for a lossless copy, then scored again when that
    copy goes: its note says "first of 2 frames" once, after what pydicom repaired in its header."""
    studies, state = tmp_path / "studies", tmp_path / "state.db"
    (studies / "study").mkdir(parents=True)
    frames = np.stack([chest_pixels(128), chest_pixels(128)])
    uids = {"study_uid": "1.2.826.0.1.3680043.8.498.1", "sop_uid": "1.2.826.0.1.3680043.8.498.2"}
    lossy = make_dataset(frames, LossyImageCompression="01", SpecificCharacterSet="ISO_IR 192", **uids)
    lossy.PatientID = b"M\xfcller"  # Latin-1 bytes in a UTF-8 header
    save(lossy, studies / "study" / "lossy.dcm")
    run(studies, "--out", tmp_path / "r1.json", "--state", state)
    save(make_dataset(frames, **uids), studies / "study" / "lossless.dcm", generate_instance_uid=False)
    run(studies, "--out", tmp_path / "r2.json", "--state", state)
    (studies / "study" / "lossless.dcm").unlink()
    run(studies, "--out", tmp_path / "r3.json", "--state", state)
    (study,) = json.loads((tmp_path / "r3.json").read_text())["studies"]
    assert [(i["file"], i["status"], i["note"]) for i in study["images"]] == [
        ("study/lossy.dcm", "scored", "header: Failed to decode byte string with encoding 'UTF8' - using "
                                      "replacement characters in decoded string; first of 2 frames")]

def test_a_damaged_copy_of_an_instance_never_hides_an_intact_one(tmp_path):
    studies = tmp_path / "studies"
    (studies / "study").mkdir(parents=True)
    uids = {"study_uid": "1.2.826.0.1.3680043.8.498.1", "sop_uid": "1.2.826.0.1.3680043.8.498.2"}
    intact = save(make_dataset(chest_pixels(256), **uids), studies / "study" / "b_intact.dcm")
    run(studies, "--out", tmp_path / "alone.csv")
    cut = studies / "study" / "a_cut_short.dcm"  # found before the intact copy, and as lossless
    cut.write_bytes(intact.read_bytes()[:5000])
    flipped = chest_pixels(256)[::-1]  # a lossy copy found first of all, telling its score apart
    save(make_dataset(flipped, LossyImageCompression="01", **uids), studies / "study" / "0_lossy.dcm")
    state = tmp_path / "state.db"
    first = run(studies, "--out", tmp_path / "r1.csv", "--state", state)
    assert first.returncode == 1, first.stderr  # the damaged copy is an error row
    (study,) = rows(tmp_path / "r1.csv")
    assert study["status"] == "scored" and study["n_scored"] == "1"
    assert study["probability"] == rows(tmp_path / "alone.csv")[0]["probability"]  # the intact copy's
    assert "error: ValueError: pixel data truncated" in study["reason"]
    assert "duplicate_instance_of study/b_intact.dcm (1)" in study["reason"]  # the lossy copy
    scored = image_rows(state)["study/b_intact.dcm"]
    second = run(studies, "--out", tmp_path / "r2.csv", "--state", state)
    assert second.returncode == 0, second.stderr  # the copy scored before is kept, not decoded again
    assert image_rows(state)["study/b_intact.dcm"] == scored
    assert "duplicate_instance_of study/b_intact.dcm" in rows(tmp_path / "r2.csv")[0]["reason"]


@pytest.mark.parametrize("night_2", ["deleted", "overwritten_by_another_instance"])
def test_a_stored_duplicate_whose_scored_copy_is_gone_is_scored(night_2, tmp_path):
    studies = tmp_path / "studies"
    (studies / "study").mkdir(parents=True)
    uids = {"study_uid": "1.2.826.0.1.3680043.8.498.1", "sop_uid": "1.2.826.0.1.3680043.8.498.2"}
    save(make_dataset(chest_pixels(256), **uids), studies / "study" / "a_lossless.dcm")
    save(make_dataset(chest_pixels(256)[::-1], LossyImageCompression="01", **uids),
         studies / "study" / "b_lossy.dcm")
    state = tmp_path / "state.db"
    run(studies, "--out", tmp_path / "r1.csv", "--state", state)
    assert image_rows(state)["study/b_lossy.dcm"][1] is None  # skipped as the duplicate
    new_view = make_dataset(chest_pixels(256)[:, ::-1], study_uid=uids["study_uid"])  # another instance
    if night_2 == "deleted":
        (studies / "study" / "a_lossless.dcm").unlink()
        new_name = "c_new.dcm"
    else:  # a re-send that reuses file names
        new_name = "a_lossless.dcm"
    save(new_view, studies / "study" / new_name)
    result = run(studies, "--out", tmp_path / "r2.csv", "--state", state)
    assert result.returncode == 0, result.stderr
    (study,) = rows(tmp_path / "r2.csv")
    assert study["n_scored"] == "2" and study["reason"] == ""
    after = image_rows(state)
    assert float(study["probability"]) == pytest.approx(max(after["study/b_lossy.dcm"][1],
                                                            after[f"study/{new_name}"][1]), abs=1e-6)


def test_a_stored_duplicate_is_held_to_the_header_filter_of_the_run(tmp_path):
    studies = tmp_path / "studies"
    (studies / "study").mkdir(parents=True)
    uids = {"study_uid": "1.2.826.0.1.3680043.8.498.1", "sop_uid": "1.2.826.0.1.3680043.8.498.2"}
    save(make_dataset(chest_pixels(256), view="LL", **uids), studies / "study" / "a_lossless.dcm")
    save(make_dataset(chest_pixels(256)[::-1], view="LL", LossyImageCompression="01", **uids),
         studies / "study" / "b_lossy.dcm")
    state = tmp_path / "state.db"
    run(studies, "--out", tmp_path / "r1.csv", "--state", state, "--no-header-filter")
    assert [r["n_scored"] for r in rows(tmp_path / "r1.csv")] == ["1"]
    run(studies, "--out", tmp_path / "r2.csv", "--state", state)  # the lateral view is filtered again
    (study,) = rows(tmp_path / "r2.csv")
    assert (study["n_scored"], study["status"], study["reason"]) == ("0", "skipped", "not_frontal_view (2)")
    run(studies, "--out", tmp_path / "r3.csv", "--state", state)
    assert rows(tmp_path / "r3.csv") == []  # and stays decided


def test_export_copies_symlinked_files_and_a_failed_export_still_writes_the_report(tmp_path):
    studies = make_studies(tmp_path / "studies", 1)
    os.symlink(studies / "child000" / "cxr.jpeg", studies / "child000" / "again.jpeg")
    export = tmp_path / "review"
    result = run(studies, "--out", tmp_path / "r1.csv", "--threshold", "0", "--export-flagged", export)
    assert result.returncode == 0, result.stderr
    (folder,) = [p for p in export.iterdir() if p.is_dir()]
    exported = [p for p in folder.iterdir() if p.name.endswith(".jpeg")]
    assert len(exported) == 2 and not any(p.is_symlink() for p in exported)
    assert all(p.read_bytes() == (studies / "child000" / "cxr.jpeg").read_bytes() for p in exported)

    make_studies(tmp_path / "more", 3)
    for name in ("child001", "child002"):
        shutil.move(tmp_path / "more" / name, studies / name)
    shutil.rmtree(folder)  # child000's export folder is now taken by a file
    folder.write_text("not a folder")
    run(studies, "--out", tmp_path / "r2.csv", "--threshold", "0", "--export-flagged", export)  # child001's folder
    (linked,) = [p for p in export.iterdir()
                 if p.is_dir() and json.loads((p / "result.json").read_text())["study_id"] == "child001"]
    shutil.rmtree(linked)  # and child001's is a link out of the export
    (tmp_path / "elsewhere").mkdir()
    linked.symlink_to(tmp_path / "elsewhere")
    result = run(studies, "--out", tmp_path / "r2.csv", "--threshold", "0", "--export-flagged", export)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].endswith(  # the study, not only its folder's hash
        f"; review export failed: 2 of 3 flagged studies not exported whole (first: study child000: cannot "
        f"make {folder}: File exists); 2 without a study folder")
    assert [r["status"] for r in rows(tmp_path / "r2.csv")] == ["scored"] * 3
    assert folder.read_text() == "not a folder" and list((tmp_path / "elsewhere").iterdir()) == []
    # the study it could export is on the night's worklist and page all the same
    assert [r["study_id"] for r in rows(export / "worklist.csv")] == ["child002"]
    assert 'data-study="child002"' in (export / "index.html").read_text()


def model_copy(folder: Path, keras_bytes: bytes) -> Path:
    """A model file with other bytes, hence another sha256, beside the shipped TFLite conversion."""
    model = folder / "m.keras"
    model.write_bytes(keras_bytes)
    shutil.copy(ROOT / "weights" / "densenet121_pneumonia.tflite", folder / "m.tflite")
    meta = json.loads((ROOT / "weights" / "densenet121_pneumonia.json").read_text())
    meta["sha256"] = meta["tflite"]["converted_from_sha256"] = hashlib.sha256(keras_bytes).hexdigest()
    meta["tflite"]["file"] = "m.tflite"
    (folder / "m.json").write_text(json.dumps(meta))
    return model


def test_a_keras_model_the_export_cannot_load_still_leaves_the_report(tmp_path):
    """Screening runs the TFLite conversion; the heat maps need the Keras file, damaged here."""
    studies = make_studies(tmp_path / "studies", 1)
    model = model_copy(tmp_path, b"not a keras archive")
    result = run(studies, "--out", tmp_path / "r.csv", "--model", model, "--threshold", "0",
                 "--export-flagged", tmp_path / "review")
    assert result.returncode == 1, result.stderr
    assert "review export failed: cannot load model" in result.stderr.splitlines()[-1]
    assert [r["status"] for r in rows(tmp_path / "r.csv")] == ["scored"]


def test_the_audit_log_outlives_a_line_cut_short_and_says_why_a_run_failed(tmp_path):
    """A disk that filled mid-line left the last run's line unended: this run's lines start anew.
    A run stopped by a fatal error (a TFLite file that is not the one pinned: exit 4) says so."""
    studies = make_studies(tmp_path / "studies", 1)
    log = tmp_path / "audit.jsonl"
    cut_short = '{"time": "2026-11-23T01:30:09.000+00:00", "event": "run_end", "counts": {"flagged": '
    log.write_text(cut_short)
    model = model_copy(tmp_path, b"a model file")
    with open(tmp_path / "m.tflite", "ab") as handle:
        handle.write(b"\0")
    result = run(studies, "--out", tmp_path / "r.csv", "--model", model, "--log-file", log)
    assert result.returncode == 4 and "m.tflite does not match the sha256" in result.stderr, result.stderr
    first, *lines = log.read_text().splitlines()
    assert first == cut_short
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events] == ["run_start", "run_failed"]
    assert events[-1]["error"] == "m.tflite does not match the sha256 recorded in the model's metadata"


def test_a_log_read_through_a_fifo_waits_for_a_slow_reader(tmp_path):
    """The log is opened without blocking, so that a FIFO nobody reads is refused; once open, its
    writes must block again: a night's log outgrows a pipe's 64 KB while a reader is busy."""
    from pneumonia_batch.atomic import CannotWrite
    from pneumonia_batch.screening import AuditLog

    fifo, out = tmp_path / "log.fifo", tmp_path / "read.jsonl"
    os.mkfifo(fifo)
    reader = subprocess.Popen([sys.executable, "-c", "import sys, time; log = open(sys.argv[1], 'rb'); "
                               "time.sleep(1); open(sys.argv[2], 'wb').write(log.read())", str(fifo), str(out)])
    for _ in range(100):  # until the reader has the FIFO open
        try:
            audit = AuditLog(fifo, "run-1")
            break
        except CannotWrite:
            time.sleep(0.05)
    else:
        pytest.fail("the reader never opened the FIFO")
    for n in range(2000):
        audit.event("file", file=f"study{n:04d}/image.dcm", status="scored", reason="", probability=0.5, note="")
    audit.close()
    assert reader.wait(timeout=60) == 0
    assert len(out.read_text().splitlines()) == 2000 and out.stat().st_size > 3 * 65536


def test_a_night_stopped_before_scoring_is_in_the_audit_log_with_its_error(tmp_path):
    """A missing model, a report folder gone, a damaged state, a lock held: each night is in the log,
    with the error stderr gave, so an audit from the log alone misses none."""
    studies = make_studies(tmp_path / "studies", 1)
    damaged = tmp_path / "damaged.db"
    damaged.write_text("not a database\n")
    held = tmp_path / "held.db"
    nights = [
        (["--out", tmp_path / "r.csv", "--model", tmp_path / "none.keras"], 4, ["run_failed"]),
        (["--out", tmp_path / "gone" / "r.csv"], 4, ["run_failed"]),
        (["--out", tmp_path / "r.csv", "--state", damaged], 4, ["run_failed"]),
        (["--out", tmp_path / "r.csv", "--state", held], 3, ["run_failed"]),
    ]
    for n, (args, code, expected) in enumerate(nights):
        log = tmp_path / f"audit{n}.jsonl"
        with StateLock(held):
            result = run(studies, *args, "--log-file", log)
        assert result.returncode == code, result.stderr
        events = [json.loads(line) for line in log.read_text().splitlines()]
        assert [e["event"] for e in events] == expected
        assert f"{events[-1]['error']}\n" == result.stderr.removeprefix("error: ")
        assert len({e["run_id"] for e in events}) == 1
        assert events[-1]["directory"] == str(studies)
        if args[-1] == damaged:  # SQLite does not say which file
            assert events[-1]["error"] == f"--state {damaged}: file is not a database"
    assert events[-1]["error"].startswith(f"another run holds {held}.lock (pid {os.getpid()},")
    if Path("/dev/full").exists():  # a log that cannot take the line: the lock's exit code all the same
        with StateLock(held):
            result = run(studies, "--out", tmp_path / "r.csv", "--state", held, "--log-file", "/dev/full")
        assert result.returncode == 3 and result.stderr.startswith(f"error: another run holds {held}.lock")
    assert not (tmp_path / "r.csv").exists()


def test_an_export_copy_stopped_half_way_leaves_no_truncated_file(tmp_path, monkeypatch):
    from pneumonia_batch import export

    source = tmp_path / "link.jpeg"
    source.symlink_to(NORMAL_JPEG)  # a symlink's content is copied, never the link
    target = tmp_path / "review" / "0123_cxr.jpeg"
    target.parent.mkdir()

    def stopped_half_way(src, dst):
        Path(dst).write_bytes(Path(src).read_bytes()[:1000])
        raise KeyboardInterrupt

    monkeypatch.setattr(export.shutil, "copyfile", stopped_half_way)
    with pytest.raises(KeyboardInterrupt):
        export._copy(source, target)
    assert list(target.parent.iterdir()) == []
    monkeypatch.undo()
    export._copy(source, target)  # the next run
    assert target.read_bytes() == NORMAL_JPEG.read_bytes() and not target.is_symlink()


def test_flagged_studies_a_failed_export_missed_are_exported_by_the_next_run(tmp_path):
    studies = make_studies(tmp_path / "studies", 2)
    state = tmp_path / "state.db"
    blocker = tmp_path / "share"
    blocker.write_text("the review share is not mounted")
    args = ["--state", state, "--threshold", "0", "--export-flagged", blocker / "review"]
    first = run(studies, "--out", tmp_path / "r1.csv", *args)
    assert first.returncode == 1 and "review export failed" in first.stderr
    assert "(2 flagged studies of this run not exported)" in first.stderr
    assert [r["flagged"] for r in rows(tmp_path / "r1.csv")] == ["true", "true"]
    blocker.unlink()
    blocker.mkdir()
    second = run(studies, "--out", tmp_path / "r2.csv", *args)
    assert second.returncode == 0, second.stderr
    assert sorted(r["study_id"] for r in rows(tmp_path / "r2.csv")) == ["child000", "child001"]
    with open(blocker / "review" / "worklist.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 2
    third = run(studies, "--out", tmp_path / "r3.csv", *args)
    assert third.returncode == 0 and rows(tmp_path / "r3.csv") == []  # exported once, then done

    shutil.copy(PNEUMONIA_JPEG, studies / "child000" / "second.jpeg")  # a study exported before grows
    os.utime(studies / "child000" / "second.jpeg", (OLD, OLD))
    shutil.move(blocker, tmp_path / "unmounted")
    blocker.write_text("the review share is not mounted")
    fourth = run(studies, "--out", tmp_path / "r4.csv", *args)
    assert fourth.returncode == 1 and [r["n_scored"] for r in rows(tmp_path / "r4.csv")] == ["2"]
    blocker.unlink()
    shutil.move(tmp_path / "unmounted", blocker)
    fifth = run(studies, "--out", tmp_path / "r5.csv", *args)
    assert fifth.returncode == 0 and [r["study_id"] for r in rows(tmp_path / "r5.csv")] == ["child000"]
    (folder,) = [p for p in (blocker / "review").iterdir() if p.is_dir() and "child000" in
                 json.loads((p / "result.json").read_text())["study_id"]]
    assert json.loads((folder / "result.json").read_text())["n_scored"] == 2


@pytest.mark.parametrize("written", [100, 200, 450])  # before the DICM prefix, in the header, before the UID
def test_a_file_caught_half_written_defers_its_folder(tmp_path, written):
    """The second instance of a study is still being copied: its header cannot name the study yet."""
    studies = tmp_path / "studies"
    (studies / "study").mkdir(parents=True)
    uid = "1.2.826.0.1.3680043.8.498.1"
    save(make_dataset(chest_pixels(), study_uid=uid), studies / "study" / "1.dcm")
    os.utime(studies / "study" / "1.dcm", (OLD, OLD))
    whole = save(make_dataset(chest_pixels(), study_uid=uid, view="AP"), tmp_path / "2.dcm").read_bytes()
    (studies / "study" / "2.dcm").write_bytes(whole[:written])
    state = tmp_path / "state.db"
    first = run(studies, "--out", tmp_path / "r1.csv", "--state", state, "--min-age", "60")
    assert first.returncode == 0, first.stderr
    assert {r["status"] for r in rows(tmp_path / "r1.csv")} == {"deferred"}
    (studies / "study" / "2.dcm").write_bytes(whole)
    os.utime(studies / "study" / "2.dcm", (OLD, OLD))
    second = run(studies, "--out", tmp_path / "r2.csv", "--state", state, "--min-age", "60")
    assert second.returncode == 0, second.stderr
    (study,) = rows(tmp_path / "r2.csv")
    assert (study["study_id"], study["status"], study["n_scored"]) == (uid, "scored", "2")


def test_a_fresh_file_that_cannot_be_dicom_does_not_hold_up_its_folder(tmp_path):
    """A receiver's log, appended to all night beside the instances, can never name a study."""
    studies = tmp_path / "studies"
    studies.mkdir()
    uids = ["1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"]
    for uid in uids:
        os.utime(save(make_dataset(chest_pixels(), study_uid=uid), studies / f"{uid}.dcm"), (OLD, OLD))
    (studies / "storescp.log").write_text("I: Association Received 10.0.0.7\n" * 20)
    result = run(studies, "--out", tmp_path / "r1.csv", "--min-age", "60")
    assert result.returncode == 0, result.stderr
    assert {r["study_id"]: (r["status"], r["reason"]) for r in rows(tmp_path / "r1.csv")} == {
        uids[0]: ("scored", ""), uids[1]: ("scored", ""), "storescp.log": ("skipped", "not_an_image (1)")}
    # an instance caught before its DICM prefix could belong to either study: both wait, and say for what
    whole = save(make_dataset(chest_pixels(), study_uid=uids[0]), tmp_path / "3.dcm").read_bytes()
    (studies / "3.dcm").write_bytes(whole[:100])
    result = run(studies, "--out", tmp_path / "r2.csv", "--min-age", "60")
    assert result.returncode == 0, result.stderr
    waiting = ("deferred", "deferred: waiting for 3.dcm, modified less than 60 s ago (1)")
    assert {r["study_id"]: (r["status"], r["reason"]) for r in rows(tmp_path / "r2.csv")} == {
        uids[0]: waiting, uids[1]: waiting, "3.dcm": ("deferred", "deferred: modified less than 60 s ago (1)"),
        "storescp.log": ("skipped", "not_an_image (1)")}


def test_a_changed_header_filter_decides_stored_files_again(tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    save(make_dataset(chest_pixels(), view="LL"), studies / "lateral.dcm")
    os.utime(studies / "lateral.dcm", (OLD, OLD))
    state = tmp_path / "state.db"
    run(studies, "--out", tmp_path / "r1.csv", "--state", state)
    assert [r["reason"] for r in rows(tmp_path / "r1.csv")] == ["not_frontal_view (1)"]
    run(studies, "--out", tmp_path / "r2.csv", "--state", state, "--no-header-filter")
    assert [r["status"] for r in rows(tmp_path / "r2.csv")] == ["scored"]
    run(studies, "--out", tmp_path / "r3.csv", "--state", state)
    assert [r["reason"] for r in rows(tmp_path / "r3.csv")] == ["not_frontal_view (1)"]


def test_a_file_name_in_another_encoding_gets_its_row_and_state(tmp_path):
    """A Latin-1 name from a Windows share is not valid UTF-8: shown with \\x escapes, never a crash."""
    studies = make_studies(tmp_path / "studies", 1)
    name = os.fsdecode(b"M\xfcller.jpeg")
    shutil.copy(PNEUMONIA_JPEG, studies / "child000" / name)
    os.utime(studies / "child000" / name, (OLD, OLD))
    state = tmp_path / "state.db"
    for report in ("r1.csv", "r2.csv"):
        result = run(studies, "--out", tmp_path / report, "--state", state, "--log-file", tmp_path / "audit.jsonl")
        assert result.returncode == 0, result.stderr
    (study,) = rows(tmp_path / "r1.csv")
    assert study["files"] == "child000/M\\xfcller.jpeg;child000/cxr.jpeg" and study["n_scored"] == "2"
    assert rows(tmp_path / "r2.csv") == []  # remembered under the same name


def test_a_studies_folder_named_in_another_encoding_keeps_its_state(tmp_path):
    studies = make_studies(tmp_path / os.fsdecode(b"Sch\xfctz"), 1)
    state = tmp_path / "state.db"
    for report in ("r1.csv", "r2.csv"):
        result = run(studies, "--out", tmp_path / report, "--state", state)
        assert result.returncode == 0, result.stderr
    assert len(rows(tmp_path / "r1.csv")) == 1 and rows(tmp_path / "r2.csv") == []


def test_a_damaged_state_database_is_fatal_with_a_message(tmp_path):
    studies = make_studies(tmp_path / "studies", 1)
    (tmp_path / "state.db").write_text("not a database")
    result = run(studies, "--out", tmp_path / "r.csv", "--state", tmp_path / "state.db")
    assert result.returncode == 4
    assert "error: --state" in result.stderr and "not a database" in result.stderr
    assert "Traceback" not in result.stderr


def test_studies_inside_the_export_folder_are_still_screened(tmp_path):
    studies = make_studies(tmp_path / "srv" / "incoming", 1)
    result = run(studies, "--out", tmp_path / "r.csv", "--threshold", "0", "--export-flagged", tmp_path / "srv")
    assert result.returncode == 0, result.stderr
    assert [r["status"] for r in rows(tmp_path / "r.csv")] == ["scored"]
    same = run(studies, "--out", tmp_path / "r.csv", "--export-flagged", studies)
    assert same.returncode == 2 and "must not be DIRECTORY itself" in same.stderr


def test_the_export_copies_only_regular_files_inside_the_screened_folder(tmp_path):
    """A link out of the folder (another patient's notes, /dev/zero) and a FIFO stay where they are."""
    studies = make_studies(tmp_path / "studies", 1)
    study = studies / "child000"
    (tmp_path / "outside.txt").write_text("another patient's notes")
    os.symlink(tmp_path / "outside.txt", study / "notes.txt")
    os.symlink("/dev/zero", study / "zeros.raw")
    os.mkfifo(study / "pipe")
    os.chmod(study / "cxr.jpeg", 0o600)
    export = tmp_path / "review"
    result = run(studies, "--out", tmp_path / "r.csv", "--threshold", "0", "--export-flagged", export)
    assert result.returncode == 1, result.stderr  # the FIFO is an error row ("empty file"), not an export failure
    assert "review export failed" not in result.stderr
    (folder,) = [p for p in export.iterdir() if p.is_dir()]
    images = {i["file"]: i for i in json.loads((folder / "result.json").read_text())["images"]}
    assert images["child000/notes.txt"]["not_exported"] == "outside the screened folder"
    assert images["child000/zeros.raw"]["not_exported"] == "outside the screened folder"
    assert images["child000/pipe"]["not_exported"] == "not a regular file"
    assert all(images[f]["exported_as"] is None for f in ("child000/notes.txt", "child000/zeros.raw", "child000/pipe"))
    copied = folder / images["child000/cxr.jpeg"]["exported_as"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [copied.name, images["child000/cxr.jpeg"]["overlay"], "result.json"])
    source = (study / "cxr.jpeg").stat()
    # a copy, not a hard link: the archive's file shares neither its permissions nor later edits
    assert copied.stat().st_ino != source.st_ino and source.st_nlink == 1
    assert copied.stat().st_mode & 0o777 != 0o600 and copied.stat().st_mtime_ns == source.st_mtime_ns
    assert copied.read_bytes() == (study / "cxr.jpeg").read_bytes()


def test_links_placed_in_the_review_folder_are_replaced_never_written_through(tmp_path):
    """The review share may be writable by many: a link there must not make the export write elsewhere."""
    from pneumonia_batch.discover import InputFile
    from pneumonia_batch.export import exported_name, study_folder_name

    studies = make_studies(tmp_path / "studies", 1)
    image = studies / "child000" / "cxr.jpeg"
    copy = exported_name(InputFile(rel="child000/cxr.jpeg", path=image, size=image.stat().st_size,
                                   mtime=image.stat().st_mtime))
    export = tmp_path / "review"
    folder = export / study_folder_name({"study_key": "path:child000", "patient_id": "", "study_date": ""}, studies)
    folder.mkdir(parents=True)
    outside = {}
    for name in ["worklist.csv", "index.html", f"{folder.name}/result.json", f"{folder.name}/{copy}",
                 f"{folder.name}/.{copy}.partial", f"{folder.name}/overlay_{copy}.model-{SHIPPED_SHA[:8]}.png"]:
        outside[name] = tmp_path / f"outside-{Path(name).name}"
        outside[name].write_text("another department's file")
        os.symlink(outside[name], export / name)
    result = run(studies, "--out", tmp_path / "r.csv", "--threshold", "0", "--export-flagged", export)
    assert result.returncode == 0, result.stderr
    assert all(path.read_text() == "another department's file" for path in outside.values())
    assert not [p for p in export.rglob("*") if p.is_symlink()]
    (entry,) = json.loads((folder / "result.json").read_text())["images"]
    assert (entry["exported_as"], entry["overlay"]) == (copy, f"overlay_{copy}.model-{SHIPPED_SHA[:8]}.png")
    assert (folder / copy).read_bytes() == image.read_bytes()
    assert (folder / entry["overlay"]).read_bytes().startswith(b"\x89PNG")
    assert "child000" in (export / "worklist.csv").read_text() and "thumbnail_error" not in entry
    umask = os.umask(0)
    os.umask(umask)
    for name in ("worklist.csv", "index.html", f"{folder.name}/result.json"):  # not the link's rwxrwxrwx
        assert stat.S_IMODE((export / name).stat().st_mode) == 0o666 & ~umask, name


def test_a_new_model_draws_its_own_overlays(tmp_path):
    studies = make_studies(tmp_path / "studies", 1)
    export = tmp_path / "review"
    args = ["--threshold", "0", "--export-flagged", export]
    assert run(studies, "--out", tmp_path / "r1.csv", *args).returncode == 0
    (folder,) = [p for p in export.iterdir() if p.is_dir()]
    (first,) = json.loads((folder / "result.json").read_text())["images"]
    model = model_copy(tmp_path, (ROOT / "weights" / "densenet121_pneumonia.keras").read_bytes() + b"\0")
    new_sha = json.loads((tmp_path / "m.json").read_text())["sha256"]
    result = run(studies, "--out", tmp_path / "r2.csv", "--model", model, *args)
    assert result.returncode == 0, result.stderr
    (second,) = json.loads((folder / "result.json").read_text())["images"]
    assert first["overlay"] == f"overlay_{first['exported_as']}.model-{SHIPPED_SHA[:8]}.png"
    assert second["overlay"] == f"overlay_{first['exported_as']}.model-{new_sha[:8]}.png"
    assert (folder / first["overlay"]).is_file() and (folder / second["overlay"]).is_file()  # only grows


def test_a_file_the_export_could_not_copy_fails_the_run_and_is_exported_next_night(tmp_path):
    studies = make_studies(tmp_path / "studies", 2)
    export = tmp_path / "review"
    args = ["--threshold", "0", "--export-flagged", export]
    assert run(studies, "--out", tmp_path / "r0.csv", *args).returncode == 0
    (victim,) = [p for p in export.glob("*/*_cxr.jpeg") if "child001" in p.parent.joinpath("result.json").read_text()]
    victim.unlink()
    victim.mkdir()  # its name is taken: the copy fails as a full or read-only share would
    args += ["--state", tmp_path / "state.db", "--quiet"]
    first = run(studies, "--out", tmp_path / "r1.csv", *args)
    assert first.returncode == 1
    assert first.stderr.strip() == ("error: review export failed: 1 of 2 flagged studies not exported whole "
                                    "(first: child001: child001/cxr.jpeg: Is a directory); a study folder's "
                                    "result.json lists each file's error")
    (image,) = json.loads((victim.parent / "result.json").read_text())["images"]
    assert image["exported_as"] is None and image["export_error"]
    victim.rmdir()
    second = run(studies, "--out", tmp_path / "r2.csv", *args)
    assert second.returncode == 0, second.stderr
    assert [r["study_id"] for r in rows(tmp_path / "r2.csv")] == ["child001"]  # only the incomplete one
    assert victim.read_bytes() == (studies / "child001" / "cxr.jpeg").read_bytes()
    assert run(studies, "--out", tmp_path / "r3.csv", *args).returncode == 0
    assert rows(tmp_path / "r3.csv") == []


def test_an_export_folder_named_through_a_dangling_link_is_a_clear_export_error(tmp_path):
    from pneumonia_batch.export import export_flagged

    (tmp_path / "review").symlink_to(tmp_path / "unmounted" / "share")
    with pytest.raises(OSError, match=r"review is a link to .*unmounted/share, which does not exist"):
        export_flagged(tmp_path / "review", [], [], None, tmp_path / "studies")
    assert not (tmp_path / "unmounted").exists()


def test_a_file_screening_could_not_read_is_listed_but_does_not_fail_the_export(tmp_path):
    """Its error row already says so; counting it again would fail the export every night."""
    studies = make_studies(tmp_path / "studies", 1)
    unreadable = studies / "child000" / "second.jpeg"
    shutil.copy(PNEUMONIA_JPEG, unreadable)
    os.utime(unreadable, (OLD, OLD))
    unreadable.chmod(0o000)
    command = [sys.executable, str(ROOT / "screen.py"), str(studies), "--out", str(tmp_path / "r.csv"),
               "--threshold", "0", "--export-flagged", str(tmp_path / "review"), "--no-progress"]
    if os.geteuid() == 0:  # root reads anything: the run drops that power
        if not shutil.which("capsh"):
            pytest.skip("capsh is needed to run without root's permission override")
        command = ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", shlex.join(command)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 1, result.stderr
    assert "1 file errors" in result.stderr and "review export failed" not in result.stderr
    (result_file,) = (tmp_path / "review").glob("*/result.json")
    images = {i["file"]: i for i in json.loads(result_file.read_text())["images"]}
    assert images["child000/second.jpeg"]["status"] == "error"
    assert images["child000/second.jpeg"]["export_error"] == "Permission denied"
    assert images["child000/cxr.jpeg"]["exported_as"] and images["child000/cxr.jpeg"]["overlay"]


def test_an_older_exports_hard_link_is_replaced_by_a_copy(tmp_path):
    from pneumonia_batch import export

    source, target = tmp_path / "cxr.jpeg", tmp_path / "review" / "0123_cxr.jpeg"
    shutil.copy(NORMAL_JPEG, source)
    target.parent.mkdir()
    os.link(source, target)
    export._copy(source, target)
    assert not os.path.samefile(source, target) and source.stat().st_nlink == 1
    assert target.read_bytes() == source.read_bytes()
    source.unlink()  # gone since the scan: the copy made earlier stays
    export._copy(source, target)
    assert target.read_bytes() == NORMAL_JPEG.read_bytes()


def test_a_blank_or_too_large_image_is_skipped_quietly_and_reported_once(tmp_path):
    """A blank exposure beside a real image in one study, a blank lateral, and a PNG and a DICOM claiming
    more pixels than screening decodes: skipped rows with their detail as the note, a quiet night (exit 0),
    and nothing to report again the next night.  Turning the header filter off decides the lateral's
    stored outcome again: it is decoded, and found blank."""
    from tests.test_dicom import png_claiming

    studies = tmp_path / "studies"
    (studies / "big").mkdir(parents=True)
    pixels = chest_pixels()
    real = make_dataset(pixels)
    save(real, studies / "frontal.dcm")
    save(make_dataset(np.full_like(pixels, 900), study_uid=real.StudyInstanceUID), studies / "blank.dcm")
    save(make_dataset(np.full_like(pixels, 900), view="LL"), studies / "blank-lateral.dcm")
    png_claiming(studies / "big" / "scan.png", 9500, 9500)
    save(make_dataset(np.zeros((4, 4), np.uint16), Rows=10000, Columns=8948), studies / "huge.dcm")
    for path in studies.rglob("*.*"):
        os.utime(path, (OLD, OLD))
    state, log = tmp_path / "state.db", tmp_path / "audit.jsonl"
    first = run(studies, "--out", tmp_path / "r1.json", "--state", state, "--log-file", log, "--quiet")
    assert (first.returncode, first.stderr) == (0, "")
    images = {i["file"]: i for s in json.loads((tmp_path / "r1.json").read_text())["studies"] for i in s["images"]}
    assert images["frontal.dcm"]["status"] == "scored"
    assert (images["blank.dcm"]["status"], images["blank.dcm"]["reason"], images["blank.dcm"]["note"]) == (
        "skipped", "blank_image", "1 grey level, 100.0% of the pixels at level 0")
    assert images["blank-lateral.dcm"]["reason"] == "not_frontal_view"
    assert (images["big/scan.png"]["reason"], images["big/scan.png"]["note"]) == (
        "image_too_large", "9500 x 9500 pixels; screening decodes at most 89,478,485 pixels")
    assert (images["huge.dcm"]["status"], images["huge.dcm"]["reason"]) == ("skipped", "image_too_large")
    logged = {e["file"]: e for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "file"}
    assert logged["blank.dcm"]["note"] == images["blank.dcm"]["note"]

    second = run(studies, "--out", tmp_path / "r2.json", "--state", state, "--quiet")
    assert (second.returncode, second.stderr) == (0, "")
    assert json.loads((tmp_path / "r2.json").read_text())["studies"] == []

    third = run(studies, "--out", tmp_path / "r3.json", "--state", state, "--quiet", "--no-header-filter")
    assert (third.returncode, third.stderr) == (0, "")
    (study,) = json.loads((tmp_path / "r3.json").read_text())["studies"]
    assert [(i["file"], i["reason"]) for i in study["images"]] == [("blank-lateral.dcm", "blank_image")]


def test_a_blank_kept_copy_does_not_hide_an_intact_duplicate(tmp_path):
    """The lossless copy of an instance is kept before the lossy one; when it decodes blank, the
    lossy copy is scored on the first night, as for a kept copy that fails to decode, and the next
    night takes both outcomes from the state: nothing reported again."""
    from pydicom.uid import generate_uid

    from tests.dicom_factory import save_jpeg_baseline

    studies = tmp_path / "studies"
    studies.mkdir()
    pixels, instance = chest_pixels(256), dict(study_uid=generate_uid(), sop_uid=generate_uid())
    save(make_dataset(np.full_like(pixels, 900), **instance), studies / "a-lossless.dcm")
    save_jpeg_baseline(make_dataset((pixels >> 4).astype(np.uint8), bits_stored=8, **instance),
                       studies / "b-lossy.dcm")
    for path in studies.iterdir():
        os.utime(path, (OLD, OLD))
    state = tmp_path / "state.db"
    first = run(studies, "--out", tmp_path / "r1.json", "--state", state, "--quiet")
    assert (first.returncode, first.stderr) == (0, "")
    (study,) = json.loads((tmp_path / "r1.json").read_text())["studies"]
    assert {i["file"]: (i["status"], i["reason"]) for i in study["images"]} == {
        "a-lossless.dcm": ("skipped", "blank_image"), "b-lossy.dcm": ("scored", "")}
    assert study["status"] == "scored" and study["probability"] > 0
    second = run(studies, "--out", tmp_path / "r2.json", "--state", state, "--quiet", "--include-previous")
    assert (second.returncode, second.stderr) == (0, "")
    assert json.loads((tmp_path / "r2.json").read_text())["run"]["counts"]["scored"] == 0  # nothing decoded
    (again,) = json.loads((tmp_path / "r2.json").read_text())["studies"]
    assert again["images"] == study["images"]
