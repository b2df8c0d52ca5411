"""The review export a radiologist works from: what it lists, where, and under which names."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumonia_batch.discover import InputFile, Study
from pneumonia_batch.export import export_flagged, exported_name, render_html, study_folder_name
from pneumonia_batch.model import ModelInfo
from pneumonia_batch.report import study_record
from tests.dicom_factory import chest_pixels, make_dataset, save
from tests.test_cli import NORMAL_JPEG, PNEUMONIA_JPEG, rows, run
from tests.test_nightly import OLD


def worklist(export: Path) -> list[dict]:
    return rows(export / "worklist.csv")


def study_folders(export: Path) -> list[Path]:
    return sorted(p for p in export.iterdir() if p.is_dir())


def pneumonia_pixels() -> np.ndarray:
    """The pneumonia example as 8-bit DICOM pixels: a study the shipped model scores high."""
    return np.asarray(Image.open(PNEUMONIA_JPEG).convert("L").resize((320, 320)))


def test_a_study_exported_again_keeps_the_images_exported_on_earlier_nights(tmp_path):
    """An archive moves each instance out of the incoming folder once it was read: the night a
    second instance of the study arrives, the radiologist still sees the first one, and the study
    keeps its highest probability in the worklist."""
    studies, moved = tmp_path / "incoming", tmp_path / "archived"
    studies.mkdir()
    moved.mkdir()
    uid = "1.2.826.0.1.3680043.8.498.7"
    pneumonia = pneumonia_pixels()
    save(make_dataset(pneumonia, study_uid=uid, bits_stored=8), studies / "B.dcm")
    export = tmp_path / "review"
    args = ["--threshold", "0", "--export-flagged", export, "--state", tmp_path / "state.db"]
    assert run(studies, "--out", tmp_path / "r1.csv", *args).returncode == 0
    shutil.move(studies / "B.dcm", moved / "B.dcm")
    save(make_dataset(chest_pixels(), study_uid=uid, WindowCenter=2048, WindowWidth=4096), studies / "A.dcm")
    night2 = run(studies, "--out", tmp_path / "r2.csv", *args)
    assert night2.returncode == 0, night2.stderr

    (first,), (second,) = rows(tmp_path / "r1.csv"), rows(tmp_path / "r2.csv")
    p_b, p_a = float(first["probability"]), float(second["probability"])
    assert second["files"] == "A.dcm" and p_b > p_a  # tonight's report knows only A
    (folder,) = study_folders(export)
    result = json.loads((folder / "result.json").read_text())
    images = {image["file"]: image for image in result["images"]}
    assert sorted(images) == ["A.dcm", "B.dcm"]
    assert images["B.dcm"]["probability"] == pytest.approx(p_b, abs=1e-6)
    assert images["A.dcm"]["probability"] == pytest.approx(p_a, abs=1e-6)
    for image in images.values():
        assert (folder / image["exported_as"]).is_file() and (folder / image["overlay"]).is_file()
    assert result["probability"] == pytest.approx(p_b, abs=1e-6) and result["n_scored"] == 2
    (listed,) = worklist(export)
    assert float(listed["probability"]) == pytest.approx(p_b, abs=1e-6)
    page = (export / "index.html").read_text()
    assert page.count("<img ") == 2 and f"{p_b:.3f}</span>" in page


def test_png_studies_of_different_screened_folders_are_exported_apart(tmp_path):
    """Two nights' folders both hold a ``child001``: two children, two export folders."""
    night1 = tmp_path / "night1"
    night2 = tmp_path / os.fsdecode(b"n\xe4cht2")  # a Latin-1 folder name from a Windows share
    for night, image, name in [(night1, PNEUMONIA_JPEG, "pneumonia.jpeg"), (night2, NORMAL_JPEG, "normal.jpeg")]:
        (night / "child001").mkdir(parents=True)
        shutil.copy(image, night / "child001" / name)
    export = tmp_path / "review"
    for night, report in [(night1, "r1.csv"), (night2, "r2.csv")]:
        result = run(night, "--out", tmp_path / report, "--threshold", "0", "--export-flagged", export)
        assert result.returncode == 0, result.stderr

    files = {folder.name: [i["file"] for i in json.loads((folder / "result.json").read_text())["images"]]
             for folder in study_folders(export)}
    assert sorted(files.values()) == [["child001/normal.jpeg"], ["child001/pneumonia.jpeg"]]
    record = {"study_key": "path:child001", "patient_id": "", "study_date": ""}
    assert files == {study_folder_name(record, night1): ["child001/pneumonia.jpeg"],
                     study_folder_name(record, night2): ["child001/normal.jpeg"]}
    assert len(worklist(export)) == 2
    # the same folder, however named on a later night, keeps its export folder
    os.symlink(night1, tmp_path / "tonight")
    assert study_folder_name(record, tmp_path / "tonight") == study_folder_name(record, night1)
    assert study_folder_name(record, Path(os.path.relpath(night1))) == study_folder_name(record, night1)
    # a DICOM study's folder is named by its UID alone, as every earlier export named it
    dicom = {"study_key": "dicom:1.2.826.0.1.3680043.8.498.7", "patient_id": "P001", "study_date": "20260101"}
    assert study_folder_name(dicom, night1) == study_folder_name(dicom, night2) == "P001_20260101_117654acd9"


