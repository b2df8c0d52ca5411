"""The report: one row per study, safe for spreadsheets, written atomically."""

import csv
import errno
import io
import json
import os
from pathlib import Path
from urllib.parse import unquote

import pytest

from pneumonia_batch import report
from pneumonia_batch.discover import InputFile, Study


def study(study_id, patient_id, probabilities):
    s = Study(study_id, study_id, patient_id=patient_id)
    for n, p in enumerate(probabilities):
        item = InputFile(rel=f"{study_id}/{n}.png", path=None, kind="png")
        item.status, item.probability = ("scored", p) if p is not None else ("error", None)
        item.reason = "" if p is not None else "broken"
        s.files.append(item)
    return s


def test_csv_rows_flags_and_formula_neutralising():
    studies = [study("s1", "=HYPERLINK(\"http://x\")", [0.2, 0.9]), study("s2", "@SUM(1)", [0.1]),
               study("s3", "-5", [None])]
    records = [report.study_record(s, 0.5, "abc", "run1") for s in studies]
    rows = list(csv.DictReader(io.StringIO(report.render_csv(records))))
    assert [r["study_id"] for r in rows] == ["s1", "s2", "s3"]
    assert list(rows[0]) == report.COLUMNS
    assert rows[0]["patient_id"] == "'=HYPERLINK(\"http://x\")"
    assert rows[1]["patient_id"] == "'@SUM(1)" and rows[2]["patient_id"] == "'-5"
    assert (rows[0]["probability"], rows[0]["flagged"], rows[0]["n_scored"]) == ("0.9", "true", "2")
    assert (rows[1]["flagged"], rows[2]["probability"], rows[2]["status"]) == ("false", "", "error")
    assert rows[0]["files"] == "s1/0.png;s1/1.png"


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r", "'"])
def test_every_cell_a_spreadsheet_reads_as_a_formula_is_quoted(start):
    """Excel and LibreOffice take a cell starting with any of these for a formula (OWASP CSV
    injection); a leading quote gets one more, so removing one always gives the text back."""
    record = report.study_record(study("s1", f"{start}cmd|' /C calc'!A0", [0.2]), 0.5, "abc", "run1")
    (row,) = csv.DictReader(io.StringIO(report.render_csv([record])))
    assert row["patient_id"] == f"'{start}cmd|' /C calc'!A0"
    plain = report.study_record(study("s1", "P001", [0.2]), 0.5, "abc", "run1")
    assert next(csv.DictReader(io.StringIO(report.render_csv([plain]))))["patient_id"] == "P001"


def test_the_reported_probability_is_the_one_flagged_on():
    """Unrounded, so that filtering the report on probability >= threshold gives its flagged studies,
    also for a study a hair below a threshold that is itself a model output."""
    threshold = 0.08447174727916718
    records = [report.study_record(study(f"s{n}", "", [p]), threshold, "abc", "run1")
               for n, p in enumerate([threshold - 4e-8, threshold, 0.0844722])]
    assert [r["flagged"] for r in records] == [False, True, True]
    csv_rows = list(csv.DictReader(io.StringIO(report.render_csv(records))))
    json_rows = json.loads(json.dumps(records))  # as the JSON report holds them
    for rows in (csv_rows, json_rows):
        assert [float(r["probability"]) >= threshold for r in rows] == [False, True, True]


def test_file_names_holding_the_separator_split_back_exactly():
    names = ["odd/a;b.jpeg", "odd/100%.jpeg", "odd/%3B.jpeg", "odd/c.jpeg"]
    s = Study("odd", "odd")
    for name in names:
        s.files.append(InputFile(rel=name, path=None, kind="jpeg", status="scored", probability=0.3))
    (row,) = csv.DictReader(io.StringIO(report.render_csv([report.study_record(s, 0.5, "abc", "run1")])))
    assert row["files"] == "odd/a%3Bb.jpeg;odd/100%25.jpeg;odd/%253B.jpeg;odd/c.jpeg"
    assert [unquote(name) for name in row["files"].split(";")] == names


def test_a_name_with_a_line_break_or_a_leading_quote_stays_in_its_cell_and_comes_back():
    """A CR inside a name must not split the row (every reader takes a lone CR for a line end),
    and removing one leading quote must give back a name that itself starts with one."""
    names = ["scan\r=2+3.jpeg", "two\nlines.jpeg", "'quoted.jpeg", "=sum.jpeg"]
    records = []
    for name in names:
        s = Study(name, name)
        s.files.append(InputFile(rel=name, path=None, kind="jpeg", status="scored", probability=0.3))
        records.append(report.study_record(s, 0.5, "abc", "run1"))
    text = report.render_csv(records)
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert [len(row) for row in rows] == [len(report.COLUMNS)] * 5
    assert [row[0] for row in rows[1:]] == ["scan\r=2+3.jpeg", "two\nlines.jpeg", "''quoted.jpeg", "'=sum.jpeg"]
    unquoted = [cell[1:] if cell.startswith("'") else cell for cell in (row[4] for row in rows[1:])]
    assert unquoted == names


def test_threshold_is_inclusive():
    assert report.is_flagged(study("s", "", [0.5]), 0.5)
    assert not report.is_flagged(study("s", "", [0.4999]), 0.5)


