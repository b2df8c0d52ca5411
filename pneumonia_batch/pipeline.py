"""Decode workers -> fixed-size batches -> inference.

Decoding (pydicom, codecs, Pillow) runs in separate processes, so it really
runs in parallel with inference instead of queueing behind the GIL; at most a
few batches are in flight, so memory stays flat whatever the corpus size.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator

import numpy as np

from .discover import InputFile
from .preprocess import NothingToScreen, model_input_from_file, warnings_noted


def default_workers() -> int:
    """One decode process per core; the kernel interleaves them with inference.

    Measured on 2 cores, 300 mixed JPEG/DICOM files, TFLite: 1 worker 25 img/s,
    2 workers 29 img/s, 3 workers 29 img/s (decoding waits less on slow files).
    """
    return usable_cores()


def usable_cores() -> int:
    """The cores this process may run on (taskset, a container's cpuset), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _start_decode_worker(parent_pid: int) -> None:
    """Worker initializer: a decode process ends when the screening process is gone (after a
    kill -9 nothing shuts the pool down, and a worker holding a result would wait forever), or
    when the pool ends it: after one worker dies, the pool SIGTERMs the others and waits for them.

    SIGTERM stays blocked (``_stop_signals_blocked``), and this thread acts on the screening
    process's own only.  A service manager's is left to the screening process, which shuts the
    pool down in order: a worker ended while sending its result would leave half a message that
    the pool then waits for forever.
    """
    # spawn passes on the starting thread's mask and ignored signals: _decode_in_time needs SIGALRM
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})

    def watch():
        while os.getppid() == parent_pid:
            received = signal.sigtimedwait({signal.SIGTERM}, 1)
            if received is not None and received.si_pid == parent_pid:
                break
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _decode_in_time(decode: Callable, seconds: int, path: str, kind: str):
    """Worker: ``decode``, ended with the whole process by SIGALRM's default action if it takes
    longer than ``seconds`` (a codec caught in a loop on a damaged file, even one that never
    returns to Python).  Never while a result is being sent: the alarm is off by then."""
    signal.alarm(seconds)
    try:
        return decode(path, kind)
    finally:
        signal.alarm(0)


@contextmanager
def _stop_signals_blocked():
    """Start decode processes with SIGINT and SIGTERM blocked: the mask survives the spawn.

    A Ctrl-C reaches the whole process group, and a service manager's stop the whole service.
    The screening process handles them and shuts the pool down; a decode process, even one
    still starting up, must not print a traceback of its own, nor die and pass for a crashed
    decoder.  A mask, not a handler, because pools are also made from tf.data's thread.
    """
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


# How ``decode_for_model`` marks a failure, as against a skip's bare reason code.
ERROR = "error: "


def decode_for_model(path: str, kind: str) -> tuple[np.ndarray | None, str, str]:
    """Worker: (model input, note, why not scored).  The last is empty for a decoded file, a skip's
    reason code for one with nothing to screen (``blank_image``: its detail is the note), and
    ``error: ...`` for one that could not be decoded."""
    array, notes, why_not = None, [], ""
    try:
        with warnings_noted(notes):
            array, note = model_input_from_file(path, kind)
        notes.insert(0, note)
    except NothingToScreen as exc:
        notes.insert(0, exc.detail)
        why_not = exc.reason
    except MemoryError:
        why_not = ERROR + "out of memory while decoding"
    except Exception as exc:  # any codec or parser failure becomes the file's error row
        # pydicom names each codec's own failure on a line of its own: they are what tells a user why
        first, *codecs = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
        message = " ".join([first, "; ".join(codecs)]) if codecs else first
        why_not = ERROR + f"{type(exc).__name__}: {message}"[:500]
    return array, "; ".join(n for n in notes if n), why_not


def _joined_notes(header_note: str, decode_note: str) -> str:
    """The header's note, then the decode's, less what the decode's second parse of the header
    warned of again (``decode: X`` after ``header: X``)."""
    fresh = [n for n in decode_note.split("; ") if n and f"header: {n.removeprefix('decode: ')}" not in header_note]
    return "; ".join([header_note, *fresh] if header_note else fresh)


# The longest one file may take to decode.  The slowest real file measured here, a 4 MB JPEG 2000 CR,
# takes 0.25 s (0.85 s at full resolution); a codec caught in a loop on a damaged file would
# otherwise hold up the night, and every night after it behind the state lock.
DECODE_TIMEOUT = 120
NO_PROBABILITY = "the model gave no probability (NaN or infinite): the model file is damaged"


