"""The screening command end to end, through the real CLI in a subprocess, with the shipped model."""

import csv
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from pneumonia_batch.pipeline import NO_PROBABILITY
from tests.dicom_factory import EXAMPLES, chest_pixels, make_dataset, save, save_without_meta

ROOT = Path(__file__).resolve().parent.parent
NORMAL_JPEG = EXAMPLES / "paediatric-normal" / "NORMAL2-IM-1427-0001.jpeg"
PNEUMONIA_JPEG = EXAMPLES / "paediatric-pneumonia" / "person1946_bacteria_4874.jpeg"


def run(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "screen.py"), *map(str, args), "--no-progress"],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def all_files(root):
    return sorted(p.relative_to(root).as_posix() for p in Path(root).rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.name != ".DS_Store")


def test_examples_report(tmp_path):
    out = tmp_path / "report.csv"
    result = run(EXAMPLES, "--out", out)
    assert result.returncode == 0, result.stderr
    report = {r["study_id"]: r for r in rows(out)}
    assert len(report) == 5
    listed = sorted(f for r in report.values() for f in r["files"].split(";"))
    assert listed == all_files(EXAMPLES)
    assert report["paediatric-pneumonia"]["flagged"] == "true"
    assert float(report["paediatric-pneumonia"]["probability"]) > float(report["paediatric-normal"]["probability"])
    abdomen = next(r for r in report.values() if r["files"] == "dicom/ot-abdomen.dcm")
    assert (abdomen["status"], abdomen["reason"], abdomen["probability"]) == ("skipped", "modality_ot (1)", "")
    meta = json.loads((ROOT / "weights" / "densenet121_pneumonia.json").read_text())
    assert {r["threshold"] for r in report.values()} == {str(meta["threshold"]["value"])}
    assert {r["model_sha256"] for r in report.values()} == {meta["sha256"]}
    assert "4 studies scored, 4 flagged" in result.stderr and "0 file errors" in result.stderr
    rg1 = next(r for r in report.values() if r["files"] == "dicom/RG1_J2KR.dcm")  # from its header
    assert [rg1[c] for c in ("patient_id", "accession_number", "study_date", "n_images")] == \
        ["9RG1", "exam Number", "20040826", "1"]
    assert report["paediatric-normal"]["n_images"] == "2"
    # examples/README.md documents the normal study as a false positive at the shipped threshold
    assert report["paediatric-normal"]["flagged"] == "true"
    assert float(report["paediatric-normal"]["probability"]) == pytest.approx(0.21, abs=0.01)


def test_keras_tf_data_path_matches_tflite(tmp_path):
    """The GPU-style path (tf.data prefetch, fixed batch shape, padding) gives the same report."""
    reports = {}
    for runtime in ("keras", "tflite"):
        out = tmp_path / f"{runtime}.json"
        result = run(EXAMPLES, "--out", out, "--runtime", runtime, "--batch-size", "4")
        assert result.returncode == 0, result.stderr
        doc = json.loads(out.read_text())
        assert doc["run"]["runtime"] == runtime
        reports[runtime] = {i["file"]: i["probability"] for s in doc["studies"] for i in s["images"]
                            if i["status"] == "scored"}
    assert len(reports["keras"]) == 6 and reports["keras"].keys() == reports["tflite"].keys()
    for name, probability in reports["keras"].items():
        assert probability == pytest.approx(reports["tflite"][name], abs=1e-4)