def test_json_has_run_and_per_image_entries():
    summary = report.RunSummary(run_id="r", threshold=0.5)
    studies = [study("s1", "p", [0.2, 0.9])]
    summary.count(studies)
    doc = json.loads(report.render_json([report.study_record(studies[0], 0.5, "abc", "r")], summary))
    assert doc["run"]["counts"]["flagged"] == 1
    assert doc["studies"][0]["files"] == ["s1/0.png", "s1/1.png"]
    assert [i["probability"] for i in doc["studies"][0]["images"]] == [0.2, 0.9]


def test_failed_write_leaves_the_old_report_untouched(tmp_path, monkeypatch):
    target = tmp_path / "report.csv"
    target.write_text("previous report\n")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pneumonia_batch.atomic.os.fsync", full_disk)
    with pytest.raises(OSError) as caught:
        report.write_report(target, "csv", [], report.RunSummary(run_id="r"))
    assert str(caught.value) == f"cannot write {target}: No space left on device"  # not just the errno
    assert caught.value.errno == errno.ENOSPC
    assert target.read_text() == "previous report\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.csv"]


@pytest.mark.parametrize("stem", ["r" * 251, "\N{GRINNING FACE}" * 62])  # 255 and 252 bytes with .csv
def test_a_report_name_near_the_file_system_limit_is_written(stem, tmp_path):
    """The temp file beside it must fit the 255-byte name limit too."""
    target = tmp_path / (stem + ".csv")
    report.write_report(target, "csv", [], report.RunSummary(run_id="r"))
    assert target.read_text().startswith("study_id,")
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_temp_name_is_cut_between_characters(tmp_path, monkeypatch):
    """Cut inside a character, it would not be UTF-8, which a share may refuse."""
    import tempfile

    prefixes, mkstemp = [], tempfile.mkstemp

    def recorded(*args, **kwargs):
        prefixes.append(kwargs["prefix"])
        return mkstemp(*args, **kwargs)

    monkeypatch.setattr("pneumonia_batch.atomic.tempfile.mkstemp", recorded)
    report.write_report(tmp_path / ("a" + "\N{LATIN SMALL LETTER E WITH ACUTE}" * 40 + ".csv"), "csv", [],
                        report.RunSummary(run_id="r"))
    (prefix,) = prefixes
    assert prefix == "." + "a" + "\N{LATIN SMALL LETTER E WITH ACUTE}" * 31 + "."  # 63 bytes of name
    assert prefix.encode("utf-8")  # no lone surrogate from a cut byte


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may give a file to another owner")
def test_a_replaced_report_keeps_its_owner_and_group(tmp_path):
    """A report an admin gave to the group that reads it stays theirs when the run (root) replaces it."""
    target = tmp_path / "report.csv"
    target.write_text("previous report\n")
    os.chown(target, 65534, 65534)
    os.chmod(target, 0o640)
    report.write_report(target, "csv", [], report.RunSummary(run_id="r"))
    replaced = target.stat()
    assert (replaced.st_uid, replaced.st_gid, replaced.st_mode & 0o777) == (65534, 65534, 0o640)
    assert target.read_text().startswith("study_id,")


@pytest.mark.parametrize("refusal", [errno.EINVAL, errno.ENOTSUP, errno.EACCES])
def test_the_folder_is_flushed_and_one_that_cannot_be_still_gets_the_report(tmp_path, monkeypatch, refusal):
    """The rename is flushed with the folder; some file systems refuse that (a share: EINVAL,
    ENOTSUP, or EACCES for a folder opened read-only), and the report is in place all the same."""
    flushed = []

    def folder_fsync_refused(path):
        flushed.append(Path(path))
        raise OSError(refusal, os.strerror(refusal))

    monkeypatch.setattr("pneumonia_batch.atomic.fsync_path", folder_fsync_refused)
    target = tmp_path / "report.csv"
    report.write_report(target, "csv", [], report.RunSummary(run_id="r"))
    assert flushed == [tmp_path]
    assert target.read_text().startswith("study_id,patient_id,")
    assert [p.name for p in tmp_path.iterdir()] == ["report.csv"]


def test_a_disk_error_while_flushing_the_folder_is_raised(tmp_path, monkeypatch):
    """Only a file system that cannot flush a folder is passed over; a failing disk is not."""
    def folder_fsync_failed(path):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("pneumonia_batch.atomic.fsync_path", folder_fsync_failed)
    with pytest.raises(OSError) as raised:
        report.write_report(tmp_path / "report.csv", "csv", [], report.RunSummary(run_id="r"))
    assert raised.value.errno == errno.EIO


def test_a_report_replaced_keeps_its_permissions(tmp_path):
    """An admin made last night's report private; tonight's replacement stays private."""
    target = tmp_path / "report.csv"
    report.write_report(target, "csv", [], report.RunSummary(run_id="r1"))
    target.chmod(0o640)  # no umask gives this mode by default
    report.write_report(target, "csv", [], report.RunSummary(run_id="r2"))
    assert target.stat().st_mode & 0o777 == 0o640
    fresh = tmp_path / "fresh.csv"
    report.write_report(fresh, "csv", [], report.RunSummary(run_id="r3"))
    assert fresh.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_a_report_named_through_a_symlink_replaces_the_target_and_keeps_the_link(tmp_path):
    (tmp_path / "reports").mkdir()
    target, link = tmp_path / "reports" / "2026-11-23.csv", tmp_path / "latest.csv"
    target.write_text("yesterday")
    link.symlink_to(target)
    report.write_report(link, "csv", [], report.RunSummary(run_id="r1"))
    assert link.is_symlink() and link.resolve() == target
    assert target.read_text().startswith("study_id,")
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["2026-11-23.csv"]


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
