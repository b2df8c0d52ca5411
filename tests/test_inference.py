"""Runtimes and fast decoding agree with the reference path on real images."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless

from pneumonia_batch.dicom import CR_IMAGE
from pneumonia_batch import inference
from pneumonia_batch.inference import KerasRunner, TFLiteRunner, converted_model, make_runner, tflite_path
from pneumonia_batch.model import DEFAULT_MODEL, ModelError, load_keras_model, metadata_path, read_model_info
from pneumonia_batch.preprocess import DECODE_MIN_SIDE, model_input_from_file
from tests.dicom_factory import EXAMPLES, make_dataset, save

FULLRES = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "kermany-fullres"


def jpeg2000_twins(jpegs: list[Path], folder: Path) -> list[Path]:
    """12-bit JPEG 2000 lossless CR files holding the pixels of real radiographs."""
    twins = []
    for jpeg in jpegs:
        grey = np.asarray(Image.open(jpeg).convert("L"), np.uint16) * 16
        ds = make_dataset(grey, modality="CR", sop_class=CR_IMAGE, bits_stored=12,
                          WindowCenter=2048, WindowWidth=4096)
        twins.append(save(ds, folder / f"{jpeg.stem}.dcm", JPEG2000Lossless))
    return twins


@pytest.fixture(scope="module")
def real_images(tmp_path_factory):
    files = [(p, "dicom") for p in sorted((EXAMPLES / "dicom").glob("*.dcm")) if "abdomen" not in p.name]
    files += [(p, "jpeg") for p in sorted(EXAMPLES.glob("paediatric-*/*.jpeg"))]
    if FULLRES.is_dir():  # the larger shared sample, when it is there
        jpegs = sorted(FULLRES.rglob("*.jpeg"))
        files += [(p, "jpeg") for p in jpegs[::6]]
        # Large enough for the half-resolution JPEG 2000 decode (both sides >= 2 x 672).
        large = [p for p in jpegs if min(Image.open(p).size) >= 2 * DECODE_MIN_SIDE][::4]
        files += [(p, "dicom") for p in jpeg2000_twins(large, tmp_path_factory.mktemp("j2k"))]
    return files


@pytest.fixture(scope="module")
def info():
    return read_model_info(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def keras_runner(info):
    return KerasRunner(info.path, info.input_scale, batch_size=8)


@pytest.fixture(scope="module")
def full_inputs(real_images):
    return np.stack([model_input_from_file(str(p), kind, reduced=False)[0] for p, kind in real_images])


def test_tflite_agrees_with_keras(info, keras_runner, full_inputs):
    content = converted_model(info)
    assert content is not None, "the shipped model has no pinned TFLite conversion"
    tflite = TFLiteRunner(content, info.input_scale).predict(full_inputs)
    keras = np.concatenate([keras_runner.predict(full_inputs[i:i + 8]) for i in range(0, len(full_inputs), 8)])
    np.testing.assert_allclose(tflite, keras, atol=1e-4)
    assert keras.std() > 0.05  # real, varied probabilities, not a constant


def test_reduced_resolution_decoding_moves_probabilities_by_less_than_001(keras_runner, full_inputs,
                                                                         real_images):
    reduced = np.stack([model_input_from_file(str(p), kind, reduced=True)[0] for p, kind in real_images])
    changed = (reduced != full_inputs).reshape(len(reduced), -1).any(axis=1)
    kinds = np.array([kind for _, kind in real_images])
    assert changed[kinds == "jpeg"].any()  # JPEG draft decoding was taken
    assert changed[kinds == "dicom"].any()  # JPEG 2000 half resolution was taken

    def predict(x):
        return np.concatenate([keras_runner.predict(x[i:i + 8]) for i in range(0, len(x), 8)])

    assert np.abs(predict(reduced) - predict(full_inputs)).max() < 0.01


def test_short_batches_are_padded_to_the_compiled_shape(keras_runner, full_inputs):
    assert keras_runner._prepare(full_inputs[:3]).shape[0] == 8  # the one compiled batch size
    whole = keras_runner.predict(full_inputs[:8])
    np.testing.assert_allclose(keras_runner.predict(full_inputs[:3]), whole[:3], atol=1e-5)


def test_tflite_for_a_model_without_metadata_says_what_works_instead(tmp_path):
    """convert needs the metadata it pins the conversion in: suggesting it would fail too."""
    model = tmp_path / "theirs.keras"
    model.symlink_to(DEFAULT_MODEL.resolve())
    tflite_path(model).symlink_to(tflite_path(DEFAULT_MODEL).resolve())  # the conversion alone proves nothing
    info = read_model_info(model, input_scale="raw", threshold=0.3)
    with pytest.raises(ModelError) as refusal:
        make_runner(info, "tflite", 4)
    assert str(refusal.value) == ("--runtime tflite needs the model's metadata, which theirs.keras has not; "
                                  "use --runtime keras")
    assert make_runner(info, "auto", 4).name == "keras"


def test_a_conversion_of_an_earlier_model_is_never_run(tmp_path):
    """A model retrained in place beside its old .tflite: the conversion is intact (its own sha256
    matches) but was made from another model, so the new model runs on Keras, never the old one."""
    import hashlib
    import json

    model = tmp_path / "m.keras"
    model.write_bytes(DEFAULT_MODEL.read_bytes() + b"\0")  # another sha256, the same network
    tflite_path(model).write_bytes(tflite_path(DEFAULT_MODEL).read_bytes())
    meta = json.loads(metadata_path(DEFAULT_MODEL).read_text())
    meta["sha256"] = hashlib.sha256(model.read_bytes()).hexdigest()  # the tflite entry is the old model's
    metadata_path(model).write_text(json.dumps(meta))
    info = read_model_info(model)
    assert converted_model(info) is None
    assert make_runner(info, "auto", 4).name == "keras"


def test_auto_runtime_on_cpu_is_tflite(info):
    assert make_runner(info, "auto", 16).name == "tflite"


def test_auto_runtime_on_a_gpu_is_keras_and_never_reads_the_tflite_file(info, monkeypatch):
    def no_hashing(_):
        raise AssertionError("the TFLite file was hashed for a run that uses Keras")

    monkeypatch.setattr(inference, "gpu_present", lambda: True)
    monkeypatch.setattr(inference, "converted_model", no_hashing)
    monkeypatch.setattr(inference, "KerasRunner", lambda *args, **kwargs: ("keras", kwargs))
    assert make_runner(info, "auto", 16) == ("keras", {"jit": True, "sha256": info.sha256})


def test_the_tflite_runtime_never_asks_tensorflow_for_a_gpu(info, monkeypatch):
    def no_gpu_check():
        raise AssertionError("gpu_present imports TensorFlow on a machine with a GPU device node")

    monkeypatch.setattr(inference, "gpu_present", no_gpu_check)
    assert make_runner(info, "tflite", 16).name == "tflite"


def test_a_gpu_device_node_tensorflow_cannot_use_is_no_gpu(monkeypatch):
    """WSL2 always has /dev/dxg; compiled Keras on a CPU would be five times slower than TFLite."""
    import tensorflow as tf

    monkeypatch.setattr(inference.os.path, "exists", lambda path: path in ("/dev/nvidiactl", "/dev/dxg"))
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind: [])  # as on WSL2 without CUDA
    assert inference.gpu_present() is False


def small_model(path, shape=(224, 224, 3)):
    import keras

    model = keras.Sequential([keras.Input(shape), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(2, activation="softmax")])
    model.save(path)
    return path


def test_a_model_replaced_after_its_check_is_not_scored(info, tmp_path, monkeypatch):
    """The old metadata's threshold must not be applied to whatever now sits at the model's path."""
    import shutil

    copy = tmp_path / "densenet121_pneumonia.keras"
    shutil.copy(info.path, copy)
    checked = read_model_info(copy, input_scale=info.input_scale, threshold=info.threshold)
    small_model(tmp_path / "other.keras").replace(copy)
    with pytest.raises(ModelError, match="replaced after it was checked"):
        make_runner(checked, "keras", 4)

    # The TFLite runtime runs the very bytes it checked, even when the file is replaced right after the check.
    weights = tmp_path / "weights"
    weights.mkdir()
    for path in (info.path, metadata_path(info.path), tflite_path(info.path)):
        shutil.copy(path, weights)
    copied = read_model_info(weights / info.path.name)
    real_sha256 = inference.hashlib.sha256

    def replaced_once_hashed(content):
        tflite_path(copied.path).write_bytes(b"not a model")
        return real_sha256(content)

    monkeypatch.setattr(inference.hashlib, "sha256", replaced_once_hashed)
    content = converted_model(copied)
    monkeypatch.undo()
    assert TFLiteRunner(content, copied.input_scale).predict(np.zeros((1, 224, 224, 3), np.uint8)).shape == (1,)


def test_a_model_for_another_input_size_is_refused_at_load(tmp_path):
    with pytest.raises(ModelError, match=r"takes \(None, 299, 299, 3\); screening feeds 224x224 RGB"):
        load_keras_model(small_model(tmp_path / "m299.keras", (299, 299, 3)))
    with pytest.raises(ModelError, match=r"takes \(None, 224, 224, 1\)"):
        load_keras_model(small_model(tmp_path / "grey.keras", (224, 224, 1)))
    any_width = load_keras_model(small_model(tmp_path / "any_width.keras", (224, None, 3)))
    assert any_width.input_shape == (None, 224, None, 3)  # takes 224x224 as well as any other width