@pytest.fixture
def messy(tmp_path):
    """Real studies mixed with everything an archive folder can hold."""
    root = tmp_path / "studies"
    (root / "kid").mkdir(parents=True)
    shutil.copy(PNEUMONIA_JPEG, root / "kid" / "frontal.jpeg")
    (root / "dicom" / "deep").mkdir(parents=True)
    pixels = chest_pixels()
    save(make_dataset(pixels, photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=4096,
                      patient_id="=cmd|'/c calc'!A1"), root / "dicom" / "mono1.dcm")
    save(make_dataset(pixels, view="LL"), root / "dicom" / "lateral.dcm")
    save(make_dataset(pixels, body_part="KNEE"), root / "dicom" / "knee.dcm")
    trunc = save(make_dataset(pixels), root / "dicom" / "deep" / "truncated.dcm")
    trunc.write_bytes(trunc.read_bytes()[:-4000])
    shutil.copy(get_testdata_file("reportsi.dcm"), root / "dicom" / "report_sr")
    codec = make_dataset(np.zeros((4, 4), np.uint16), modality="DX")
    lossy = __import__("pydicom").dcmread(get_testdata_file("JPEG-lossy.dcm"))
    lossy.Modality, lossy.SOPClassUID, lossy.BodyPartExamined = "DX", codec.SOPClassUID, "CHEST"
    lossy.save_as(root / "dicom" / "jpeg12bit.dcm")
    (root / "empty.dcm").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    os.symlink(root / "loop2", root / "loop1")
    os.symlink(root / "loop1", root / "loop2")
    return root


def test_messy_folder_gives_a_row_for_every_file_and_no_crash(messy, tmp_path):
    out = tmp_path / "report.json"
    result = run(messy, "--out", out)
    assert result.returncode == 1, result.stderr  # some files could not be read
    doc = json.loads(out.read_text())
    listed = sorted(f for s in doc["studies"] for f in s["files"])
    assert listed == all_files(messy)
    images = {i["file"]: i for s in doc["studies"] for i in s["images"]}
    assert images["kid/frontal.jpeg"]["status"] == "scored"
    assert images["dicom/mono1.dcm"]["status"] == "scored"
    assert images["dicom/lateral.dcm"]["reason"] == "not_frontal_view"
    assert images["dicom/knee.dcm"]["reason"] == "not_chest"
    assert images["dicom/report_sr"]["reason"] == "not_an_image_sop_class"
    assert "truncated" in images["dicom/deep/truncated.dcm"]["reason"]
    # the codec's own words, not only pydicom's first line
    assert "plugins: pylibjpeg: " in images["dicom/jpeg12bit.dcm"]["reason"]
    assert images["dicom/jpeg12bit.dcm"]["reason"].endswith(
        "; pillow: Pillow does not support 'JPEG Extended' for samples with 12-bit precision")
    assert images["empty.dcm"]["reason"] == "empty file"
    assert images["notes.txt"]["reason"] == "not_an_image"
    assert images["broken.png"]["status"] == "error"
    counts = {k: v for k, v in doc["run"]["counts"].items() if k != "flagged"}  # flagged: the model's call
    assert counts == {"studies": 12, "scored": 2, "skipped": 4, "deferred": 0, "error_studies": 6, "files": 12,
                      "images_scored": 2, "file_errors": 6, "previous_studies": 0}
    assert "2 studies scored" in result.stderr and "4 skipped, 6 file errors" in result.stderr
    # n_images: DICOM, PNG and JPEG files; a text file, an empty file or a link loop is none
    n_images = {s["study_id"]: s["n_images"] for s in doc["studies"] if not s["study_id"][0].isdigit()}
    assert n_images == {"broken.png": 1, "empty.dcm": 0, "kid": 1, "loop1": 0, "loop2": 0, "notes.txt": 0}


def test_csv_neutralises_formulas_from_headers(messy, tmp_path):
    out = tmp_path / "report.csv"
    run(messy, "--out", out)
    patient_ids = {r["patient_id"] for r in rows(out)}
    assert "'=cmd|'/c calc'!A1" in patient_ids


