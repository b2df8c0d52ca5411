"""Training, saving, loading and integrity of model files."""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pneumonia_batch.dataset import patient_of
from pneumonia_batch.evaluate import RUNTIME_MARGIN
from pneumonia_batch.model import ModelError, build_model, metadata_path, read_model_info, sha256_of
from pneumonia_batch.train import UNFREEZE_FROM_LAYER, _set_trainable, Phase, check_options, parse_schedule

ROOT = Path(__file__).resolve().parent.parent
KERMANY = ROOT.parent / "shared" / "data" / "kermany224"


@contextmanager
def untraced_steps():
    """Keras's train and test steps run eagerly instead of traced into a graph.

    Tracing DenseNet-121's training step costs about 80 s per input size on two
    cores, far longer than the two or three steps these runs take; the
    operations are the same.  test_fine_tuning_with_weight_averaging keeps the
    traced path, which real training runs take, under test.
    """
    import tensorflow as tf

    tf.config.run_functions_eagerly(True)
    try:
        yield
    finally:
        tf.config.run_functions_eagerly(False)


@pytest.fixture(scope="module")
def tiny_training(tmp_path_factory):
    """A real training run on a handful of images: one low-resolution epoch, one at 224."""
    from pneumonia_batch.train import train

    if not KERMANY.is_dir():
        pytest.skip("training data not available")
    out = tmp_path_factory.mktemp("model") / "tiny.keras"
    with untraced_steps():
        model, meta = train(KERMANY, out, parse_schedule("32:1,224:1"), batch_size=4, limit=4,
                            run_dir=out.parent / "run", log=lambda m: None)
    return out, model, meta


def pneumonia_probabilities(model, batch):
    return np.asarray(model(batch.astype(np.float32), training=False))[:, 1]


def random_batch(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3)).astype(np.uint8)


def test_training_writes_model_metadata_history_and_threshold(tiny_training):
    out, _, meta = tiny_training
    saved = json.loads(metadata_path(out).read_text())
    assert saved["sha256"] == read_model_info(out).sha256
    assert saved["training"]["n_train"] == 8 and saved["training"]["n_validation"] == 8
    assert [p["size"] for p in saved["training"]["schedule"]] == [32, 224]
    assert 0.0 <= saved["threshold"]["value"] <= 1.0
    assert saved["validation"]["at_threshold"]["sensitivity"] >= 0.97  # by construction on 4 cases
    history = out.with_suffix(".history.csv").read_text().splitlines()
    assert history[0].startswith("epoch") and len(history) == 3
    assert out.with_suffix(".curves.png").stat().st_size > 1000
    assert sorted(p.name for p in out.parent.iterdir()) == [  # no temporary file left behind
        "run", "tiny.curves.png", "tiny.history.csv", "tiny.json", "tiny.keras"]
    # the split is pinned for any resume of the run
    split = json.loads((out.parent / "run" / "progress.json").read_text())["split"]
    assert {k: split[k] for k in ("data", "seed", "val_fraction", "limit")} == {
        "data": str((KERMANY / "train").resolve()), "seed": 0, "val_fraction": 0.1, "limit": 4}
    assert re.fullmatch("[0-9a-f]{64}", split["validation_sha256"])
    assert saved["training"]["data"] == str((KERMANY / "train").resolve())


def test_training_decodes_files_exactly_as_screening_does(tmp_path):
    """Without augmentation the 224 px training pipeline gives the model screening's very input:
    for a Kermany 224 px JPEG, a full-size JPEG (decoded at a reduced scale) and a 16-bit PNG.
    TensorFlow's own decoders were up to 2 grey levels off on the first, 4-10 on the second and
    left the third almost black."""
    from PIL import Image

    from pneumonia_batch.dataset import LabelledImage
    from pneumonia_batch.preprocess import model_input_from_file
    from pneumonia_batch.train import image_dataset

    if not KERMANY.is_dir():
        pytest.skip("training data not available")
    png = tmp_path / "twelve-bit.png"  # 12-bit values in a 16-bit PNG, as exported from a DR system
    Image.fromarray(np.linspace(100, 4000, 300 * 250).reshape(300, 250).astype(np.uint16)).save(png)
    assert Image.open(png).mode == "I;16"
    items = [LabelledImage(sorted((KERMANY / "train" / "NORMAL").iterdir())[0], 0, "jpeg"),
             LabelledImage(ROOT / "examples" / "studies" / "paediatric-normal" / "NORMAL2-IM-1427-0001.jpeg",
                           0, "jpeg"),
             LabelledImage(png, 1, "png")]
    batches = list(image_dataset(items, 224, 8, augment=False, seed=0))
    images, labels = batches[0][0].numpy(), batches[0][1].numpy()
    assert len(batches) == 1 and images.shape == (3, 224, 224, 3) and labels.tolist() == [0, 0, 1]
    for item, image in zip(items, images):
        np.testing.assert_array_equal(image, model_input_from_file(str(item.path), item.kind)[0])
    assert images[2].min() == 0 and images[2].max() == 255  # the 16-bit PNG spans the grey range


def test_undecodable_training_images_are_left_out_and_reported(tmp_path):
    """A truncated JPEG among the training images: named in the log with its error, and the run
    trains and validates on the others."""
    from pneumonia_batch.train import train

    data = tmp_path / "data"
    for label in ("NORMAL", "PNEUMONIA"):
        shutil.copytree(ROOT / "examples" / "studies" / f"paediatric-{label.lower()}", data / label)
    cut = data / "PNEUMONIA" / "person1_bacteria_1.jpeg"
    cut.write_bytes((data / "PNEUMONIA" / "person1946_bacteria_4874.jpeg").read_bytes()[:20000])
    out, logged = tmp_path / "m.keras", []
    with untraced_steps():
        train(data, out, parse_schedule("224:1"), batch_size=2, val_fraction=0.5, run_dir=tmp_path / "run",
              log=logged.append)
    reason = "error: OSError: image file is truncated (3 bytes not processed)"
    assert logged[:2] == [f"1 files under {data} not used: {reason} (1)",
                          f"  PNEUMONIA/person1_bacteria_1.jpeg: {reason}"]
    assert logged[2].startswith("training on 2 images, validating on 2 (2 patients held out)")
    saved = json.loads(metadata_path(out).read_text())
    assert (saved["training"]["n_train"], saved["validation"]["n_images"]) == (2, 2)


def test_the_log_names_twenty_files_left_out_and_counts_the_rest(tmp_path):
    from pneumonia_batch.train import train

    data = tmp_path / "data"
    shutil.copytree(ROOT / "examples" / "studies" / "paediatric-normal", data / "NORMAL")
    for n in range(22):
        (data / "NORMAL" / f"notes-{n:02d}.txt").write_text("not an image")
    logged = []
    with pytest.raises(ValueError, match="PNEUMONIA"):  # refused for its one class, once listed
        train(data, tmp_path / "m.keras", parse_schedule("224:1"), run_dir=tmp_path / "run", log=logged.append)
    assert logged[0] == f"22 files under {data} not used: not_an_image (22)"
    assert logged[1:] == [f"  NORMAL/notes-{n:02d}.txt: not_an_image" for n in range(20)] + ["  and 2 more"]


def test_saved_model_gives_the_in_memory_probabilities(tiny_training):
    from pneumonia_batch.inference import KerasRunner

    out, model, _ = tiny_training
    batch = random_batch(3, seed=0)
    np.testing.assert_allclose(KerasRunner(out, "raw").predict(batch), pneumonia_probabilities(model, batch),
                               atol=1e-6)


