"""The classifier: build, save with metadata, and load with integrity checks.

A model file always travels with a metadata file of the same name ending in
``.json``.  The metadata pins the model file's sha256, the class order, the
input size and scaling, and the operating threshold, so a threshold is never
used with a model it was not chosen for.  TensorFlow is imported only inside
the functions that need it: reading metadata must stay cheap.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import stat
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CLASS_NAMES = ["NORMAL", "PNEUMONIA"]
PNEUMONIA_INDEX = 1
INPUT_SIZE = 224

# Pixel scaling a model may expect from RGB values in 0..255.  The shipped
# model scales inside its own graph ("raw"); a user's model trained elsewhere
# can declare one of the others in its metadata or with --input-scale.
INPUT_SCALES = ("raw", "unit", "imagenet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The parts of a model's metadata that hold fields of their own (each optional here).
METADATA_PARTS = ("preprocessing", "threshold", "training", "validation", "tflite")

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "densenet121_pneumonia.keras"


# TensorFlow's C++ start-up chatter is not for screening users; real errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow 2.21 prints these at import whatever that level says; cron would mail them every night.
TENSORFLOW_IMPORT_NOTICES = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on.",
)
# Passes stdin on to stdout line by line, less the lines holding one of its arguments.
_NOTICE_FILTER = ("import sys\n"
                  "notices = [n.encode() for n in sys.argv[1:]]\n"
                  "for line in sys.stdin.buffer:\n"
                  "    if not any(n in line for n in notices):\n"
                  "        sys.stdout.buffer.write(line)\n"
                  "        sys.stdout.buffer.flush()\n")


class ModelError(Exception):
    """The model file or its metadata is missing, corrupt or inconsistent."""


@contextmanager
def stderr_without(*notices: str):
    """Hold back the known lines native code writes to file descriptor 2 (those holding one of
    ``notices``); pass on the rest as they come.  The filter is a process of its own, so that what
    native code prints just before it aborts (TensorFlow's CPU check at import) still reaches
    stderr."""
    if sys.stderr:
        sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # the caller closed stderr: nothing to hold back
        yield
        return
    read_end, write_end = os.pipe()
    notice_filter = subprocess.Popen([sys.executable, "-c", _NOTICE_FILTER, *notices], stdin=read_end,
                                     stdout=saved, stderr=subprocess.DEVNULL)
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        os.dup2(saved, 2)  # the pipe's last write end closes: the filter passes on the rest and ends
        os.close(saved)
        try:
            notice_filter.wait(timeout=10)
        except subprocess.TimeoutExpired:  # a process started meanwhile holds the pipe: never wait on it
            notice_filter.kill()


def import_quietly(module: str):
    """A module that imports TensorFlow (``keras``, TensorFlow's own TFLite interpreter), imported
    without TensorFlow's start-up notices.  They come once, as TensorFlow loads: later calls (every
    model build or load) start no filter process."""
    if "tensorflow" in sys.modules:
        return importlib.import_module(module)
    with stderr_without(*TENSORFLOW_IMPORT_NOTICES):
        return importlib.import_module(module)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def metadata_path(model_path: Path) -> Path:
    return Path(model_path).with_suffix(".json")


@dataclass(frozen=True)
class ModelInfo:
    """What screening needs to know about a model without loading it."""

    path: Path
    sha256: str
    threshold: float
    threshold_source: str
    input_scale: str
    metadata: dict


def checked_metadata(model_path: Path) -> dict:
    """The model's metadata, once it is shown to describe this very model file."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise ModelError(f"model file not found: {model_path}")
    meta_file = metadata_path(model_path)
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError as exc:
        raise ModelError(f"no metadata file {meta_file.name} beside the model") from exc
    except (OSError, ValueError) as exc:
        raise ModelError(f"model metadata {meta_file} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or any(not isinstance(meta.get(part, {}), dict) for part in METADATA_PARTS):
        raise ModelError(f"model metadata {meta_file} is not a metadata file of this tool: a JSON object, "
                         f"whose fields {', '.join(METADATA_PARTS)} are objects where present")
    actual_sha = sha256_of(model_path)
    expected = meta.get("sha256")
    if expected != actual_sha:
        raise ModelError(
            f"model file {model_path.name} does not match its metadata "
            f"(sha256 {actual_sha[:12]}..., metadata says {str(expected)[:12]}...): "
            "the threshold in the metadata belongs to another model"
        )
    if meta.get("class_names", CLASS_NAMES) != CLASS_NAMES:
        raise ModelError(f"model classes {meta.get('class_names')} are not {CLASS_NAMES}")
    size = meta.get("preprocessing", {}).get("input_size", INPUT_SIZE)
    if size != INPUT_SIZE:
        raise ModelError(f"model expects {size} px inputs; screening prepares {INPUT_SIZE} px")
    return meta


def read_only(path: Path) -> bool:
    """Write permission removed on purpose (os.access would say writable to root)."""
    return Path(path).exists() and not os.stat(path).st_mode & stat.S_IWUSR


def metadata_to_update(model_path: Path) -> dict:
    """The checked metadata of a model whose metadata is about to be rewritten."""
    meta = checked_metadata(model_path)
    meta_file = metadata_path(model_path)
    if read_only(meta_file):
        raise ModelError(f"{meta_file} is read-only: copy the model and its metadata elsewhere and "
                         "pass --model, or make it writable")
    return meta


def read_model_info(model_path: Path, input_scale: str | None = None,
                    threshold: float | None = None) -> ModelInfo:
    """Check the model file against its metadata and return what screening uses.

    A model without metadata is accepted only when the caller supplies both
    the input scaling and the threshold (a user's own model).
    """
    model_path = Path(model_path)
    meta_file = metadata_path(model_path)
    if meta_file.is_file():
        meta = checked_metadata(model_path)
        actual_sha = meta["sha256"]
    elif not model_path.is_file():
        raise ModelError(f"model file not found: {model_path}")
    elif input_scale is None or threshold is None:
        raise ModelError(f"no metadata file {meta_file.name} beside the model (screening takes "
                         "--input-scale and --threshold for a model without one)")
    else:
        meta, actual_sha = {}, sha256_of(model_path)
    stated = meta.get("preprocessing", {}).get("input_scale")
    if stated and input_scale and input_scale != stated:  # another scale makes every score meaningless
        raise ModelError(f"{meta_file.name} states the model's input scale, {stated}; --input-scale "
                         "is for a model without metadata")
    scale = input_scale or stated or "raw"
    if scale not in INPUT_SCALES:
        raise ModelError(f"unknown input scale {scale!r}; expected one of {INPUT_SCALES}")
    if threshold is not None:
        chosen, source = float(threshold), "command line"
    else:
        stored = meta.get("threshold") or {}
        if "value" not in stored:
            raise ModelError(f"metadata {meta_file.name} holds no threshold: run calibrate first "
                             "(screening also takes --threshold)")
        chosen, source = stored["value"], stored.get("method", "model metadata")
        if isinstance(chosen, bool) or not isinstance(chosen, (int, float)) or not 0 <= chosen <= 1:
            raise ModelError(f"metadata {meta_file.name}: its threshold {chosen!r} is not a probability "
                             "from 0 to 1")
    return ModelInfo(
        path=model_path,
        sha256=actual_sha,
        threshold=float(chosen),
        threshold_source=source,
        input_scale=scale,
        metadata=meta,
    )


def build_model(input_size: int | None = INPUT_SIZE, init: str = "random",
                imagenet_weights: Path | None = None, seed: int = 0):
    """DenseNet-121 backbone with the seed head, taking RGB values in 0..255.

    Scaling (x/255, then ImageNet mean/std as the Keras DenseNet expects) is
    part of the graph, so training, evaluation and screening cannot disagree
    about it.  ``input_size=None`` builds a resolution-free model for
    progressive-resizing training.
    """
    keras = import_quietly("keras")

    keras.utils.set_random_seed(seed)
    shape = (input_size, input_size, 3)
    if init == "imagenet":
        if imagenet_weights is None or not Path(imagenet_weights).is_file():
            raise ModelError("--init imagenet needs --imagenet-weights pointing to the "
                             "Keras DenseNet-121 no-top weight file")
        weights = str(imagenet_weights)
    elif init == "random":
        weights = None
    else:
        raise ValueError(f"init must be 'random' or 'imagenet', not {init!r}")
    inputs = keras.Input(shape=shape, name="image")
    x = keras.layers.Rescaling(1.0 / 255, name="to_unit")(inputs)
    x = keras.layers.Normalization(mean=list(IMAGENET_MEAN),
                                   variance=[s * s for s in IMAGENET_STD], name="imagenet_norm")(x)
    backbone = keras.applications.DenseNet121(include_top=False, weights=weights, input_shape=shape)
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.BatchNormalization(name="head_bn")(x)
    x = keras.layers.Dropout(0.3, name="head_dropout1")(x)
    x = keras.layers.Dense(512, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(0.2, name="head_dropout2")(x)
    outputs = keras.layers.Dense(len(CLASS_NAMES), activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="densenet121_pneumonia")


def backbone_of(model):
    return model.get_layer("densenet121")


def load_keras_model(model_path: Path, sha256: str | None = None):
    """Load a .keras or .h5 classifier with Keras safe mode on (no Lambda code runs).

    With ``sha256`` (the one its metadata was checked against), the file is hashed again once
    loaded: a model replaced after the check must not be scored at the old model's threshold.
    """
    keras = import_quietly("keras")

    try:
        model = keras.models.load_model(model_path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a bad file
        raise ModelError(f"cannot load model {model_path}: {exc}") from exc
    if sha256 and sha256_of(model_path) != sha256:
        raise ModelError(f"model {model_path} was replaced after it was checked against its metadata")
    shape = tuple(model.output_shape)
    if shape[-1] != len(CLASS_NAMES):
        raise ModelError(f"model {model_path} outputs {shape}; expected {len(CLASS_NAMES)} classes")
    *_, rows, columns, channels = model.input_shape
    if channels != 3 or rows not in (INPUT_SIZE, None) or columns not in (INPUT_SIZE, None):
        raise ModelError(f"model {model_path} takes {tuple(model.input_shape)}; screening feeds "
                         f"{INPUT_SIZE}x{INPUT_SIZE} RGB images")
    return model
