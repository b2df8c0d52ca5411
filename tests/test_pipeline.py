"""Decode workers: order, failures and a worker process that dies."""

import os
from pathlib import Path

import numpy as np

from pneumonia_batch.discover import InputFile
from pneumonia_batch.pipeline import batches, decoded


def marker_decode(path: str, kind: str):
    """A stand-in decoder: an image filled with the file's number; 'crash' files kill the process."""
    name = Path(path).name
    if "crash" in name:
        os._exit(1)  # as a codec segfault or the OOM killer would end the process
    return np.full((4, 4, 3), int(name.split("_")[0]), np.uint8), "", ""


def files(names):
    return [InputFile(rel=n, path=Path("/nonexistent") / n, kind="png") for n in names]


def test_a_dying_decoder_costs_only_its_own_file():
    items = files([f"{i:02d}_{'crash' if i == 7 else 'ok'}.png" for i in range(30)])
    out = list(decoded(items, workers=2, decode=marker_decode))
    assert [item.rel for item, _ in out] == [item.rel for item in items]  # every file, in order
    crashed = [item for item, array in out if array is None]
    assert [item.rel for item in crashed] == ["07_crash.png"]
    assert crashed[0].status == "error" and "crashed" in crashed[0].reason
    for item, array in out:
        if array is not None:
            assert item.status == "pending" and array[0, 0, 0] == int(item.rel[:2])


def test_two_dying_decoders_in_one_window():
    items = files([f"{i:02d}_{'crash' if i in (3, 4) else 'ok'}.png" for i in range(12)])
    out = list(decoded(items, workers=2, decode=marker_decode))
    assert [item.rel for item, array in out if array is None] == ["03_crash.png", "04_crash.png"]
    assert len(out) == 12


def test_batches_skip_failures_and_keep_the_rest_together():
    items = files(["1_a", "2_b", "3_c", "4_d", "5_e"])
    arrays = [np.full((2, 2, 3), i, np.uint8) for i in range(5)]
    arrays[1] = None
    grouped = list(batches(zip(items, arrays), batch_size=2))
    assert [[i.rel for i in group] for group, _ in grouped] == [["1_a", "3_c"], ["4_d", "5_e"]]
    assert grouped[1][1][:, 0, 0, 0].tolist() == [3, 4]
