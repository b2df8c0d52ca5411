"""Runtimes that turn a batch of model inputs into pneumonia probabilities."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# TensorFlow's C++ start-up chatter is not for screening users; real errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from .model import PNEUMONIA_INDEX, load_keras_model
from .preprocess import scale_batch


class KerasRunner:
    """The Keras model itself, run as a compiled tf.function."""

    name = "keras"

    def __init__(self, model_path: Path, input_scale: str):
        self.model = load_keras_model(model_path)
        self.input_scale = input_scale

    def predict(self, batch: np.ndarray) -> np.ndarray:
        probabilities = self.model(scale_batch(batch, self.input_scale), training=False)
        return np.asarray(probabilities)[:, PNEUMONIA_INDEX].astype(np.float64)


def make_runner(info, runtime: str, batch_size: int):
    """The runtime for this machine ('auto'), or the one asked for."""
    if runtime in ("auto", "keras"):
        return KerasRunner(info.path, info.input_scale)
    raise ValueError(f"unknown runtime {runtime!r}")