def test_a_model_giving_nan_makes_error_rows_not_unflagged_scores(tmp_path):
    """NaN compares below every threshold: scored, it would pass a sick study as healthy, silently."""
    import keras

    model = keras.Sequential([keras.Input((224, 224, 3)), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(2, activation="softmax")])
    kernel, bias = model.layers[-1].get_weights()
    model.layers[-1].set_weights([np.full_like(kernel, np.nan), bias])
    model.save(tmp_path / "damaged.keras")
    out = tmp_path / "r.json"
    result = run(EXAMPLES / "paediatric-pneumonia", "--out", out, "--model", tmp_path / "damaged.keras",
                 "--input-scale", "raw", "--threshold", "0.5", "--runtime", "keras")
    assert result.returncode == 1, result.stderr
    doc = json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in the JSON report"))
    images = [i for s in doc["studies"] for i in s["images"]]
    assert len(images) == 2
    assert {(i["status"], i["probability"], i["reason"]) for i in images} == {("error", None, NO_PROBABILITY)}
    assert doc["run"]["counts"]["file_errors"] == 2 and doc["run"]["counts"]["flagged"] == 0
    # evaluate and calibrate refuse such a model: no metric or threshold would mean anything
    from pneumonia_batch.dataset import LabelledImage
    from pneumonia_batch.evaluate import predict_items

    with pytest.raises(ValueError, match=r"NaN or infinite.*\(1 of 1 images\)"):
        predict_items(tmp_path / "damaged.keras", [LabelledImage(PNEUMONIA_JPEG, 1, "jpeg")], "raw")


def test_fatal_and_usage_exit_codes(tmp_path):
    assert run(EXAMPLES, "--out", tmp_path / "r.csv", "--model", tmp_path / "none.keras").returncode == 4
    model = tmp_path / "m.keras"
    shutil.copy(ROOT / "weights" / "densenet121_pneumonia.keras", model)
    shutil.copy(ROOT / "weights" / "densenet121_pneumonia.json", tmp_path / "m.json")
    with open(model, "ab") as handle:
        handle.write(b"x")
    result = run(EXAMPLES, "--out", tmp_path / "r.csv", "--model", model)
    assert result.returncode == 4 and "does not match its metadata" in result.stderr
    assert run(EXAMPLES, "--out", tmp_path / "missing" / "r.csv").returncode == 4
    result = run(EXAMPLES, "--out", tmp_path / "r.csv", "--input-scale", "imagenet")  # the model states raw
    assert result.returncode == 4 and "states the model's input scale, raw" in result.stderr
    assert run(EXAMPLES, "--out", tmp_path / "r.xlsx").returncode == 2
    assert run(EXAMPLES, "--out", tmp_path / "r.csv", "--threshold", "2").returncode == 2
    for option in ("--threshold", "--min-age"):  # nan passes every range test: it compares false
        result = run(EXAMPLES, "--out", tmp_path / "r.csv", option, "nan")
        assert result.returncode == 2 and "'nan' is not a finite number" in result.stderr
    assert not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize("metadata, refusal", [
    ({"threshold": {"value": float("nan")}}, "threshold nan is not a probability"),
    ({"threshold": {"value": 1.5}}, "threshold 1.5 is not a probability"),
    ({"threshold": {"value": None}}, "threshold None is not a probability"),
    ({"threshold": 0.3}, "not a metadata file of this tool"),
    ({"preprocessing": "raw"}, "not a metadata file of this tool"),
    ({"preprocessing": None}, "not a metadata file of this tool"),
    ({"tflite": []}, "not a metadata file of this tool"),
])
def test_metadata_without_a_usable_threshold_is_refused(tmp_path, metadata, refusal):
    from pneumonia_batch.model import ModelError, read_model_info

    model = tmp_path / "m.keras"
    model.symlink_to(ROOT / "weights" / "densenet121_pneumonia.keras")
    meta = json.loads((ROOT / "weights" / "densenet121_pneumonia.json").read_text())
    (tmp_path / "m.json").write_text(json.dumps({**meta, **metadata}))
    with pytest.raises(ModelError, match=refusal):
        read_model_info(model)


def test_a_model_with_a_damaged_threshold_is_a_fatal_error(tmp_path):
    model = tmp_path / "m.keras"
    model.symlink_to(ROOT / "weights" / "densenet121_pneumonia.keras")
    meta = json.loads((ROOT / "weights" / "densenet121_pneumonia.json").read_text())
    (tmp_path / "m.json").write_text(json.dumps({**meta, "threshold": {"value": float("nan")}}))
    result = run(EXAMPLES, "--out", tmp_path / "r.csv", "--model", model)
    assert (result.returncode, result.stderr) == (4, "error: metadata m.json: its threshold nan is not a "
                                                      "probability from 0 to 1\n")
    assert not (tmp_path / "r.csv").exists()


