"""Decode workers: order, failures and a worker process that dies."""

import faulthandler
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from pneumonia_batch.discover import InputFile
from pneumonia_batch.pipeline import batches, decoded


def marker_decode(path: str, kind: str):
    """A stand-in decoder: an image filled with the file's number; 'crash' files kill the process,
    'hang' files never return."""
    name = Path(path).name
    if "foreign-sigterm" in name:  # as a service manager stopping the whole service would send it
        subprocess.run(["kill", "-TERM", str(os.getpid())], check=True)
        time.sleep(0.5)
    if "hang" in name:
        Path(path).with_suffix(".pid").write_text(str(os.getpid()))
        time.sleep(3600)  # as a codec caught in a loop on a damaged file
    if "crash" in name:
        Path(path).with_suffix(".died").touch()  # lets a test know when the process is gone
        os._exit(1)  # as a codec segfault or the OOM killer would end the process
    # full-size results: a result larger than a pipe's buffer blocks a worker until it is read
    return np.full((224, 224, 3), int(name.split("_")[0]), np.uint8), "", ""


@pytest.fixture(autouse=True)
def ends_or_fails():
    """A hang here would hang the whole suite: after five minutes, print every thread's stack and exit."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def files(names, folder):
    return [InputFile(rel=n, path=folder / n, kind="png") for n in names]


def test_a_dying_decoder_costs_only_its_own_file(tmp_path):
    items = files([f"{i:02d}_{'crash' if i == 7 else 'ok'}.png" for i in range(30)], tmp_path)
    out = list(decoded(items, workers=2, decode=marker_decode))
    assert [item.rel for item, _ in out] == [item.rel for item in items]  # every file, in order
    crashed = [item for item, array in out if array is None]
    assert [item.rel for item in crashed] == ["07_crash.png"]
    assert crashed[0].status == "error" and "crashed" in crashed[0].reason
    for item, array in out:
        if array is not None:
            assert item.status == "pending" and array[0, 0, 0] == int(item.rel[:2])


def test_a_decoder_dying_while_earlier_files_are_handed_on(tmp_path):
    # The crash breaks the pool while the consumer still holds file 00: the next file is then
    # submitted to a broken pool, which raises at once instead of through its result.
    items = files([f"{i:02d}_{'crash' if i == 5 else 'ok'}.png" for i in range(30)], tmp_path)
    stream = decoded(items, workers=2, decode=marker_decode)
    out = [next(stream)]
    deadline = time.monotonic() + 60
    while not (tmp_path / "05_crash.died").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1)  # the pool notices a dead process within milliseconds
    out += list(stream)
    assert [item.rel for item, _ in out] == [item.rel for item in items]
    assert [item.rel for item, array in out if array is None] == ["05_crash.png"]


def test_a_stuck_decoder_is_given_up_and_its_process_ended(tmp_path):
    items = files([f"{i:02d}_{'hang' if i == 3 else 'ok'}.png" for i in range(12)], tmp_path)
    # spawn passes the starting thread's ignored and blocked signals on to the decode processes
    ignored = signal.signal(signal.SIGALRM, signal.SIG_IGN)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    try:
        out = list(decoded(items, workers=2, decode=marker_decode, timeout=2))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGALRM, ignored)
    assert [item.rel for item, _ in out] == [item.rel for item in items]
    stuck = [item for item, array in out if array is None]
    assert [item.rel for item in stuck] == ["03_hang.png"]
    assert stuck[0].status == "error" and stuck[0].reason == "decoding took longer than 2 s: given up"
    assert all(array[0, 0, 0] == int(item.rel[:2]) for item, array in out if array is not None)
    pid = int((tmp_path / "03_hang.pid").read_text())
    with pytest.raises(ProcessLookupError):  # ended and reaped, not left sleeping
        os.kill(pid, 0)


def test_a_stop_signal_from_another_process_is_left_to_the_screening_process(tmp_path):
    # The screening process shuts the pool down in order; a worker ended mid-send would leave half
    # a result in the pipe that the pool waits on forever.
    items = files([f"{i:02d}_{'foreign-sigterm' if i == 2 else 'ok'}.png" for i in range(6)], tmp_path)
    out = list(decoded(items, workers=2, decode=marker_decode))
    assert [array[0, 0, 0] for _, array in out] == list(range(6))  # every file decoded, none an error


def test_two_dying_decoders_in_one_window(tmp_path):
    items = files([f"{i:02d}_{'crash' if i in (3, 4) else 'ok'}.png" for i in range(12)], tmp_path)
    out = list(decoded(items, workers=2, decode=marker_decode))
    assert [item.rel for item, array in out if array is None] == ["03_crash.png", "04_crash.png"]
    assert len(out) == 12


def test_batches_skip_failures_and_keep_the_rest_together():
    items = files(["1_a", "2_b", "3_c", "4_d", "5_e"], Path("/nonexistent"))
    arrays = [np.full((2, 2, 3), i, np.uint8) for i in range(5)]
    arrays[1] = None
    grouped = list(batches(zip(items, arrays), batch_size=2))
    assert [[i.rel for i in group] for group, _ in grouped] == [["1_a", "3_c"], ["4_d", "5_e"]]
    assert grouped[1][1][:, 0, 0, 0].tolist() == [3, 4]