@pytest.mark.parametrize("name, exported", [
    ("CHEST_PA_2026-11-24_ACC123456_person1946_bacteria_4874.jpeg", "CHEST_PA_2026-11-24_ACC123456_perso.jpeg"),
    ("1.2.826.0.1.3680043.8.498.10931413211452.dcm", "1.2.826.0.1.3680043.8.498.1093141321.dcm"),
    ("SCAN OF CHILD WITH A VERY LONG NAME 0001.JPG", "SCAN_OF_CHILD_WITH_A_VERY_LONG_NAME.JPG"),
    ("cxr.jpeg", "cxr.jpeg"),  # short names as before: earlier exports keep their copies
    # a UID's last part is no suffix: the name is cut as before
    ("1.2.826.0.1.3680043.8.498.10931413211452.10931413211452", "1.2.826.0.1.3680043.8.498.10931413211452"),
    ("NORMAL2-IM-1427-0001-of-the-follow-up-series.dicom_backup", "NORMAL2-IM-1427-0001-of-the-fo.dicom_bac"),
])
def test_long_file_names_keep_their_suffix_in_the_export(name, exported):
    """A copy without its .dcm or .jpeg does not open in the viewer a double click starts."""
    item = InputFile(rel=f"child001/{name}", path=Path(name), size=1234, mtime=OLD)
    digest, _, rest = exported_name(item).partition("_")
    assert len(digest) == 8 and rest == exported and len(rest) <= 40


def test_the_page_says_which_images_of_a_flagged_study_were_not_scored_and_why(tmp_path):
    """The card's probability is its scored images' alone: a lateral the filter skipped and a frontal
    that could not be read are named, so the reader knows the model never looked at them."""
    studies = tmp_path / "studies"
    studies.mkdir()
    study_uid = "1.2.826.0.1.3680043.8.498.77"
    save(make_dataset(chest_pixels(), study_uid=study_uid), studies / "frontal.dcm")
    save(make_dataset(chest_pixels(), study_uid=study_uid, view="LL"), studies / "lateral.dcm")
    cut = make_dataset(chest_pixels(), study_uid=study_uid)
    cut.PixelData = cut.PixelData[:1000]
    save(cut, studies / "cut.dcm")
    export = tmp_path / "review"
    result = run(studies, "--out", tmp_path / "r.json", "--threshold", "0", "--export-flagged", export)
    assert result.returncode == 1, result.stderr  # the cut file is an error row
    reported = {i["file"]: i for i in json.loads((tmp_path / "r.json").read_text())["studies"][0]["images"]}
    assert [reported[f]["status"] for f in ("cut.dcm", "frontal.dcm", "lateral.dcm")] == ["error", "scored", "skipped"]
    (folder,) = study_folders(export)
    exported = {i["file"]: i for i in json.loads((folder / "result.json").read_text())["images"]}
    assert {f: exported[f]["reason"] for f in exported} == {f: reported[f]["reason"] for f in reported}
    page = (export / "index.html").read_text()
    assert '<div class="note">lateral.dcm: not scored (not_frontal_view)</div>' in page
    assert (f'<div class="note">cut.dcm: not scored (error: {reported["cut.dcm"]["reason"]})</div>'
            .replace("'", "&#x27;")) in page
    assert "frontal.dcm: not scored" not in page and "1 image(s) scored" in page


