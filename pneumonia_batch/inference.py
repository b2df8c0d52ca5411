"""Runtimes that turn a batch of model inputs into pneumonia probabilities.

- ``tflite``: the model converted once to TensorFlow Lite and run by LiteRT's
  XNNPACK CPU kernels.  The fastest runtime measured on CPU-only machines,
  and it needs no TensorFlow import at screening time.  The converted file
  sits beside the model and is pinned by sha256 in the model's metadata.
- ``keras``: the Keras model as an XLA-compiled function over fixed-size
  batches; what runs on a GPU.

``auto`` takes ``keras`` when a GPU is present, else ``tflite`` when the model
has a converted file, else ``keras``.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from pathlib import Path

import numpy as np

from .model import INPUT_SIZE, PNEUMONIA_INDEX, ModelError, ModelInfo, import_quietly, sha256_of, stderr_without
from .pipeline import usable_cores
from .preprocess import scale_batch

RUNTIMES = ("auto", "tflite", "keras")
INPUT_SHAPE = (INPUT_SIZE, INPUT_SIZE, 3)


def tflite_path(model_path: Path) -> Path:
    return Path(model_path).with_suffix(".tflite")


def gpu_present() -> bool:
    """Whether TensorFlow can use a GPU.  The device nodes are looked for first, so a machine
    without them never imports TensorFlow here; with them (WSL2 always has /dev/dxg, a container
    may have /dev/nvidiactl), TensorFlow must also see a GPU."""
    if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/dxg")):
        return False
    return bool(import_quietly("tensorflow").config.list_physical_devices("GPU"))


class KerasRunner:
    """The Keras model, XLA-compiled for a fixed batch shape (short batches are padded)."""

    name = "keras"

    def __init__(self, model_path: Path, input_scale: str, batch_size: int | None = None,
                 jit: bool = False, sha256: str | None = None):
        import_quietly("keras")
        import tensorflow as tf

        from .model import load_keras_model

        self.model = load_keras_model(model_path, sha256)
        self.input_scale = input_scale
        self.batch_size = batch_size
        self._call = tf.function(lambda x: self.model(x, training=False), jit_compile=jit,
                                 reduce_retracing=True)
        if jit:
            self.name = "keras-xla"

    def _prepare(self, batch: np.ndarray) -> np.ndarray:
        x = scale_batch(batch, self.input_scale)
        if self.batch_size and len(x) < self.batch_size:  # one compiled shape, whatever the corpus size
            x = np.concatenate([x, np.zeros((self.batch_size - len(x), *x.shape[1:]), x.dtype)])
        return x

    def _probabilities(self, x, n: int) -> np.ndarray:
        return np.asarray(self._call(x), dtype=np.float32)[:n, PNEUMONIA_INDEX].astype(np.float64)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self._probabilities(self._prepare(batch), len(batch))

    def run(self, stream):
        """(items, uint8 batch) -> (items, probabilities), through a prefetching tf.data pipeline.

        The next batch is prepared (and, on a GPU, copied to the device) while
        the current one is computed.
        """
        import tensorflow as tf

        sizes = deque()

        def prepared():
            for items, batch in stream:
                sizes.append(items)
                yield self._prepare(batch)

        spec = tf.TensorSpec((self.batch_size, *INPUT_SHAPE), tf.float32)
        dataset = tf.data.Dataset.from_generator(prepared, output_signature=spec)
        if gpu_present():
            dataset = dataset.apply(tf.data.experimental.prefetch_to_device("/gpu:0", 2))
        else:
            dataset = dataset.prefetch(2)
        for x in dataset:
            items = sizes.popleft()
            yield items, self._probabilities(x, len(items))


# LiteRT prints this on stderr at every load whatever the log level; cron would mail it nightly.
XNNPACK_NOTICE = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."


class TFLiteRunner:
    """TensorFlow Lite with XNNPACK, one image per invoke (fastest on CPU here)."""

    name = "tflite"

    def __init__(self, model: bytes, input_scale: str, threads: int | None = None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:  # the interpreter that ships inside TensorFlow
            Interpreter = import_quietly("tensorflow.lite.python.interpreter").Interpreter
        with stderr_without(XNNPACK_NOTICE):
            self.interpreter = Interpreter(model_content=model, num_threads=threads or usable_cores())
            self.interpreter.allocate_tensors()
        self.input_index = self.interpreter.get_input_details()[0]["index"]
        self.output_index = self.interpreter.get_output_details()[0]["index"]
        self.input_scale = input_scale

    def predict(self, batch: np.ndarray) -> np.ndarray:
        x = scale_batch(batch, self.input_scale)
        out = np.empty(len(x))
        for i in range(len(x)):
            self.interpreter.set_tensor(self.input_index, x[i:i + 1])
            self.interpreter.invoke()
            out[i] = self.interpreter.get_tensor(self.output_index)[0, PNEUMONIA_INDEX]
        return out

    def run(self, stream):
        for items, batch in stream:
            yield items, self.predict(batch)


def converted_model(info: ModelInfo) -> bytes | None:
    """The model's TFLite conversion, if present and pinned to this model in its metadata.  The
    bytes that were checked are the ones run: a file replaced after the check is never loaded."""
    entry = info.metadata.get("tflite") or {}
    path = tflite_path(info.path)
    if not path.is_file() or entry.get("converted_from_sha256") != info.sha256:
        return None
    content = path.read_bytes()
    if entry.get("sha256") != hashlib.sha256(content).hexdigest():
        raise ModelError(f"{path.name} does not match the sha256 recorded in the model's metadata")
    return content


def make_runner(info: ModelInfo, runtime: str, batch_size: int):
    """The runtime for this machine ('auto'), or the one asked for."""
    gpu = runtime != "tflite" and gpu_present()  # TFLite alone imports no TensorFlow
    converted = None
    if runtime == "tflite" or (runtime == "auto" and not gpu):  # hashes 30 MB: once, and only here
        converted = converted_model(info)
    if runtime == "auto":
        runtime = "tflite" if converted else "keras"
    if runtime == "tflite":
        if converted is None and not info.metadata:  # convert pins its output in the metadata
            raise ModelError(f"--runtime tflite needs the model's metadata, which {info.path.name} has not; "
                             "use --runtime keras")
        if converted is None:
            raise ModelError(f"no TFLite conversion of {info.path.name}; run "
                             f"'python -m pneumonia_batch convert --model {info.path}'")
        return TFLiteRunner(converted, info.input_scale)
    if runtime == "keras":
        return KerasRunner(info.path, info.input_scale, batch_size, jit=gpu, sha256=info.sha256)
    raise ValueError(f"unknown runtime {runtime!r}")


def convert_to_tflite(model_path: Path) -> Path:
    """Convert a Keras model to TFLite beside it and pin the result in its metadata."""
    import contextlib
    import io

    from .atomic import cannot_write_in, write_atomic, write_json_atomic
    from .model import load_keras_model, metadata_path, metadata_to_update, read_only

    meta = metadata_to_update(model_path)  # a conversion is pinned to the model its metadata describes
    target = tflite_path(model_path)
    if read_only(target):
        raise ModelError(f"{target} is read-only")
    if refusal := cannot_write_in(target.parent):  # found before the minutes of converting
        raise ModelError(refusal)
    model = load_keras_model(model_path, meta["sha256"])
    import tensorflow as tf

    with contextlib.redirect_stdout(io.StringIO()):  # Keras prints every captured variable
        flatbuffer = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    write_atomic(target, flatbuffer)
    meta["tflite"] = {"file": target.name, "sha256": sha256_of(target),
                      "converted_from_sha256": meta["sha256"],
                      "tensorflow": tf.__version__}
    write_json_atomic(metadata_path(model_path), meta)
    return target
