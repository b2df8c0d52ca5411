"""Walking a studies folder: every file accounted for, studies grouped, copies scored once."""

import os

import numpy as np
from pydicom.uid import JPEG2000, generate_uid

from pneumonia_batch import discover
from pneumonia_batch.images import PNG_SIGNATURE
from tests.dicom_factory import make_dataset, save, save_without_meta

PIXELS = np.full((16, 16), 100, np.uint16)


def found(root, header_filter=True):
    files = discover.walk(root)
    for item in files:
        discover.identify(item, header_filter=header_filter)
    return {f.rel: f for f in files}


def test_every_file_is_identified_or_explained(tmp_path):
    (tmp_path / "a").mkdir()
    save(make_dataset(PIXELS), tmp_path / "a" / "no_extension")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "fake.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 20)
    files = found(tmp_path)
    assert set(files) == {"a/no_extension", "notes.txt", "empty.dcm", "fake.dcm"}
    assert files["a/no_extension"].kind == "dicom" and files["a/no_extension"].status == "pending"
    assert (files["notes.txt"].status, files["notes.txt"].reason) == ("skipped", "not_an_image")
    assert (files["empty.dcm"].status, files["empty.dcm"].reason) == ("error", "empty file")
    assert files["fake.dcm"].status == "error" and "DICOM header" in files["fake.dcm"].reason


def test_symlinks_never_lead_outside_and_loops_do_not_hang(tmp_path):
    root = tmp_path / "studies"
    root.mkdir()
    outside = tmp_path / "outside.dcm"
    save(make_dataset(PIXELS), outside)
    os.symlink(outside, root / "link_out.dcm")
    os.symlink(root / "loop_b", root / "loop_a")
    os.symlink(root / "loop_a", root / "loop_b")
    os.symlink(tmp_path, root / "parent_folder")
    files = found(root)
    assert files["link_out.dcm"].reason == "symlink_outside_folder"
    assert files["loop_a"].status == "error" and files["loop_b"].status == "error"
    assert files["parent_folder"].reason == "symlinked_folder_not_followed"