def test_outputs_that_would_overwrite_each_other_or_an_x_ray_are_refused(tmp_path):
    studies = tmp_path / "studies"
    shutil.copytree(EXAMPLES, studies)
    before = {p: p.read_bytes() for p in studies.rglob("*") if p.is_file()}
    x_ray = studies / "paediatric-normal" / NORMAL_JPEG.name
    dicom = studies / "dicom" / "ot-abdomen.dcm"
    bare = save_without_meta(make_dataset(chest_pixels(64)), studies / "bare")
    before[bare] = bare.read_bytes()
    report = tmp_path / "r.csv"
    for args, refusal in [
        (["--out", x_ray, "--format", "csv"], f"--out {x_ray} is an image (jpeg)"),
        (["--out", report, "--log-file", dicom], f"--log-file {dicom} is an image (dicom)"),
        (["--out", report, "--log-file", report], f"--out and --log-file name the same file, {report}"),
        (["--out", report, "--state", tmp_path / "." / "r.csv"], "--out and --state name the same file"),
        (["--out", report, "--export-flagged", report], "--out and --export-flagged name the same file"),
        (["--out", tmp_path / "m.json", "--model", tmp_path / "m.keras"],
         "--out and --model's metadata name the same file"),
        (["--out", tmp_path / "m.tflite", "--format", "csv", "--model", tmp_path / "m.keras"],
         "--out and --model's TFLite conversion name the same file"),
        (["--out", bare, "--format", "csv"], f"--out {bare} is an image (dicom)"),  # DICOM without preamble
    ]:
        result = run(studies, *args)
        assert result.returncode == 2 and refusal in result.stderr, (args, result.stderr)
    assert {p: p.read_bytes() for p in studies.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["studies"]



def test_a_report_or_state_named_onto_a_device_or_fifo_is_refused_and_the_device_kept(tmp_path):
    """The report is replaced atomically: a regular file renamed over the name.  Over /dev/null, as
    root, that deletes the machine's /dev/null; over a FIFO, the reader waits forever."""
    from pneumonia_batch.atomic import CannotWrite, write_atomic

    specials = [(tmp_path / "fifo", "FIFO")]
    os.mkfifo(specials[0][0])
    if os.geteuid() == 0:  # only root may make a device node
        os.mknod(tmp_path / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        specials.append((tmp_path / "null", "character device"))
    for path, kind in specials:
        for option, args in (("--out", ["--out", path, "--format", "csv"]),
                             ("--state", ["--out", tmp_path / "r.csv", "--state", path])):
            result = run(EXAMPLES, *args)
            assert result.returncode == 2 and f"{option} {path} is a {kind}, not a plain file" in result.stderr
        with pytest.raises(CannotWrite, match=f"it is a {kind}, not a file this tool can replace"):
            write_atomic(path, "report\n")  # the export and calibrate write through it too
        assert stat.S_IFMT(path.lstat().st_mode) != stat.S_IFREG
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p, _ in specials)

def test_outputs_the_review_export_would_write_over_are_refused(tmp_path):
    """The worklist, the page and a study folder's files are the export's: a report, state or log
    named there would be replaced by it, or replace it.  A report beside them is fine."""
    studies, review = tmp_path / "studies", tmp_path / "review"
    shutil.copytree(EXAMPLES / "paediatric-pneumonia", studies / "child")
    study_folder = review / "P001_20260101_117654acd9"  # as an earlier night's export left them
    study_folder.mkdir(parents=True)
    for path in (review / "worklist.csv", review / "index.html", study_folder / "result.json"):
        path.write_text(f"{path.name} of an earlier night\n")
    before = {p: p.read_bytes() for p in review.rglob("*") if p.is_file()}
    for option, path in [("--out", review / "index.html"), ("--log-file", review / "worklist.csv"),
                         ("--state", study_folder / "state.db"), ("--out", study_folder / "result.json")]:
        args = ["--out", tmp_path / "r.csv", option, path] if option != "--out" else [option, path]
        result = run(studies, *args, "--format", "csv", "--export-flagged", review)
        assert result.returncode == 2 and f"{option} {path} is a file the review export writes" in result.stderr, \
            result.stderr
    assert {p: p.read_bytes() for p in review.rglob("*") if p.is_file()} == before
    result = run(studies, "--out", review / "report.csv", "--export-flagged", review, "--threshold", "1")
    assert result.returncode == 0 and len(rows(review / "report.csv")) == 1  # nothing flagged: no model load

@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nothing can be written in: a read-only mount for root (which ignores mode bits)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only file system here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_an_output_that_cannot_be_written_is_refused_before_scoring(tmp_path, read_only_folder):
    report = tmp_path / "r.csv"
    for option, path in (("--out", read_only_folder / "r.csv"), ("--state", read_only_folder / "s.db"),
                         ("--log-file", read_only_folder / "audit.jsonl")):
        args = ["--out", path] if option == "--out" else ["--out", report, option, path]
        result = run(EXAMPLES, *args, "--verbose")
        assert result.returncode == 4, result.stderr
        refusal = (f"error: cannot write the audit log {path}: " if option == "--log-file"  # at its opening
                   else f"error: {option}: cannot write in {read_only_folder}")
        assert refusal in result.stderr
        assert "images to score" not in result.stderr  # refused before any file was looked at
    (tmp_path / "plain-file").write_text("")
    result = run(EXAMPLES, "--out", tmp_path / "plain-file" / "r.csv")
    assert result.returncode == 4 and "plain-file is not a folder" in result.stderr
    (tmp_path / "latest.csv").symlink_to(tmp_path / "unmounted-share" / "latest.csv")
    result = run(EXAMPLES, "--out", tmp_path / "latest.csv", "--verbose")  # the link's folder is fine
    assert result.returncode == 4 and "unmounted-share does not exist" in result.stderr
    assert "images to score" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.csv", "plain-file", "read-only"]


def as_ordinary_user(command: list[str]) -> list[str]:
    """The command, run without root's power to read and write anywhere, when the tests run as root."""
    if os.geteuid() != 0:
        return command
    if not shutil.which("capsh"):
        pytest.skip("capsh is needed to run without root's permission override")
    return ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", shlex.join(command)]


def test_an_unreadable_folder_or_file_is_an_error_row_not_a_silent_drop(tmp_path):
    studies = tmp_path / "studies"
    shutil.copytree(EXAMPLES / "paediatric-pneumonia", studies / "kid")
    shutil.copytree(EXAMPLES / "paediatric-normal", studies / "locked")
    secret = studies / "kid" / PNEUMONIA_JPEG.name
    command = as_ordinary_user([sys.executable, str(ROOT / "screen.py"), str(studies), "--out",
                                str(tmp_path / "r.csv"), "--no-progress"])
    (studies / "locked").chmod(0)
    secret.chmod(0)
    try:
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    finally:
        (studies / "locked").chmod(0o755)
        secret.chmod(0o644)
    assert result.returncode == 1 and "2 file errors" in result.stderr, result.stderr
    report = {r["study_id"]: (r["status"], r["n_scored"], r["reason"]) for r in rows(tmp_path / "r.csv")}
    assert report == {"kid": ("scored", "1", "error: cannot read: Permission denied (1)"),
                      "locked": ("error", "0", "error: folder not readable: Permission denied (1)")}


def test_an_existing_log_in_a_closed_folder_is_appended_to(tmp_path):
    """A log file the service may write, in a folder it may not (say /var/log)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    log = logs / "audit.jsonl"
    log.write_text("")
    log.chmod(0o666)
    logs.chmod(0o555)
    command = as_ordinary_user([sys.executable, str(ROOT / "screen.py"), str(EXAMPLES), "--out",
                                str(tmp_path / "r.csv"), "--log-file", str(log), "--no-progress"])
    try:
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    finally:
        logs.chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert json.loads(log.read_text().splitlines()[-1])["event"] == "run_end"
    assert sorted(p.name for p in logs.iterdir()) == ["audit.jsonl"]
    result = run(EXAMPLES, "--out", tmp_path / "r.csv", "--log-file", "/dev/stdout", "--quiet")
    assert result.returncode == 0 and json.loads(result.stdout.splitlines()[-1])["event"] == "run_end"
    os.mkfifo(tmp_path / "nobody-reads")
    result = run(EXAMPLES, "--out", tmp_path / "r.csv", "--log-file", tmp_path / "nobody-reads", timeout=60)
    assert result.returncode == 4
    assert result.stderr == f"error: cannot write the audit log {tmp_path / 'nobody-reads'}: No such device or address\n"
    os.mkfifo(tmp_path / "read-by-cat")  # a reader that stops at its first end of file
    with open(tmp_path / "cat.out", "w") as out:
        reader = subprocess.Popen(["cat", str(tmp_path / "read-by-cat")], stdout=out)
        result = run(EXAMPLES, "--out", tmp_path / "r.csv", "--log-file", tmp_path / "read-by-cat", timeout=120)
        reader.wait(timeout=60)
    assert result.returncode == 0, result.stderr
    events = [json.loads(line)["event"] for line in (tmp_path / "cat.out").read_text().splitlines()]
    assert events[0] == "run_start" and events[-1] == "run_end"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_log_on_a_full_disk_is_named(tmp_path):
    """/dev/full opens like a log on a full disk: every write then fails with ENOSPC alone."""
    result = run(EXAMPLES, "--out", tmp_path / "r.csv", "--log-file", "/dev/full")
    assert result.returncode == 4
    assert result.stderr == "error: cannot write the audit log /dev/full: No space left on device\n"
    assert not (tmp_path / "r.csv").exists()


def test_a_closed_stderr_does_not_stop_screening(tmp_path):
    """A cron line ending in 2>&- : no progress bar, no message, but the report all the same."""
    command = [sys.executable, str(ROOT / "screen.py"), str(EXAMPLES), "--out", str(tmp_path / "r.csv"), "-q"]
    result = subprocess.run(["sh", "-c", shlex.join(command) + " 2>&-"], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0 and len(rows(tmp_path / "r.csv")) == 5
    # and the command gives descriptor 2 to /dev/null, not to the next file opened (the log, the lock)
    probe = ("import os, sys; os.close(2); from click.testing import CliRunner; "
             "from pneumonia_batch.cli import screen; "
             "result = CliRunner().invoke(screen, sys.argv[1:]); "
             "print(result.exit_code, os.readlink('/proc/self/fd/2'))")
    result = subprocess.run([sys.executable, "-c", probe, str(EXAMPLES), "--out", str(tmp_path / "r2.csv"), "-q",
                             "--log-file", str(tmp_path / "audit.jsonl")], capture_output=True, text=True, cwd=ROOT)
    assert result.stdout.split() == ["0", os.devnull], result.stdout


def test_ctrl_c_while_the_model_loads_exits_130(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pneumonia_batch import cli, model

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "read_model_info", interrupted)
    result = CliRunner().invoke(cli.screen, [str(EXAMPLES), "--out", str(tmp_path / "r.csv")])
    assert result.exit_code == 130 and result.output == "interrupted: no report written\n"


@pytest.mark.parametrize("options", [("--runtime", "tflite"), ("--runtime", "keras", "--export-flagged", "review")],
                         ids=["tflite", "keras-and-export"])
def test_quiet_run_writes_nothing_on_stderr(tmp_path, options):
    """What cron mails: nothing on a good night, native libraries' notices included (LiteRT's, and
    TensorFlow's at import for the Keras runtime and the review export's Grad-CAM)."""
    options = [tmp_path / o if o == "review" else o for o in options]
    result = run(EXAMPLES, "--out", tmp_path / "r.csv", "--quiet", *options)
    assert result.returncode == 0 and result.stderr == ""
    assert len(rows(tmp_path / "r.csv")) == 5  # the example studies


def test_a_quiet_run_with_files_it_could_not_read_says_so(tmp_path):
    """Cron mails stderr: on the night a file cannot be read, quiet is not silent."""
    (tmp_path / "in" / "child").mkdir(parents=True)
    shutil.copy(NORMAL_JPEG, tmp_path / "in" / "child" / "cxr.jpeg")
    (tmp_path / "in" / "child" / "cut.jpeg").write_bytes(NORMAL_JPEG.read_bytes()[:300])
    result = run(tmp_path / "in", "--out", tmp_path / "r.csv", "--quiet")
    assert result.returncode == 1
    assert result.stderr == f"error: 1 file could not be read; the report {tmp_path / 'r.csv'} says which and why\n"
    (study,) = rows(tmp_path / "r.csv")
    assert (study["n_images"], study["n_scored"]) == ("2", "1") and study["reason"].startswith("error:")

def test_what_pydicom_repairs_or_warns_of_is_noted_in_the_report_not_on_stderr(tmp_path):
    """A patient ID that is not UTF-8 though the header says so: pydicom decodes it with a
    replacement character and warns; pixel data longer than its header says: pydicom drops the
    excess and warns, in the decode process.  The warnings go to the images' notes, and a quiet
    night stays quiet."""
    (tmp_path / "in").mkdir()
    ds = make_dataset(chest_pixels(256), SpecificCharacterSet="ISO_IR 192")
    ds.PatientID = b"M\xfcller"  # Latin-1 bytes
    save(ds, tmp_path / "in" / "cxr.dcm")
    padded = make_dataset(chest_pixels(256), study_uid=ds.StudyInstanceUID)
    padded.PixelData += bytes(1000)
    save(padded, tmp_path / "in" / "padded.dcm")
    # a file meta naming explicit VR before an implicit VR body: pydicom warns at every parse
    from pydicom.uid import ImplicitVRLittleEndian

    implicit = make_dataset(chest_pixels(256), study_uid=ds.StudyInstanceUID)
    explicit_meta = save(make_dataset(chest_pixels(8)), tmp_path / "explicit.dcm").read_bytes()
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    implicit_body = save(implicit, tmp_path / "implicit.dcm").read_bytes()

    def meta_end(data):  # preamble, DICM, then (0002,0000) holding the length of the rest of group 2
        return 144 + int.from_bytes(data[140:144], "little")

    (tmp_path / "in" / "mismatch.dcm").write_bytes(explicit_meta[:meta_end(explicit_meta)]
                                                   + implicit_body[meta_end(implicit_body):])
    # the review export decodes the flagged study's images again, at full size, for its overlays
    result = run(tmp_path / "in", "--out", tmp_path / "r.json", "--quiet", "--export-flagged", tmp_path / "review")
    assert result.returncode == 0 and result.stderr == ""
    (study,) = json.loads((tmp_path / "r.json").read_text())["studies"]
    assert study["status"] == "scored" and study["patient_id"] == "M\ufffdller"
    assert study["flagged"] and len(list((tmp_path / "review").rglob("*overlay*"))) == 3
    notes = {i["file"]: i["note"] for i in study["images"] if i["status"] == "scored"}
    assert notes == {
        "cxr.dcm": "header: Failed to decode byte string with encoding 'UTF8' - using replacement "
                   "characters in decoded string",
        "padded.dcm": "decode: The pixel data is 132072 bytes long, which indicates it contains 1000 bytes "
                      "of excess padding to be removed",
        # said once, though the decode parses the header again
        "mismatch.dcm": "header: Expected explicit VR, but found implicit VR - using implicit VR for reading"}


def test_help_documents_exit_codes():
    result = run("--help")
    assert result.returncode == 0
    assert "Exit codes" in result.stdout and "another run holds the lock" in result.stdout
