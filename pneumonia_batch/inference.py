"""Runtimes that turn a batch of model inputs into pneumonia probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