def test_the_multi_frame_note_reaches_the_result_and_the_page(tmp_path):
    """The report says only the first of the frames was looked at; so must the review."""
    studies = tmp_path / "studies"
    studies.mkdir()
    save(make_dataset(np.stack([chest_pixels()] * 3), WindowCenter=2048, WindowWidth=4096), studies / "cine.dcm")
    export = tmp_path / "review"
    result = run(studies, "--out", tmp_path / "r.json", "--threshold", "0", "--export-flagged", export)
    assert result.returncode == 0, result.stderr
    (reported,) = json.loads((tmp_path / "r.json").read_text())["studies"][0]["images"]
    assert reported["note"] == "first of 3 frames"
    (folder,) = study_folders(export)
    (image,) = json.loads((folder / "result.json").read_text())["images"]
    assert image["note"] == "first of 3 frames"
    assert '<div class="note">cine.dcm: first of 3 frames</div>' in (export / "index.html").read_text()

    card = dict(json.loads((folder / "result.json").read_text()),
                images=[dict(image, file="<b>x</b>.dcm", note='header: "<script>"')])
    page = render_html(export, [card])
    assert '<div class="note">&lt;b&gt;x&lt;/b&gt;.dcm: header: &quot;&lt;script&gt;&quot;</div>' in page
    assert "<script>" not in page


def test_a_looping_link_in_place_of_a_study_folder_fails_that_study_only(tmp_path):
    """Anyone who can write in the review share can leave one: the night's report and the other
    studies' export must not depend on it."""
    studies = tmp_path / "studies"
    records, flagged = [], []
    info = ModelInfo(path=tmp_path / "m.keras", sha256="0" * 64, threshold=0.5, threshold_source="test",
                     input_scale="raw", metadata={})
    for name in ("child001", "child002"):
        (studies / name).mkdir(parents=True)
        path = studies / name / "notes.txt"
        path.write_text("not an image")
        item = InputFile(rel=f"{name}/notes.txt", path=path, size=12, mtime=OLD, status="skipped",
                         reason="not_an_image")
        flagged.append(Study(f"path:{name}", name, files=[item]))
        records.append(dict(study_record(flagged[-1], info.threshold, info.sha256, "run-1"), flagged=True))
    export = tmp_path / "review"
    export.mkdir()
    loop = export / study_folder_name(records[0], studies)
    loop.symlink_to(loop.name)
    outcome = export_flagged(export, flagged, records, info, studies)
    assert (outcome.flagged, outcome.exported) == (2, 1)
    assert outcome.problem() == (f"1 of 2 flagged studies not exported whole (first: study child001: a broken "
                                 f"or looping link in the export folder: {loop}); 1 without a study folder")
    assert loop.is_symlink()
    assert json.loads((export / study_folder_name(records[1], studies) / "result.json").read_text())["study_id"] \
        == "child002"
    assert (export / "worklist.csv").is_file() and (export / "index.html").is_file()