def test_resume_continues_after_the_last_checkpoint(tiny_training, tmp_path, monkeypatch):
    from pneumonia_batch import train as training
    from pneumonia_batch.train import train

    augmented_seeds = []
    make_dataset = training.image_dataset

    def recording_dataset(items, size, batch_size, augment, seed):
        if augment:
            augmented_seeds.append(seed)
        return make_dataset(items, size, batch_size, augment, seed)

    monkeypatch.setattr(training, "image_dataset", recording_dataset)
    out, _, _ = tiny_training
    run_dir = tmp_path / "run"
    shutil.copytree(out.parent / "run", run_dir)
    progress = json.loads((run_dir / "progress.json").read_text())
    assert progress["completed_epochs"] == 2 == training.finished_epochs(out, run_dir)  # as a stop reports it
    resumed = tmp_path / "resumed.keras"
    logged = []
    with untraced_steps():
        train(KERMANY, resumed, parse_schedule("32:1,224:2"), batch_size=4, limit=4, run_dir=run_dir,
              resume=True, log=logged.append)
    progress = json.loads((run_dir / "progress.json").read_text())
    assert [row["epoch"] for row in progress["history"]] == [1, 2, 3]  # epochs 1-2 not run again
    assert [row["size"] for row in progress["history"]] == [32, 224, 224]
    # the checkpoint kept is the 224 px epoch with the lowest validation loss, across the resume
    best = min(progress["history"][1:], key=lambda row: row["val_loss"])
    assert any("resumed from" in line and "after epoch 2" in line for line in logged)
    # epoch 3 gets a shuffle of its own, not the one the 224 px phase began with (seed 1)
    assert augmented_seeds == [2]
    # Adam goes on counting from epoch 2's two steps (8 images, batch 4) instead of restarting
    assert "restored the optimiser state of epoch 2" in logged
    with np.load(run_dir / "epoch-003.optimizer.npz") as saved:
        assert int(saved["arr_0"]) == 4
    # only the last epoch's files are kept, and the best epoch's weights, which are the model saved
    best_weights = run_dir / f"epoch-{best['epoch']:03d}.weights.h5"
    assert sorted(f.name for f in run_dir.iterdir()) == sorted({
        "epoch-003.optimizer.npz", "epoch-003.weights.h5", best_weights.name, "progress.json"})
    from pneumonia_batch.inference import KerasRunner

    reference = build_model(224, init="random")
    reference.load_weights(best_weights)
    batch = random_batch(2, seed=1)
    np.testing.assert_allclose(KerasRunner(resumed, "raw").predict(batch),
                               pneumonia_probabilities(reference, batch), atol=1e-6)


def test_a_phase_that_had_stopped_early_stays_stopped_on_resume(tiny_training, tmp_path):
    """A run killed after its early stop, before the model was saved: the resume trains no
    more epochs of that phase and saves its best epoch."""
    from pneumonia_batch.train import train

    out, _, _ = tiny_training
    run_dir = tmp_path / "run"
    shutil.copytree(out.parent / "run", run_dir)
    progress = json.loads((run_dir / "progress.json").read_text())
    # epoch 3 of the 224 px phase was worse than epoch 2: at patience 1 the phase stopped there
    progress["history"].append(dict(progress["history"][-1], epoch=3,
                                    val_loss=progress["history"][-1]["val_loss"] + 1.0))
    progress["completed_epochs"] = 3
    (run_dir / "progress.json").write_text(json.dumps(progress))
    epoch_2 = build_model(224, init="random")
    epoch_2.load_weights(run_dir / "epoch-002.weights.h5")
    epoch_3 = build_model(224, init="random")
    epoch_3.set_weights([w * 0.5 for w in epoch_2.get_weights()])
    epoch_3.save_weights(run_dir / "epoch-003.weights.h5")
    resumed, logged = tmp_path / "resumed.keras", []
    train(KERMANY, resumed, parse_schedule("32:1,224:4"), batch_size=4, limit=4, run_dir=run_dir,
          resume=True, patience=1, log=logged.append)
    assert "phase 2/2 had stopped early after epoch 3" in logged
    assert not any(line.startswith(("phase 2/2: 224px", "restored the optimiser")) for line in logged)
    assert json.loads((run_dir / "progress.json").read_text()) == progress  # no epoch 4
    assert not (run_dir / "epoch-004.weights.h5").exists()
    saved = json.loads(metadata_path(resumed).read_text())["training"]
    assert saved["epochs_run"] == 3 and saved["checkpoint"].startswith("epoch 2,")
    from pneumonia_batch.inference import KerasRunner

    batch = random_batch(2, seed=2)
    expected = [pneumonia_probabilities(m, batch) for m in (epoch_2, epoch_3)]
    assert np.abs(expected[0] - expected[1]).max() > 1e-3  # the two epochs are told apart
    np.testing.assert_allclose(KerasRunner(resumed, "raw").predict(batch), expected[0], atol=1e-6)


def test_epochs_run_counts_the_epochs_trained_when_an_earlier_phase_stopped_early(tiny_training, tmp_path):
    """The history of a run whose 3-epoch phase stopped early after its second epoch: the next
    phase's epoch is numbered 4, but three epochs were trained.  The resume finds every phase done
    and saves the model."""
    from pneumonia_batch.train import train

    out, _, _ = tiny_training
    run_dir = tmp_path / "run"
    shutil.copytree(out.parent / "run", run_dir)
    progress = json.loads((run_dir / "progress.json").read_text())
    first, last = progress["history"]
    worse = dict(first, epoch=2, val_loss=first["val_loss"] + 1.0)  # the epoch after which it stopped
    progress["history"] = [first, worse, dict(last, epoch=4)]
    progress["completed_epochs"] = 4
    progress["recipe"]["schedule"] = [asdict(p) for p in parse_schedule("32:3,224:1")]
    (run_dir / "progress.json").write_text(json.dumps(progress))
    (run_dir / "epoch-002.weights.h5").rename(run_dir / "epoch-004.weights.h5")
    resumed = tmp_path / "resumed.keras"
    train(KERMANY, resumed, parse_schedule("32:3,224:1"), batch_size=4, limit=4, run_dir=run_dir,
          resume=True, log=lambda m: None)
    saved = json.loads(metadata_path(resumed).read_text())["training"]
    assert saved["epochs_run"] == 3 and saved["checkpoint"].startswith("epoch 4,")


@pytest.mark.parametrize("losses, patience", [
    ([0.9, 0.8, 0.85, 0.86, 0.87, 0.7], 3),  # two plateau cuts, then the early stop
    ([0.9, 0.8, 0.8, 0.8, 0.8, 0.7], 3),  # an equal loss is no improvement
    # gains smaller than the plateau's min_delta (1e-4) count for the early stop, not for the plateau
    ([0.9, 0.8, 0.79995, 0.79988, 0.85, 0.86, 0.87], 3),
    # 0.1251 + 1e-4 < 0.1252 in float64 but not in float32, where Keras compares
    ([0.9, 0.1252, 0.1251, 0.12505, 0.2, 0.3, 0.4], 3),
    ([0.9, 0.8, 0.7, 0.75], 0),  # patience 0 stops at the first epoch without improvement
])
def test_a_resumed_phase_goes_on_as_if_never_interrupted(losses, patience, tmp_path):
    """Interrupted after any epoch, the replayed counters give the same learning-rate
    cuts and the same early stop as one uninterrupted phase."""
    import keras

    from pneumonia_batch.train import PhaseProgress, _callbacks, _RunFolder, phase_progress

    def run_phase(losses, so_far, learning_rate, first_epoch):
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
        early_stop, plateau = _callbacks(_RunFolder(tmp_path), {}, Phase(224, 9, 1e-3), 0, False,
                                         patience, so_far)[:2]
        rates = []
        for callback in (early_stop, plateau):
            callback.set_model(model)
            callback.on_train_begin()
        for epoch, loss in enumerate(losses, start=first_epoch):
            for callback in (early_stop, plateau):
                callback.on_epoch_end(epoch, {"val_loss": loss})
            rates.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
            if model.stop_training:
                break
        return rates, model.stop_training

    whole, stopped = run_phase(losses, PhaseProgress(), 1e-3, 0)
    assert len(set(whole)) > 1  # the cases exercise the plateau cut
    rows = [{"val_loss": loss, "learning_rate": rate} for loss, rate in zip(losses, whole)]
    for k in range(1, len(whole)):
        so_far = phase_progress(rows[:k], patience)
        assert not so_far.stopped_early and so_far.learning_rate == whole[k - 1]
        rates, resumed_stopped = run_phase(losses[k:], so_far, whole[k - 1], k)
        assert whole[:k] + rates == whole and resumed_stopped == stopped
    assert phase_progress(rows, patience).stopped_early == stopped


def test_best_epoch_is_the_lowest_224_px_validation_loss_of_any_phase():
    from pneumonia_batch.train import best_224_epoch

    history = [{"epoch": 1, "size": 96, "val_loss": 0.1}, {"epoch": 2, "size": 224, "val_loss": 0.3},
               {"epoch": 3, "size": 224, "val_loss": 0.2}, {"epoch": 4, "size": 128, "val_loss": 0.1},
               {"epoch": 5, "size": 224, "val_loss": 0.2}, {"epoch": 6, "size": 224, "val_loss": 0.4}]
    assert best_224_epoch(history) == 3  # an earlier 224 px phase; the first of a tie
    assert best_224_epoch(history[:1]) is None