def test_studies_group_by_uid_across_folders_and_by_folder_for_images(tmp_path):
    uid = generate_uid()
    for folder in ("day1", "day2"):
        (tmp_path / folder).mkdir()
        save(make_dataset(PIXELS, study_uid=uid), tmp_path / folder / "img.dcm")
    (tmp_path / "kid").mkdir()
    for name in ("1.png", "2.png"):
        (tmp_path / "kid" / name).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 10)
    (tmp_path / "loose.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 10)
    studies = discover.group_studies(list(found(tmp_path).values()))
    by_id = {s.study_id: sorted(f.rel for f in s.files) for s in studies}
    assert by_id == {uid: ["day1/img.dcm", "day2/img.dcm"], "kid": ["kid/1.png", "kid/2.png"],
                     "loose.jpg": ["loose.jpg"]}


def test_same_instance_twice_keeps_the_lossless_copy(tmp_path):
    sop, study = generate_uid(), generate_uid()
    pixels = np.random.default_rng(0).integers(0, 4095, (64, 64)).astype(np.uint16)
    save(make_dataset(pixels, sop_uid=sop, study_uid=study), tmp_path / "b_lossless.dcm")
    save(make_dataset(pixels, sop_uid=sop, study_uid=study), tmp_path / "a_lossy.dcm",
         syntax=JPEG2000, j2k_cr=[10], generate_instance_uid=False)
    files = found(tmp_path)
    discover.group_studies(list(files.values()))
    assert files["b_lossless.dcm"].status == "pending"
    assert files["a_lossy.dcm"].reason == "duplicate_instance_of b_lossless.dcm"


def test_header_filter_can_be_turned_off_but_not_for_non_images(tmp_path):
    save(make_dataset(PIXELS, view="LL"), tmp_path / "lateral.dcm")
    save(make_dataset(PIXELS, sop_class="1.2.840.10008.5.1.4.1.1.88.11"), tmp_path / "sr.dcm")
    save(make_dataset(PIXELS, sop_class="1.2.840.10008.5.1.4.1.1.2", modality="CT"), tmp_path / "ct.dcm")
    save(make_dataset(PIXELS, sop_class="1.2.840.10008.5.1.4.1.1.2", modality="DX"), tmp_path / "ct-as-dx.dcm")
    filtered = found(tmp_path)
    assert filtered["lateral.dcm"].reason == "not_frontal_view"
    assert filtered["ct.dcm"].reason == "modality_ct"  # an image, skipped for what it shows
    assert filtered["ct-as-dx.dcm"].status == "pending"  # an image whose Modality says DX, as a secondary capture may
    unfiltered = found(tmp_path, header_filter=False)
    assert unfiltered["lateral.dcm"].status == unfiltered["ct.dcm"].status == "pending"
    assert unfiltered["sr.dcm"].reason == "not_an_image_sop_class"


def test_a_dicomdir_is_skipped_as_one_not_an_error(tmp_path):
    """An archive's media export carries a DICOMDIR: its file meta says so, and it has none of an
    image's identifying elements.  An error row would make every night exit 1."""
    from pydicom.fileset import FileSet

    image = tmp_path / "image.dcm"
    save(make_dataset(PIXELS, StudyTime="120000", StudyID="1", SeriesNumber=1, InstanceNumber=1), image)
    file_set = FileSet()
    file_set.add(str(image))
    file_set.write(tmp_path / "media")
    for header_filter in (True, False):
        files = found(tmp_path / "media", header_filter)
        assert (files["DICOMDIR"].status, files["DICOMDIR"].reason) == ("skipped", "dicomdir")
        assert [f.status for rel, f in files.items() if rel != "DICOMDIR"] == ["pending"]


def test_study_probability_is_the_maximum_of_its_images():
    study = discover.Study("k", "k")
    for rel, p, status in [("a", 0.2, "scored"), ("b", 0.7, "scored"), ("c", None, "error")]:
        item = discover.InputFile(rel=rel, path=None, kind="png")
        item.probability, item.status, item.reason = p, status, "boom" if status == "error" else ""
        study.files.append(item)
    assert study.probability == 0.7
    assert study.status == "scored"
    assert study.reason == "error: boom (1)"


def test_a_header_cut_short_anywhere_is_a_row_not_a_crash(tmp_path):
    whole = save(make_dataset(PIXELS), tmp_path / "whole.dcm").read_bytes()
    for length in range(1, 900, 3):
        (tmp_path / f"cut{length:04d}.dcm").write_bytes(whole[:length])
    files = found(tmp_path)
    cut = [f for rel, f in files.items() if rel.startswith("cut")]
    assert len(cut) == 300
    assert {f.status for f in cut} <= {"error", "skipped", "pending"}
    assert all(f.reason for f in cut if f.status != "pending")
    # Past the header, the pixels are missing: the header reads, decoding will report it.
    assert files["cut0898.dcm"].status == "pending"


def test_a_large_file_that_only_resembles_dicom_is_not_read_into_memory(tmp_path):
    """A video or archive in the folder is tried as DICOM without preamble; its bytes stay on disk."""
    import struct
    import subprocess
    import sys

    path = tmp_path / "video.bin"
    size = 400 << 20
    with open(path, "wb") as handle:  # implicit VR: an element (0008,0016) claiming 400 MB, then zeros
        handle.write(struct.pack("<HHI", 0x0008, 0x0016, size))
        handle.truncate(size + 8)  # sparse: costs no disk
    # The peak resident size of this process alone: VmHWM starts afresh at exec, whereas getrusage's
    # ru_maxrss keeps the peak of the forking process (a test worker that has trained a model).
    script = ("import re, sys; from pathlib import Path; from pneumonia_batch import discover; "
              "item = discover.InputFile(rel='video.bin', path=Path(sys.argv[1]), size=1); "
              "discover.identify(item); "
              "peak_kb = re.search(r'VmHWM:\\s+(\\d+) kB', Path('/proc/self/status').read_text()).group(1); "
              "print(item.status, int(peak_kb) // 1024)")
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    status, peak_mb = result.stdout.split()
    assert status != "pending" and int(peak_mb) < 200, result.stdout


def test_only_a_file_that_may_still_become_dicom_can_be_a_dicom_file_cut_short(tmp_path):
    whole = save(make_dataset(PIXELS, study_uid="1.2.3"), tmp_path / "whole.dcm").read_bytes()
    bare = save_without_meta(make_dataset(PIXELS, study_uid="1.2.3"), tmp_path / "bare").read_bytes()
    (tmp_path / "cut").mkdir()
    for name, content in [("empty", b""), ("preamble", whole[:100]), ("header", whole[:300]),
                          ("bare", bare[:20] + b"\0" * 200), ("preallocated", bytes(len(whole))),
                          ("preallocated-begun", whole[:100] + bytes(len(whole) - 100)),
                          ("whole.dcm", whole), ("log", b"I: started\n" * 20),
                          ("cxr.png", PNG_SIGNATURE + b"\0" * 200), ("begun.png", PNG_SIGNATURE)]:
        (tmp_path / "cut" / name).write_bytes(content)
    files = found(tmp_path / "cut")
    assert {rel for rel, item in files.items() if discover.may_be_dicom_cut_short(item)} == {
        "empty", "preamble", "header", "bare", "preallocated", "preallocated-begun"}


def test_a_file_gone_between_listing_and_reading_is_deferred_not_an_error(tmp_path, monkeypatch):
    """A receiver's temporary name renamed away mid-run: a deferred row, looked at again next run,
    not an error that fails the night."""
    listed = [(str(tmp_path), [], ["renamed-before-stat.dcm.part"])]
    monkeypatch.setattr(discover.os, "walk", lambda *args, **kwargs: iter(listed))
    (before_stat,) = discover.walk(tmp_path)
    assert (before_stat.status, before_stat.reason) == ("deferred", discover.GONE)
    monkeypatch.undo()
    save(make_dataset(PIXELS), tmp_path / "renamed-before-read.dcm.part")
    (before_read,) = discover.walk(tmp_path)
    before_read.path.unlink()
    discover.identify(before_read)
    assert (before_read.status, before_read.reason) == ("deferred", discover.GONE)
    (study,) = discover.group_studies([before_read])
    assert study.status == "deferred"


def test_a_dicom_file_gone_between_its_first_bytes_and_its_header_is_deferred(tmp_path, monkeypatch):
    save(make_dataset(PIXELS), tmp_path / "a.dcm")
    (item,) = discover.walk(tmp_path)
    read_header = discover.dicom.read_header

    def renamed_first(path):
        path.unlink()
        return read_header(path)

    monkeypatch.setattr(discover.dicom, "read_header", renamed_first)
    discover.identify(item)
    assert (item.status, item.reason) == ("deferred", discover.GONE)