def test_an_error_spanning_lines_is_one_line_in_the_result_and_the_summary(tmp_path, monkeypatch):
    """Keras explains a failure over many lines; the run's summary is the one line cron mails."""
    from pneumonia_batch import export, model

    studies = tmp_path / "studies"
    (studies / "child001").mkdir(parents=True)
    shutil.copy(PNEUMONIA_JPEG, studies / "child001" / "cxr.jpeg")
    path = studies / "child001" / "cxr.jpeg"
    item = InputFile(rel="child001/cxr.jpeg", path=path, size=path.stat().st_size, mtime=path.stat().st_mtime,
                     kind="jpeg", status="scored", probability=0.9)
    study = Study("path:child001", "child001", files=[item])
    info = ModelInfo(path=tmp_path / "m.keras", sha256="0" * 64, threshold=0.5, threshold_source="test",
                     input_scale="raw", metadata={})
    record = study_record(study, info.threshold, info.sha256, "run-1")

    def fails(*args):
        raise ValueError("A merge layer should be called on a list of inputs.\n"
                         "Received: inputs=tf.Tensor(\n[[1. 2.]\n [3. 4.]]) (not a list of tensors)")

    monkeypatch.setattr(model, "load_keras_model", lambda path, sha256: object())
    monkeypatch.setattr(export, "_write_overlay", fails)
    outcome = export_flagged(tmp_path / "review", [study], [record], info, studies)
    (folder,) = study_folders(tmp_path / "review")
    (image,) = json.loads((folder / "result.json").read_text())["images"]
    assert image["overlay_error"] == ("ValueError: A merge layer should be called on a list of inputs. "
                                      "Received: inputs=tf.Tensor( [[1. 2.] [3. 4.]]) (not a list of tensors)")
    assert outcome.problem() == (f"1 of 1 flagged studies not exported whole (first: child001: "
                                 f"child001/cxr.jpeg: no overlay: {image['overlay_error']}); "
                                 "a study folder's result.json lists each file's error")


def test_earlier_entries_are_told_apart_by_screened_folder_and_by_content(tmp_path):
    """Night folders name their files alike (``s/IM0001.dcm`` each night): an earlier night's image
    stays listed.  A file renamed since is listed once, not under both names.  A hand-edited
    probability out of range is dropped, never a crash that loses the report."""
    uid, export = "1.2.826.0.1.3680043.8.498.8", tmp_path / "review"
    pneumonia = pneumonia_pixels()
    nights = {"n1": make_dataset(chest_pixels(), study_uid=uid, WindowCenter=2048, WindowWidth=4096),
              "n2": make_dataset(pneumonia, study_uid=uid, bits_stored=8)}
    for name, ds in nights.items():
        (tmp_path / name / "s").mkdir(parents=True)
        save(ds, tmp_path / name / "s" / "IM0001.dcm")

    def night(folder, report):
        result = run(folder, "--out", tmp_path / report, "--threshold", "0", "--export-flagged", export)
        assert result.returncode == 0, result.stderr
        return float(rows(tmp_path / report)[0]["probability"])

    def listed():
        (folder,) = study_folders(export)
        return folder, json.loads((folder / "result.json").read_text())

    p2, p1 = night(tmp_path / "n2", "r2.csv"), night(tmp_path / "n1", "r1.csv")
    folder, result = listed()
    assert sorted((Path(i["screened"]).name, i["file"]) for i in result["images"]) == [
        ("n1", "s/IM0001.dcm"), ("n2", "s/IM0001.dcm")]
    assert result["probability"] == pytest.approx(max(p1, p2), abs=1e-6) and result["n_scored"] == 2

    (tmp_path / "n1" / "s" / "IM0001.dcm").rename(tmp_path / "n1" / "s" / "IM0001-renamed.dcm")
    night(tmp_path / "n1", "r3.csv")
    folder, result = listed()
    assert sorted((Path(i["screened"]).name, i["file"]) for i in result["images"]) == [
        ("n1", "s/IM0001-renamed.dcm"), ("n2", "s/IM0001.dcm")] and result["n_scored"] == 2

    for image in result["images"]:
        if Path(image["screened"]).name == "n2":
            image["probability"] = 10 ** 400  # a hand edit
    (folder / "result.json").write_text(json.dumps(result))
    night(tmp_path / "n1", "r4.csv")
    folder, result = listed()
    assert [i["file"] for i in result["images"]] == ["s/IM0001-renamed.dcm"]
    assert result["probability"] == pytest.approx(p1, abs=1e-6)