def test_training_shuffle_follows_the_seed():
    """What the resume test relies on: one seed, one order; another seed, another order."""
    from pneumonia_batch.dataset import list_labelled
    from pneumonia_batch.train import image_dataset

    if not KERMANY.is_dir():
        pytest.skip("training data not available")
    items, _ = list_labelled(KERMANY / "train")
    items = [i for i in items if i.label == 0][:4] + [i for i in items if i.label == 1][:4]

    def label_order(seed):
        return [int(label) for _, labels in image_dataset(items, 32, 8, augment=True, seed=seed)
                for label in labels]

    assert label_order(1) == label_order(1)
    assert label_order(1) != label_order(2)


def test_each_epoch_draws_new_augmentations_and_a_seed_repeats_them(tmp_path):
    """Keras iterates the training dataset afresh each epoch, with the global seed set: random ops
    inside the pipeline would deal every epoch the same rotations, zooms and tones.  One image, so
    the shuffle cannot hide a repeat."""
    import keras
    from PIL import Image

    from pneumonia_batch.dataset import LabelledImage
    from pneumonia_batch.train import image_dataset

    path = tmp_path / "chest.png"
    Image.fromarray(np.tile(np.arange(224, dtype=np.uint8), (224, 1))).save(path)
    items = [LabelledImage(path, 1, "png")]

    def epochs(seed, n=3):
        keras.utils.set_random_seed(0)  # as training sets it
        dataset = image_dataset(items, 64, 1, augment=True, seed=seed)
        return [next(iter(dataset))[0].numpy() for _ in range(n)]

    first = epochs(seed=5)
    assert all(np.abs(a - b).mean() > 1 for a, b in [(first[0], first[1]), (first[1], first[2]), (first[0], first[2])])
    for again, image in zip(epochs(seed=5), first):
        np.testing.assert_array_equal(again, image)
    assert np.abs(epochs(seed=6, n=1)[0] - first[0]).mean() > 1