def decoded(files: list[InputFile], workers: int, decode: Callable = decode_for_model,
            timeout: int = DECODE_TIMEOUT) -> Iterator[tuple[InputFile, np.ndarray | None]]:
    """Yield (file, model input or None) in order; failures are recorded on the file.

    A decoder process that dies (a codec segfault, the kernel's OOM killer, a
    decode that took longer than ``timeout`` seconds) takes every in-flight
    file with it, and files submitted after it are refused.  The pool is then
    rebuilt, the file at the head of the queue is retried alone (a second
    death makes it the culprit: an error row), and the others are resubmitted.
    """
    context = multiprocessing.get_context("spawn")  # never fork a process that holds TensorFlow
    window = max(4, workers * 8)

    def new_pool():
        with _stop_signals_blocked():
            return ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                       initializer=_start_decode_worker, initargs=(os.getpid(),))

    def replaced(broken):  # the files in flight go with the broken pool: the caller resubmits them
        broken.shutdown(cancel_futures=True)
        return new_pool()

    def submitted(pool, item):
        with _stop_signals_blocked():  # a submit may start a worker
            return pool.submit(_decode_in_time, decode, timeout, str(item.path), item.kind)

    pool = new_pool()
    queue: deque = deque()
    todo = iter(files)

    def submit(item):
        try:
            future = submitted(pool, item)
        except BrokenProcessPool as refused:  # a process died since the last look: recovered at this file's turn
            future = Future()
            future.set_exception(refused)
        queue.append((item, future))

    try:
        for item in todo:
            submit(item)
            if len(queue) >= window:
                break
        while queue:
            item, future = queue.popleft()
            try:
                array, note, why_not = future.result()
            except BrokenProcessPool:
                pool = replaced(pool)
                started = time.monotonic()
                try:
                    array, note, why_not = submitted(pool, item).result()
                except BrokenProcessPool:
                    took_too_long = time.monotonic() - started >= timeout
                    array, note, why_not = None, "", ERROR + (f"decoding took longer than {timeout} s: given up"
                                                              if took_too_long else "decoder process crashed on this file")
                    pool = replaced(pool)
                in_flight = [waiting for waiting, _ in queue]
                queue.clear()
                for waiting in in_flight:
                    submit(waiting)
            item.note = _joined_notes(item.header_note, note)
            if why_not.startswith(ERROR):
                item.finish("error", why_not.removeprefix(ERROR))
            elif why_not:
                item.finish("skipped", why_not)
            yield item, array
            nxt = next(todo, None)
            if nxt is not None:
                submit(nxt)
    finally:
        pool.shutdown(cancel_futures=True)


def batches(stream: Iterable[tuple[InputFile, np.ndarray | None]],
            batch_size: int) -> Iterator[tuple[list[InputFile], np.ndarray]]:
    """Group decoded images into batches of ``batch_size`` (the last may be shorter)."""
    items, arrays = [], []
    for item, array in stream:
        if array is None:
            continue
        items.append(item)
        arrays.append(array)
        if len(items) == batch_size:
            yield items, np.stack(arrays)
            items, arrays = [], []
    if items:
        yield items, np.stack(arrays)


def score(files: list[InputFile], make_runner: Callable, batch_size: int, workers: int,
          on_batch: Callable[[list[InputFile]], None] | None = None,
          on_file: Callable[[InputFile], None] | None = None) -> None:
    """Score every pending image file in place: 'scored' with a probability, 'skipped' (nothing to
    screen) or 'error'.

    ``make_runner`` is called only when there is something to score, so a run
    with nothing new never loads a model.  ``on_batch`` sees each scored batch
    as soon as it is done (to commit it); ``on_file`` sees every file that
    left the pipeline, scored or not (for progress).
    """
    pending = [f for f in files if f.status == "pending"]
    if not pending:
        return
    runner = make_runner()

    def reported(stream):
        for item, array in stream:
            if array is None and on_file:
                on_file(item)
            yield item, array

    for items, probabilities in runner.run(batches(reported(decoded(pending, workers)), batch_size)):
        for item, probability in zip(items, probabilities):
            if math.isfinite(probability):
                item.probability = float(probability)
                item.finish("scored")
            else:  # a damaged model: NaN would be never flagged, and is not valid JSON
                item.finish("error", NO_PROBABILITY)
            if on_file:
                on_file(item)
        if on_batch:
            on_batch(items)