def test_sha256_mismatch_is_refused(tiny_training, tmp_path):
    out, _, _ = tiny_training
    copy = tmp_path / "tiny.keras"
    shutil.copy(out, copy)
    shutil.copy(metadata_path(out), metadata_path(copy))
    with open(copy, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ModelError, match="does not match its metadata"):
        read_model_info(copy)

    # Nor is it evaluated, calibrated or converted for the other model's metadata.
    metadata = metadata_path(copy).read_bytes()
    data = tmp_path / "data"
    for label in ("NORMAL", "PNEUMONIA"):
        shutil.copytree(ROOT / "examples" / "studies" / f"paediatric-{label.lower()}", data / label)
    for command in (["evaluate", data, "--out-dir", tmp_path / "ev"], ["calibrate", data, "--local"],
                    ["convert"]):
        result = subprocess.run([sys.executable, "-m", "pneumonia_batch", *map(str, command),
                                 "--model", str(copy)], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 1 and "does not match its metadata" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert metadata_path(copy).read_bytes() == metadata
    assert not (tmp_path / "ev").exists() and not copy.with_suffix(".tflite").exists()


def test_model_without_metadata_needs_scale_and_threshold(tiny_training, tmp_path):
    out, _, _ = tiny_training
    copy = tmp_path / "theirs.keras"
    shutil.copy(out, copy)
    with pytest.raises(ModelError, match="--input-scale"):
        read_model_info(copy)
    info = read_model_info(copy, input_scale="raw", threshold=0.3)
    assert (info.threshold, info.threshold_source) == (0.3, "command line")


def pneumonia_batch_command(*args):
    result = subprocess.run([sys.executable, "-m", "pneumonia_batch", *map(str, args)], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result


def test_evaluate_and_local_calibration_read_files_as_screening_does(tiny_training, tmp_path):
    """A labelled folder of JPEGs and a DICOM study: evaluate, calibrate --local, then screen with it."""
    from tests.dicom_factory import chest_pixels, make_dataset, save

    out, _, _ = tiny_training
    data = tmp_path / "data"
    for label in ("NORMAL", "PNEUMONIA"):
        (data / label).mkdir(parents=True)
        for source in sorted((ROOT / "examples" / "studies" / f"paediatric-{label.lower()}").iterdir()):
            shutil.copy(source, data / label)
    (data / "PNEUMONIA" / "study-7").mkdir()
    save(make_dataset(chest_pixels(), photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=4096),
         data / "PNEUMONIA" / "study-7" / "frontal.dcm")
    (data / "NORMAL" / "notes.txt").write_text("reviewed")
    trained_on = json.loads(metadata_path(out).read_text())["training"]["training_patients"]
    seen = next(p for p in sorted((KERMANY / "train" / "NORMAL").iterdir()) if patient_of(p) in trained_on)
    shutil.copy(seen, data / "NORMAL")  # an image the model was trained on

    result = pneumonia_batch_command("evaluate", data, "--model", out, "--out-dir", tmp_path / "ev")
    saved = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert saved["n_images"] == 6 and saved["n_pneumonia"] == 3
    assert saved["n_with_training_patient_token"] == 1
    assert ("warning: 1 of these images carry the patient token (from the file name) of images the model was "
            "trained on: if they are the same patients, these figures are optimistic") in result.stdout
    assert saved["not_used"] == [{"path": str(data / "NORMAL" / "notes.txt"), "reason": "not_an_image"}]
    assert sum(map(sum, saved["at_0.5"]["confusion_matrix"])) == 6
    assert "ROC-AUC" in result.stdout and "1 files not used: not_an_image (1)" in result.stdout
    for plot in ("roc.png", "confusion.png"):  # nothing drawn is cut at an edge (the axis labels once were)
        pixels = np.asarray(Image.open(tmp_path / "ev" / plot).convert("L"))
        assert all((edge == 255).all() for edge in (pixels[:, :2], pixels[:, -2:], pixels[:2], pixels[-2:])), plot
    evaluated = {Path(i["path"]).name: i["probability"] for i in saved["images"]}

    model = tmp_path / "ours" / "tiny.keras"  # local calibration rewrites the metadata: use a copy
    model.parent.mkdir()
    shutil.copy(out, model)
    shutil.copy(metadata_path(out), metadata_path(model))
    result = pneumonia_batch_command("calibrate", data, "--local", "--model", model)
    meta = json.loads(metadata_path(model).read_text())
    pneumonia = [i["probability"] for i in saved["images"] if i["label"] == "PNEUMONIA"]
    threshold = meta["threshold"]["value"]  # 0.97 of 3 needs all 3: just below the lowest of them
    assert min(pneumonia) - RUNTIME_MARGIN - 1e-12 <= threshold < min(pneumonia)
    assert not [p for p in evaluated.values() if threshold <= p < min(pneumonia)]  # no image moved across
    assert str(data) in meta["threshold"]["method"] and meta["validation"]["not_used"] == "not_an_image (1)"
    assert meta["validation"]["n_images"] == 6 and "95 % interval" in result.stderr
    assert meta["threshold"]["chosen_on_folder"] == str(data.resolve())
    # figures on the very images the threshold was just chosen on are flagged as optimistic
    result = pneumonia_batch_command("evaluate", data, "--model", model, "--out-dir", tmp_path / "ev2")
    assert json.loads((tmp_path / "ev2" / "evaluation.json").read_text())["n_in_threshold_folder"] == 6
    assert ("warning: 6 of these images are in the folder the model's threshold was chosen on (calibrate "
            "--local): the figures at that threshold are optimistic") in result.stdout
    assert saved["n_in_threshold_folder"] is None  # the shipped-style threshold names no folder

    report = tmp_path / "report.json"
    subprocess.run([sys.executable, str(ROOT / "screen.py"), str(data / "PNEUMONIA"), "--out", str(report),
                    "--model", str(model), "--runtime", "keras", "--no-progress"], check=True, cwd=ROOT)
    screened = json.loads(report.read_text())
    assert screened["run"]["threshold"] == meta["threshold"]["value"]
    images = {Path(i["file"]).name: i["probability"] for s in screened["studies"] for i in s["images"]}
    assert images.keys() == {"frontal.dcm", *(n for n in evaluated if n.startswith("person"))}
    for name, probability in images.items():
        assert probability == pytest.approx(evaluated[name], abs=1e-5)
    assert min(images.values()) >= meta["threshold"]["value"]  # all three flagged, rounding and all


def test_one_class_wrong_data_and_a_read_only_model_are_told_apart(tiny_training, tmp_path):
    """A pneumonia-only folder is evaluated (specificity undefined, not 0) but never calibrated on;
    calibrate without --local refuses to rebuild a split it cannot; a read-only metadata file is
    left as it is."""
    out, _, _ = tiny_training
    model = tmp_path / "ours" / "tiny.keras"
    model.parent.mkdir()
    shutil.copy(out, model)
    shutil.copy(metadata_path(out), metadata_path(model))
    metadata = metadata_path(model).read_bytes()
    data = tmp_path / "data"
    shutil.copytree(ROOT / "examples" / "studies" / "paediatric-pneumonia", data / "pneumonia")

    def command(*args):
        return subprocess.run([sys.executable, "-m", "pneumonia_batch", *map(str, args), "--model", str(model)],
                              capture_output=True, text=True, cwd=ROOT)

    result = command("evaluate", data, "--out-dir", tmp_path / "ev")
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "ev" / "evaluation.json").read_text())  # strict JSON: no NaN
    assert saved["n_images"] == saved["n_pneumonia"] == 2 and saved["roc_auc"] is None
    assert saved["at_0.5"]["specificity"] is None and saved["at_0.5"]["sensitivity"] is not None
    assert "ROC-AUC n/a (one class only)" in result.stdout and "specificity n/a" in result.stdout
    assert (tmp_path / "ev" / "confusion.png").is_file() and not (tmp_path / "ev" / "roc.png").exists()

    (tmp_path / "afile").write_text("x")
    result = command("evaluate", data, "--out-dir", tmp_path / "afile" / "ev")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    # outputs inside a class folder: their plots would be read as X-rays of that class next time
    for out_dir in (data / "pneumonia" / "ev", data / "Normal" / "ev"):  # a class folder it would make, too
        result = command("evaluate", data, "--out-dir", out_dir)
        assert result.returncode == 2 and f"--out-dir {out_dir} is inside the labelled folder" in result.stderr, \
            result.stderr
    assert not (data / "Normal").exists()
    shutil.copytree(ROOT / "examples" / "studies" / "paediatric-normal", data / "test" / "NORMAL")
    for out in (data / "pneumonia" / "m.keras", data / "test" / "NORMAL" / "m.keras"):  # another split's too
        result = subprocess.run([sys.executable, "-m", "pneumonia_batch", "train", str(data), "--out", str(out)],
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 2 and f"--out {out} is inside the labelled folder" in result.stderr, result.stderr
    shutil.rmtree(data / "test")
    assert sorted(p.name for p in (data / "pneumonia").iterdir()) == sorted(
        p.name for p in (ROOT / "examples" / "studies" / "paediatric-pneumonia").iterdir())

    result = command("calibrate", data, "--local")
    assert result.returncode == 1 and "no NORMAL images among the 2 usable ones" in result.stderr, result.stderr
    result = command("calibrate", data)  # a --limit run's split cannot be rebuilt, whatever the data
    assert result.returncode == 1 and "trained with --limit 4" in result.stderr, result.stderr
    shutil.copytree(ROOT / "examples" / "studies" / "paediatric-normal", data / "normal")
    metadata_path(model).chmod(0o444)
    result = command("calibrate", data, "--local")
    assert result.returncode == 1 and "is read-only" in result.stderr, result.stderr
    assert metadata_path(model).read_bytes() == metadata
    metadata_path(model).chmod(0o644)
    model.with_suffix(".tflite").write_bytes(b"a conversion kept on purpose")
    model.with_suffix(".tflite").chmod(0o444)
    result = command("convert")
    assert result.returncode == 1 and "tiny.tflite is read-only" in result.stderr, result.stderr
    assert model.with_suffix(".tflite").read_bytes() == b"a conversion kept on purpose"
    assert metadata_path(model).read_bytes() == metadata


def test_evaluate_with_nothing_decodable_is_a_clear_error(tiny_training, tmp_path):
    out, _, _ = tiny_training
    for label in ("NORMAL", "PNEUMONIA"):  # JPEG signatures, bodies cut off
        (tmp_path / label).mkdir()
        (tmp_path / label / "cut.jpeg").write_bytes((ROOT / "examples" / "studies" / "paediatric-normal" /
                                                     "NORMAL2-IM-1427-0001.jpeg").read_bytes()[:400])
    result = subprocess.run([sys.executable, "-m", "pneumonia_batch", "evaluate", str(tmp_path), "--model", str(out),
                             "--out-dir", str(tmp_path / "ev")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "none of the 2 images could be decoded" in result.stderr


def test_imagenet_init_loads_the_given_weight_file(tmp_path):
    """A weight file in the Keras notop HDF5 format is loaded into the backbone."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format

    reference = keras.applications.DenseNet121(include_top=False, weights=None, input_shape=(None, None, 3))
    path = tmp_path / "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"
    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, reference)
    model = build_model(None, init="imagenet", imagenet_weights=path, seed=123)
    backbone = model.get_layer("densenet121")
    for layer in ("conv1_conv", "conv5_block16_2_conv"):
        np.testing.assert_array_equal(backbone.get_layer(layer).get_weights()[0],
                                      reference.get_layer(layer).get_weights()[0])
    _set_trainable(model, Phase(96, 1, 1e-3, frozen_backbone=True), "imagenet")
    assert not backbone.trainable
    _set_trainable(model, Phase(224, 1, 1e-4), "imagenet")
    flags = [layer.trainable for layer in backbone.layers]
    assert not any(flags[:UNFREEZE_FROM_LAYER]) and all(flags[UNFREEZE_FROM_LAYER:])


def test_imagenet_init_without_weight_file_is_refused():
    with pytest.raises(ModelError, match="imagenet-weights"):
        build_model(None, init="imagenet", imagenet_weights=None)


@pytest.mark.parametrize("text", ["224", "224:0", "abc:1", "224:1:0"])
def test_bad_schedules_are_refused(text):
    with pytest.raises(ValueError):
        parse_schedule(text)


def test_a_schedule_that_does_not_end_at_the_screening_size_is_refused(tmp_path):
    options = dict(init="random", imagenet_weights=None, out=tmp_path / "m.keras", from_model=None,
                   average_last=0, run_dir=tmp_path / "run", resume=False)
    with pytest.raises(ValueError, match="must end at the screening resolution 224"):
        check_options(parse_schedule("96:2,128:1"), **options)
    check_options(parse_schedule("96:2,224:1"), **options)


@pytest.mark.parametrize("given", [dict(imagenet_weights=Path("densenet121_notop.h5")), dict(frozen_epochs=3),
                                   dict(frozen_epochs=0)])
def test_imagenet_options_without_imagenet_init_are_refused(given, tmp_path):
    """Not ignored: a user who forgot --init imagenet would otherwise train from scratch for hours."""
    options = dict(init="random", imagenet_weights=None, out=tmp_path / "m.keras", from_model=None,
                   average_last=0, run_dir=tmp_path / "run", resume=False)
    with pytest.raises(ValueError, match="go with --init imagenet; this run would start from random weights"):
        check_options(parse_schedule("96:2,224:1"), **{**options, **given})
    (tmp_path / "w.h5").write_bytes(b"weights")
    check_options(parse_schedule("96:2,224:1"), **{**options, **given, "init": "imagenet",
                                                    "imagenet_weights": tmp_path / "w.h5"})


def test_augmentation_never_flips_and_stays_in_range():
    import tensorflow as tf

    from pneumonia_batch.train import random_affine_and_tone

    image = np.full((224, 224, 3), 50.0, np.float32)
    image[:112, :112] = 200.0  # bright top-left quadrant
    outputs = np.stack([random_affine_and_tone(tf.constant(image), tf.constant([7, i])).numpy()
                        for i in range(30)])
    assert outputs.min() >= 0 and outputs.max() <= 255

    def quadrant(rows, cols):
        return outputs[:, rows, cols].mean(axis=(1, 2, 3))

    seeds = []  # each of the six draws has a seed of its own: one would move rotation, zoom and tone together
    uniform = tf.random.stateless_uniform

    def recording(shape, seed, *args):
        seeds.append(tuple(seed.numpy()))
        return uniform(shape, seed, *args)

    tf.random.stateless_uniform = recording
    try:
        random_affine_and_tone(tf.constant(image), tf.constant([7, 0]))
    finally:
        tf.random.stateless_uniform = uniform
    assert len(seeds) == len(set(seeds)) == 6

    top_left = quadrant(slice(30, 82), slice(30, 82))
    for other in (quadrant(slice(30, 82), slice(142, 194)), quadrant(slice(142, 194), slice(30, 82))):
        assert (top_left > other + 50).all()  # never mirrored left-right or top-bottom
    assert np.ptp(quadrant(slice(142, 194), slice(142, 194))) > 10  # the tone really varies


def test_fine_tuning_with_weight_averaging(tiny_training, tmp_path):
    """Starts from a saved model; the model saved is the mean of the last two of three epochs."""
    import keras

    from pneumonia_batch.train import train

    start, start_model, _ = tiny_training
    out, run_dir = tmp_path / "averaged.keras", tmp_path / "run"
    train(KERMANY, out, parse_schedule("224:3:1e-3"), batch_size=4, limit=4, run_dir=run_dir,
          from_model=start, average_last=2, log=lambda m: None)
    saved = json.loads(metadata_path(out).read_text())["training"]
    assert saved["started_from"]["sha256"] == read_model_info(start).sha256
    assert saved["started_from"]["training"]["schedule"][0]["size"] == 32  # the start's own record
    assert saved["checkpoint"].startswith("mean of the weights of epochs 2-3")

    reader = build_model(224)
    kernels, bn_means = [], []
    for epoch in (1, 2, 3):
        reader.load_weights(run_dir / f"epoch-{epoch:03d}.weights.h5")
        kernels.append(reader.get_layer("head_dense").get_weights()[0])
        bn_means.append(reader.get_layer("head_bn").moving_mean.numpy())
    # two Adam steps at 1e-3 move a weight by a few thousandths; a fresh initialisation is far off
    start_kernel = start_model.get_layer("head_dense").get_weights()[0]
    assert np.abs(kernels[0] - start_kernel).max() < 0.02
    assert not np.allclose(kernels[1], kernels[2])  # the averaged epochs really differ
    averaged = keras.models.load_model(out, safe_mode=True)
    np.testing.assert_allclose(averaged.get_layer("head_dense").get_weights()[0],
                               (kernels[1] + kernels[2]) / 2, atol=1e-6)
    # BatchNorm statistics are recomputed, not averaged: with momentum 0.99 a few steps barely move
    # the epochs' moving means, while one pass over the data sets them to the data's own mean
    epochs_mean = (bn_means[1] + bn_means[2]) / 2
    assert np.abs(averaged.get_layer("head_bn").moving_mean.numpy() - epochs_mean).max() > 0.1


def test_start_model_record_needs_matching_metadata(tiny_training, tmp_path):
    from pneumonia_batch.train import _started_from

    start, _, _ = tiny_training
    copy = tmp_path / "start.keras"
    shutil.copy(start, copy)
    shutil.copy(metadata_path(start), metadata_path(copy))
    assert _started_from(copy)["training"]["n_train"] == 8
    with open(copy, "ab") as handle:  # now the metadata describes another file
        handle.write(b"\0")
    record = _started_from(copy)
    assert record["sha256"] == sha256_of(copy)
    assert record["training"] is None and record["validation"] is None


def test_averaging_phase_has_no_early_stop_and_no_learning_rate_cut(tmp_path):
    from pneumonia_batch.train import _callbacks, _RunFolder

    run, phase = _RunFolder(tmp_path), Phase(224, 4, 1e-4)

    def kinds(averaging):
        return [type(c).__name__ for c in _callbacks(run, {}, phase, 0, averaging, patience=3)]

    assert kinds(True) == ["ProgressCallback"]
    # otherwise the plateau cut comes first, so the history records the rate after it
    assert kinds(False) == ["EarlyStopping", "ReduceLROnPlateau", "ProgressCallback"]


def test_batchnorm_statistics_become_means_over_the_data():
    import keras

    from pneumonia_batch.train import recompute_batchnorm_statistics

    inputs = keras.Input((3,))
    frozen = keras.layers.BatchNormalization(trainable=False, name="frozen")  # e.g. an ImageNet stem
    outputs = keras.layers.BatchNormalization(momentum=0.99)(keras.layers.Dense(2, use_bias=False)(frozen(inputs)))
    model = keras.Model(inputs, outputs)
    frozen.moving_mean.assign([1.0, 2.0, 3.0])
    rng = np.random.default_rng(0)
    # a short last batch, as when the images do not fill it: it weighs by its size
    batches = [rng.normal(loc=k, scale=1 + k, size=(n, 3)).astype(np.float32)
               for k, n in enumerate([8, 8, 8, 8, 3])]
    recompute_batchnorm_statistics(model, [(b, None) for b in batches])
    # the frozen layer ran in inference mode: x -> (x - mean) / sqrt(1 + eps), statistics kept
    np.testing.assert_array_equal(frozen.moving_mean.numpy(), [1.0, 2.0, 3.0])
    normalised = [(b - [1.0, 2.0, 3.0]) / np.sqrt(1 + frozen.epsilon) for b in batches]
    features = [x @ model.layers[2].get_weights()[0] for x in normalised]
    bn = model.layers[3]
    sizes = [len(f) for f in features]
    np.testing.assert_allclose(bn.moving_mean.numpy(), np.concatenate(features).mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(),
                               np.average([f.var(axis=0) for f in features], axis=0, weights=sizes), rtol=1e-4)
    assert bn.momentum == 0.99  # restored for any later training


@pytest.mark.parametrize("args, message", [
    (["--schedule", "96:2,128:1"], "must end at the screening resolution"),
    (["--schedule", "224:2", "--average-last", "3"], "exceeds the 2 epochs"),
    (["--init", "imagenet", "--from-model", "weights/densenet121_pneumonia.keras"], "leave --init at random"),
    (["--from-model", "weights/densenet121_pneumonia.keras", "--out", "weights/densenet121_pneumonia.keras"],
     "would overwrite the --from-model model"),
    (["--init", "imagenet"], "needs --imagenet-weights"),
    (["--init", "imagenet", "--imagenet-weights", "no-such-file.h5"], "needs --imagenet-weights naming"),
    (["--from-model", "weights/densenet121_pneumonia.keras", "--frozen-epochs", "1"],
     "go with --init imagenet; this run would start from --from-model"),
    (["--out", "pneumonia_v2"], "must end in .keras"),
    (["--out", "pneumonia_v2.KERAS"], "must end in .keras"),
    (["--schedule", "224:1:nan"], "out of range"),
    (["--schedule", "224:1.5"], "whole numbers"),
    (["--target-sensitivity", "1.5"], "--target-sensitivity"),
    (["--val-fraction", "0"], "--val-fraction"),
    (["--batch-size", "0"], "--batch-size"),
    (["--limit", "0"], "--limit"),
    # unwritable outputs are refused before training, not after it (/sys refuses even root)
    (["--out", "/sys/m.keras"], "--out /sys/m.keras: cannot write in /sys"),
    (["--out", "README.md/m.keras"], "README.md is not a folder"),
    (["--run-dir", "/sys/run"], "--run-dir /sys/run/progress.json: cannot write in /sys"),
])
def test_inconsistent_training_options_are_usage_errors(args, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "pneumonia_batch", "train", str(tmp_path),
                             "--out", str(tmp_path / "m.keras"), *args], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert sorted(tmp_path.iterdir()) == []  # nothing written, not even the run folder


def test_a_new_run_never_overwrites_an_earlier_runs_checkpoints(tmp_path):
    """Without --resume, a run folder holding epochs is refused; and --out is never optional, so
    the shipped model is only replaced on purpose."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "progress.json").write_text(json.dumps({"completed_epochs": 5, "history": []}))
    (run_dir / "epoch-005.weights.h5").write_bytes(b"five epochs of training")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    result = subprocess.run([sys.executable, "-m", "pneumonia_batch", "train", str(tmp_path), "--out",
                             str(tmp_path / "m.keras"), "--run-dir", str(run_dir)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "holds an earlier run: --resume continues it" in result.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    result = subprocess.run([sys.executable, "-m", "pneumonia_batch", "train", str(tmp_path)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "Missing option '--out'" in result.stderr


@pytest.mark.parametrize("stop, code, word", [(signal.SIGINT, 130, "interrupted"),  # Ctrl-C
                                              (signal.SIGTERM, 143, "terminated")])  # kill, systemd
@pytest.mark.parametrize("done, kept", [
    (0, "no epoch had finished, so there is nothing to resume"),
    (3, "runs/m keeps the run up to epoch 3; the same command with --resume continues from there"),
])
def test_a_stopped_training_run_says_what_it_keeps(stop, code, word, done, kept, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pneumonia_batch import cli, train

    def stopped_mid_epoch(*args, **kwargs):
        if done:  # as a run writes it once an epoch's checkpoint is on disk
            (tmp_path / "runs" / "m").mkdir(parents=True)
            (tmp_path / "runs" / "m" / "progress.json").write_text(json.dumps({"completed_epochs": done}))
        if stop == signal.SIGINT:  # as Python delivers a Ctrl-C, also when this test runs in the background
            raise KeyboardInterrupt
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, "a stop would end the run silently"
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler acts here

    monkeypatch.setattr(train, "train", stopped_mid_epoch)
    monkeypatch.chdir(tmp_path)
    before = signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(cli.train, [str(tmp_path), "--out", str(tmp_path / "m.keras")])
    assert result.exit_code == code
    assert result.output == f"{word}: {kept}\n"
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is the command's only


def test_a_run_refused_over_its_data_leaves_no_folders(tmp_path):
    """Neither the model's folder nor the default run folder (runs/<name> under the working
    folder) appears when the data cannot train."""
    data, workdir = tmp_path / "not-kermany", tmp_path / "cwd"
    data.mkdir()
    workdir.mkdir()
    result = subprocess.run([sys.executable, "-m", "pneumonia_batch", "train", str(data), "--out",
                             str(tmp_path / "new" / "m.keras")], capture_output=True, text=True, cwd=workdir)
    assert result.returncode == 1 and "holds neither a train split" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "not-kermany"]
    assert list(workdir.iterdir()) == []


@pytest.mark.parametrize("normal_patients, val_fraction, message", [
    (1, "0.1", "--val-fraction 0.1 holds out all 1 NORMAL patient(s) for validation and leaves none to train on"),
    (3, "0.9", "--val-fraction 0.9 holds out all 3 NORMAL patient(s) for validation and leaves none to train on"),
])
def test_a_split_that_leaves_a_class_nothing_to_train_on_is_a_usage_error(normal_patients, val_fraction, message,
                                                                        tmp_path):
    data, workdir = tmp_path / "data", tmp_path / "cwd"
    workdir.mkdir()
    jpeg = ROOT / "examples" / "studies" / "paediatric-normal" / "NORMAL2-IM-1427-0001.jpeg"
    for label, names in (("NORMAL", [f"IM-{n:04d}-0001.jpeg" for n in range(normal_patients)]),
                         ("PNEUMONIA", [f"person{n}_virus_{n}.jpeg" for n in range(3)])):
        (data / label).mkdir(parents=True)
        for name in names:
            shutil.copy(jpeg, data / label / name)
    result = subprocess.run([sys.executable, "-m", "pneumonia_batch", "train", str(data), "--out",
                             str(tmp_path / "new" / "m.keras"), "--val-fraction", val_fraction],
                            capture_output=True, text=True, cwd=workdir)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "data"] and list(workdir.iterdir()) == []


def test_a_model_save_that_fails_midway_leaves_the_previous_model(tmp_path):
    """Keras writes straight into the file it is given: the model is saved under a temporary name
    with its suffix (Keras picks the format from it), then renamed over the previous one."""
    import keras

    from pneumonia_batch.atomic import save_atomic

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    for name in ("m.keras", "m.h5"):
        out = tmp_path / name
        out.write_bytes(b"the previous model")

        def killed_midway(path):
            model.save(path)
            with open(path, "r+b") as handle:
                handle.truncate(100)
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            save_atomic(out, killed_midway, suffix=out.suffix)
        assert out.read_bytes() == b"the previous model"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in tmp_path.glob("m.*"))
        save_atomic(out, model.save, suffix=out.suffix)
        np.testing.assert_array_equal(keras.models.load_model(out).get_layer(index=0).get_weights()[0],
                                      model.get_layer(index=0).get_weights()[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.h5", "m.keras"]


def test_history_files_are_replaced_whole(tmp_path):
    """A history CSV and curves PNG being rewritten are replaced by a rename: a hard link to the
    previous files (as a backup or a sync tool holds) still shows them whole."""
    from pneumonia_batch.train import _write_history

    def row(epoch):
        return {"epoch": epoch, "size": 224, "loss": 0.5 / epoch, "val_loss": 0.6 / epoch, "accuracy": 0.8,
                "val_accuracy": 0.7, "auc": 0.9, "val_auc": 0.85, "learning_rate": 1e-4}

    out = tmp_path / "m.keras"
    written = _write_history(out, [row(1)])
    before = {path: path.read_bytes() for path in written}
    for path in written:
        os.link(path, tmp_path / f"{path.name}.backup")
    assert _write_history(out, [row(1), row(2)]) == written
    assert len(written[0].read_text().splitlines()) == 3
    for path, content in before.items():
        assert (tmp_path / f"{path.name}.backup").read_bytes() == content != path.read_bytes()


@pytest.mark.parametrize("damaged", ["epoch-002.weights.h5", "epoch-002.optimizer.npz"])
def test_a_damaged_checkpoint_is_named_on_resume(damaged, tiny_training, tmp_path):
    out, _, _ = tiny_training
    run_dir = tmp_path / "run"
    shutil.copytree(out.parent / "run", run_dir)
    with open(run_dir / damaged, "r+b") as handle:  # cut off, as by a full disk
        handle.truncate(os.path.getsize(run_dir / damaged) // 2)
    result = subprocess.run([sys.executable, "-m", "pneumonia_batch", "train", str(KERMANY), "--out",
                             str(tmp_path / "m.keras"), "--run-dir", str(run_dir), "--resume", "--limit", "4",
                             "--batch-size", "4", "--schedule", "32:1,224:2"], capture_output=True, text=True,
                            cwd=ROOT)
    assert result.returncode == 1, result.stderr
    assert f"cannot resume: {run_dir / damaged} is damaged (" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "m.keras").exists()


def test_optimiser_state_for_other_variables_is_told_from_none_saved(tmp_path):
    import keras

    from pneumonia_batch.train import _restore_optimizer, _save_optimizer

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    model.optimizer.build(model.trainable_variables)
    _save_optimizer(model.optimizer, tmp_path / "ours.npz")
    np.savez(tmp_path / "other.npz", np.zeros(()), np.zeros(()), np.zeros((5, 5)))
    assert _restore_optimizer(model, tmp_path / "ours.npz", 3) == "restored the optimiser state of epoch 3"
    assert _restore_optimizer(model, tmp_path / "other.npz", 3) == (
        "the optimiser state saved after epoch 3 (other.npz) belongs to other trainable variables: Adam restarts")
    assert _restore_optimizer(model, tmp_path / "none.npz", 3) == "no optimiser state saved after epoch 3: Adam restarts"


def test_a_resume_with_another_split_is_refused(tmp_path):
    """The run folder pins the validation split: a resume with another --seed or --val-fraction
    would choose its checkpoint on images earlier epochs were trained on."""
    if not KERMANY.is_dir():
        pytest.skip("training data not available")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    split = {"data": str((KERMANY / "train").resolve()), "seed": 0, "val_fraction": 0.1, "limit": None}
    (run_dir / "progress.json").write_text(json.dumps({"completed_epochs": 1, "history": [], "split": split}))
    (run_dir / "epoch-001.weights.h5").write_bytes(b"one epoch of training")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    result = subprocess.run([sys.executable, "-m", "pneumonia_batch", "train", str(KERMANY), "--out",
                             str(tmp_path / "m.keras"), "--run-dir", str(run_dir), "--resume", "--seed", "1",
                             "--val-fraction", "0.2"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert (f"cannot resume: {run_dir / 'progress.json'} records a run with --seed 0 (this run: 1); "
            "--val-fraction 0.1 (this run: 0.2). A resume must keep") in result.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_resume_keeps_its_weight_averaging_and_start_model(tmp_path):
    """Forgetting --average-last would save one epoch instead of the mean the run was making; another
    --from-model would be recorded as the start of weights that never came from it.  Both are refused
    before the data are read; leaving --from-model out is not."""
    data = small_labelled_folder(tmp_path / "data", 4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    started_from = {"model": "start.keras", "sha256": "ab" * 32}
    (run_dir / "progress.json").write_text(json.dumps({"completed_epochs": 1, "history": [], "average_last": 1,
                                                       "started_from": started_from}))
    (run_dir / "epoch-001.weights.h5").write_bytes(b"one epoch of training")
    (tmp_path / "other.keras").write_bytes(b"another model")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}

    def resume(*options):
        return subprocess.run([sys.executable, "-m", "pneumonia_batch", "train", str(data), "--out",
                               str(tmp_path / "m.keras"), "--run-dir", str(run_dir), "--resume", "--val-fraction",
                               "0.5", *map(str, options)], capture_output=True, text=True, cwd=ROOT)

    result = resume("--from-model", tmp_path / "other.keras")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert (f"cannot resume: {run_dir / 'progress.json'} records a run with --average-last 1 (this run: 0); "
            "--from-model start.keras (this run: other.keras). A resume continues that run") in result.stderr
    assert "training on" not in result.stderr  # refused before the data were read
    result = resume("--average-last", 1)  # the start model left out: the checkpoint is what is loaded
    assert result.returncode == 1 and f"cannot resume: {run_dir / 'epoch-001.weights.h5'} is damaged" \
        in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "other.keras", "run"]


def test_a_resume_keeps_its_recipe_and_a_resume_needs_a_run(tmp_path):
    """A resume with another --init, --batch-size or schedule would train the rest of the run
    otherwise than its metadata says (phases skipped, a frozen backbone unfrozen); only a longer
    schedule is taken.  A --resume that finds no run (run from another folder, the default run
    folder is relative) is refused rather than starting afresh and replacing --out hours later."""
    data = small_labelled_folder(tmp_path / "data", 4)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    schedule = [{"size": 96, "epochs": 1, "learning_rate": 0.001, "frozen_backbone": True},
                {"size": 96, "epochs": 2, "learning_rate": 0.001, "frozen_backbone": False},
                {"size": 224, "epochs": 1, "learning_rate": 0.0001, "frozen_backbone": False}]
    recipe = {"init": "imagenet", "batch_size": 16, "schedule": schedule}
    (run_dir / "progress.json").write_text(json.dumps({"completed_epochs": 1, "history": [], "recipe": recipe}))
    (run_dir / "epoch-001.weights.h5").write_bytes(b"one epoch of training")
    (tmp_path / "imagenet.h5").write_bytes(b"imagenet weights")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}

    def resume(*options, run=run_dir):
        return subprocess.run([sys.executable, "-m", "pneumonia_batch", "train", str(data), "--out",
                               str(tmp_path / "m.keras"), "--run-dir", str(run), "--resume", "--val-fraction",
                               "0.5", *map(str, options)], capture_output=True, text=True, cwd=ROOT)

    imagenet = ("--init", "imagenet", "--imagenet-weights", tmp_path / "imagenet.h5", "--frozen-epochs", 1)
    result = resume("--schedule", "96:2:1e-3,224:1:1e-4")  # the frozen ImageNet epoch forgotten
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert (f"cannot resume: {run_dir / 'progress.json'} records a run with --init imagenet (this run: random); "
            "--schedule 96:1:0.001 (frozen),96:2:0.001,224:1:0.0001 (this run: 96:2:0.001,224:1:0.0001)") \
        in result.stderr
    result = resume("--schedule", "96:2:1e-3,224:1:1e-4", "--batch-size", 8, *imagenet)
    assert result.returncode == 2 and "records a run with --batch-size 16 (this run: 8). A resume" in result.stderr
    result = resume("--schedule", "128:2:1e-3,224:1:1e-4", *imagenet)
    assert result.returncode == 2 and "--schedule 96:1:0.001 (frozen),96:2:0.001,224:1:0.0001 (this run: " \
        "128:1:0.001 (frozen),128:2:0.001,224:1:0.0001)" in result.stderr
    assert "training on" not in result.stderr  # refused before the data were read
    for weights in (imagenet, imagenet[:2] + imagenet[4:]):  # the ImageNet file is not needed to resume
        result = resume("--schedule", "96:2:1e-3,224:3:1e-4,224:2:1e-5", *weights)  # longer, and a phase more
        assert result.returncode == 1 and f"cannot resume: {run_dir / 'epoch-001.weights.h5'} is damaged" \
            in result.stderr, result.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before

    result = resume("--schedule", "96:2:1e-3,224:1:1e-4", run=tmp_path / "elsewhere")
    assert result.returncode == 2 and f"--resume: {tmp_path / 'elsewhere' / 'progress.json'} does not exist" \
        in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "imagenet.h5", "run"]


def test_a_schedule_extends_another_only_by_lengthening_its_end():
    from pneumonia_batch.train import _extends

    def phases(*spec):
        return [asdict(Phase(*p)) for p in spec]

    recorded = phases((96, 2, 1e-3), (224, 2, 1e-4))
    assert _extends(recorded, recorded) and _extends(phases((96, 2, 1e-3), (224, 4, 1e-4)), recorded)
    assert _extends(phases((96, 2, 1e-3), (224, 2, 1e-4), (224, 1, 1e-5)), recorded)
    assert not _extends(phases((96, 2, 1e-3), (224, 1, 1e-4)), recorded)  # shorter
    assert not _extends(phases((96, 3, 1e-3), (224, 2, 1e-4)), recorded)  # an earlier phase longer
    assert not _extends(phases((96, 2, 1e-3), (224, 2, 1e-5)), recorded)  # another learning rate
    assert not _extends(phases((96, 2, 1e-3)), recorded)


def small_labelled_folder(folder: Path, patients: int) -> Path:
    jpeg = ROOT / "examples" / "studies" / "paediatric-normal" / "NORMAL2-IM-1427-0001.jpeg"
    for n in range(patients):
        for label, name in (("NORMAL", f"IM-{n:04d}-0001.jpeg"), ("PNEUMONIA", f"person{n}_virus_{n}.jpeg")):
            (folder / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(jpeg, folder / label / name)
    return folder


def test_a_resume_follows_its_validation_images_not_their_folder(tmp_path):
    """Data moved to another disk resumes; data whose validation images changed does not."""
    from pneumonia_batch.dataset import list_training, split_by_patient
    from pneumonia_batch.train import OptionError, _check_resume_split, _names_digest

    def split_of(folder):
        _, val = split_by_patient(list_training(folder)[0], 0.5, 0)
        return val, {"data": str(folder), "seed": 0, "val_fraction": 0.5, "limit": None,
                     "validation_sha256": _names_digest(val, folder)}

    first = small_labelled_folder(tmp_path / "disk1" / "train", 6)
    _, recorded = split_of(first)
    moved = tmp_path / "disk2" / "train"
    shutil.copytree(first, moved)
    shutil.rmtree(first)
    _check_resume_split(recorded, split_of(moved)[1], tmp_path / "progress.json")
    validation, _ = split_of(moved)
    validation[0].path.unlink()
    with pytest.raises(OptionError, match="the validation images differ from those .*progress.json records: "
                                          "images were added, removed or renamed under .*disk2/train"):
        _check_resume_split(recorded, split_of(moved)[1], tmp_path / "progress.json")


def test_fine_tuning_never_validates_on_the_start_models_training_images(tmp_path):
    """With another --seed, the shipped model's own training data would give a validation split
    made mostly of images it was trained on: refused, from any working folder.  On other data,
    or on its own split, fine."""
    from pneumonia_batch.dataset import list_training, patient_of, split_by_patient
    from pneumonia_batch.train import OptionError, _check_start_split

    if not KERMANY.is_dir():
        pytest.skip("training data not available")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    result = subprocess.run([sys.executable, "-m", "pneumonia_batch", "train", str(KERMANY.resolve()), "--out",
                             str(tmp_path / "m.keras"), "--run-dir", str(tmp_path / "run"), "--from-model",
                             str(ROOT / "weights" / "densenet121_pneumonia.keras"), "--seed", "1"],
                            capture_output=True, text=True, cwd=workdir)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert re.search(r"--from-model densenet121_pneumonia.keras was trained on the patients of \d{3} of this "
                     r"run's \d{3} validation images \(it was trained with --seed 0 --val-fraction 0.1\)",
                     result.stderr), result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"] and list(workdir.iterdir()) == []

    items = list_training(small_labelled_folder(tmp_path / "data", 10))[0]
    own_train, own_val = split_by_patient(items, 0.2, 0)
    record = {"seed": 0, "validation_fraction": 0.2, "limit_per_class": None,
              "n_train": len(own_train), "n_validation": len(own_val)}
    listed = {"model": "start.keras", "training": {**record, "training_patients": sorted(
        {patient_of(i.path) for i in own_train})}}
    unlisted = {"model": "start.keras", "training": record}  # a model from before the list
    grown = items + list_training(small_labelled_folder(tmp_path / "more", 12))[0][-4:]  # 2 new patients
    other = list_training(tmp_path / "more")[0][:16]
    warnings = []
    for start in (listed, unlisted):
        _check_start_split(start, items, own_val)
        _check_start_split(start, items, own_val[:2])  # a --limit takes part of the same split
        with pytest.raises(OptionError, match=r"trained on the patients of \d of this run's 4 validation images"):
            _check_start_split(start, items, split_by_patient(items, 0.2, 1)[1])
    # its data with patients added: the list still finds the overlap; a rebuild from the record cannot
    leaky = [i for i in split_by_patient(grown, 0.2, 1)[1] if i in own_train]
    assert leaky
    with pytest.raises(OptionError):
        _check_start_split(listed, grown, split_by_patient(grown, 0.2, 1)[1])
    _check_start_split(unlisted, grown, split_by_patient(grown, 0.2, 1)[1], log=warnings.append)
    assert warnings and warnings[0].startswith("cannot tell whether --from-model start.keras was trained on")
    _check_start_split(listed, other, [i for i in other if patient_of(i.path) not in listed["training"]
                                       ["training_patients"]])  # other data, other patients: fine
    # a start model fine-tuned on other data from one trained here: its ancestor's patients count too
    tuned_elsewhere = {"model": "tuned.keras", "training": {"training_patients": ["person900"],
                                                           "started_from": listed}}
    with pytest.raises(OptionError, match=r"trained on the patients of \d of this run's 4 validation images"):
        _check_start_split(tuned_elsewhere, items, split_by_patient(items, 0.2, 1)[1])


def test_resume_without_the_recorded_weights_is_a_clear_error(tmp_path):
    if not KERMANY.is_dir():
        pytest.skip("training data not available")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "progress.json").write_text(json.dumps({"completed_epochs": 3, "history": []}))
    result = subprocess.run([sys.executable, "-m", "pneumonia_batch", "train", str(KERMANY), "--out",
                             str(tmp_path / "m.keras"), "--run-dir", str(run_dir), "--resume"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1, result.stderr
    assert "cannot resume" in result.stderr and "epoch-003.weights.h5" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "m.keras").exists()


def test_the_shipped_models_training_records_name_their_own_histories():
    """The shipped model and each model it was fine-tuned from name a history with their epochs."""
    weights = ROOT / "weights"
    record = json.loads((weights / "densenet121_pneumonia.json").read_text())["training"]
    named = []
    while record:
        with open(weights / record["history_csv"], newline="") as handle:
            history = list(csv.DictReader(handle))
        assert [int(row["epoch"]) for row in history] == list(range(1, record["epochs_run"] + 1))
        assert (weights / record["curves_png"]).is_file()
        named.append(record["history_csv"])
        record = (record.get("started_from") or {}).get("training")
    assert named == ["densenet121_pneumonia.history.csv", "densenet121_pneumonia.swa1.history.csv",
                     "densenet121_pneumonia.base.history.csv"]


def test_the_shipped_models_recorded_validation_figures_come_out_again(tmp_path):
    """The model card's validation figures hold for the shipped file with today's preprocessing."""
    if not KERMANY.is_dir():
        pytest.skip("training data not available")
    shipped = ROOT / "weights" / "densenet121_pneumonia.keras"
    copy = tmp_path / shipped.name
    shutil.copy(shipped, copy)
    shutil.copy(metadata_path(shipped), metadata_path(copy))
    result = subprocess.run([sys.executable, "-m", "pneumonia_batch", "calibrate", str(KERMANY),
                             "--model", str(copy)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    recorded = json.loads(metadata_path(shipped).read_text())
    again = json.loads(metadata_path(copy).read_text())
    assert again["validation"]["n_images"] == recorded["validation"]["n_images"] == 525
    for at in ("at_threshold", "at_0.5"):
        assert again["validation"][at]["confusion_matrix"] == recorded["validation"][at]["confusion_matrix"]
    assert again["validation"]["roc_auc"] == pytest.approx(recorded["validation"]["roc_auc"], abs=1e-4)
    assert again["threshold"]["value"] == pytest.approx(recorded["threshold"]["value"], abs=1e-4)


@pytest.mark.parametrize("name", ["IM-0001-0001.jpeg", os.fsdecode(b"IM-0001-\xff.jpeg")])
def test_a_training_file_gone_since_it_was_listed_is_named(name, tmp_path):
    """The run's message names the file (escaped where it is not UTF-8), not TensorFlow's graph node."""
    import tensorflow as tf

    from pneumonia_batch.dataset import LabelledImage
    from pneumonia_batch.train import _cause, image_dataset

    path = tmp_path / name
    shutil.copy(ROOT / "examples" / "studies" / "paediatric-normal" / "NORMAL2-IM-1427-0001.jpeg", path)
    dataset = image_dataset([LabelledImage(path, 0, "jpeg")], 224, 1, augment=False, seed=0)
    path.unlink()
    with pytest.raises(tf.errors.OpError) as caught:
        list(dataset)
    shown = str(path).encode("utf-8", "backslashreplace").decode()
    assert _cause(caught.value) == (f"OSError: {shown}: FileNotFoundError: [Errno 2] No such file or "
                                    f"directory: '{shown}'")


def test_a_training_file_gone_after_an_early_stop_names_the_epoch_it_stopped_in(tmp_path):
    """A run whose 3-epoch phase stopped early after epoch 2 goes on with epoch 4; images removed
    just as that epoch starts stop it there, and the message names epoch 4, not 3."""
    from pneumonia_batch.train import train

    data = small_labelled_folder(tmp_path / "data", 4)
    run_dir = tmp_path / "run"
    with untraced_steps():
        train(data, tmp_path / "first.keras", parse_schedule("32:1,224:1"), batch_size=2, val_fraction=0.5,
              run_dir=run_dir, log=lambda m: None)
    progress = json.loads((run_dir / "progress.json").read_text())
    first = progress["history"][0]
    progress["history"] = [first, dict(first, epoch=2, val_loss=first["val_loss"] + 1.0)]  # no better: stop
    progress["recipe"]["schedule"] = [asdict(p) for p in parse_schedule("32:3,224:1")]
    (run_dir / "progress.json").write_text(json.dumps(progress))

    def removing_the_images_as_epoch_4_starts(line):
        if line.startswith("phase 2/2"):  # logged once the phase's data are listed, just before it trains
            for image in data.glob("*/*.jpeg"):
                image.unlink()

    with untraced_steps(), pytest.raises(ValueError, match=r"^training stopped in epoch 4: OSError: .*\.jpeg: "
                                                           r"FileNotFoundError.*the epochs before it are kept"):
        train(data, tmp_path / "m.keras", parse_schedule("32:3,224:1"), batch_size=2, val_fraction=0.5,
              run_dir=run_dir, resume=True, patience=1, log=removing_the_images_as_epoch_4_starts)
    assert json.loads((run_dir / "progress.json").read_text()) == progress
    assert not (tmp_path / "m.keras").exists()


def test_a_training_file_gone_in_the_first_epoch_says_to_start_again_not_to_resume(tmp_path):
    """No epoch finished, so there is no run to resume: the message says to run the command again."""
    from pneumonia_batch.train import train

    data = small_labelled_folder(tmp_path / "data", 4)

    def removing_the_images_as_epoch_1_starts(line):
        if line.startswith("phase 1/1"):
            for image in data.glob("*/*.jpeg"):
                image.unlink()

    with untraced_steps(), pytest.raises(ValueError, match=r"^training stopped in epoch 1: .*\(no epoch had "
                                                           r"finished: restore the file, then run the same "
                                                           r"command without --resume\)$"):
        train(data, tmp_path / "m.keras", parse_schedule("224:1"), batch_size=2, val_fraction=0.5,
              run_dir=tmp_path / "run", log=removing_the_images_as_epoch_1_starts)
    assert not (tmp_path / "run" / "progress.json").exists()


def test_native_lines_held_back_reach_stderr_all_but_the_notices_even_on_an_abort():
    """TensorFlow's CPU check prints its reason, then aborts, inside the import that holds back its notices."""
    probe = ("import os; from pneumonia_batch.model import stderr_without\n"
             "with stderr_without('oneDNN custom operations are on.'):\n"
             "    os.write(2, b'I0000 port.cc:153] oneDNN custom operations are on. You may see...\\n')\n"
             "    os.write(2, b'This TensorFlow binary was compiled to use AVX instructions\\n')\n"
             "    os.abort()\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == -6 and result.stderr == "This TensorFlow binary was compiled to use AVX instructions\n"
