"""Grad-CAM heatmaps of the pneumonia class, and their overlay on the X-ray.

Selvaraju et al. 2017: the last convolutional feature maps weighted by the
mean gradient of the class score, rectified and normalised.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .model import PNEUMONIA_INDEX
from .preprocess import scale_batch


def heatmaps(model, batch: np.ndarray, input_scale: str) -> np.ndarray:
    """(n, h, w) maps in [0, 1] for a uint8 batch, at the last 4-D layer's resolution.

    The classifier is applied layer by layer (it is a single chain), so the
    feature maps of its last spatial layer can be watched by the tape.
    """
    import keras
    import tensorflow as tf

    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    last_spatial = max(i for i, layer in enumerate(layers) if len(layer.output.shape) == 4)
    x = tf.convert_to_tensor(scale_batch(batch, input_scale))
    for layer in layers[:last_spatial + 1]:
        x = layer(x, training=False)
    features = x
    with tf.GradientTape() as tape:
        tape.watch(features)
        y = features
        for layer in layers[last_spatial + 1:]:
            y = layer(y, training=False)
        score = y[:, PNEUMONIA_INDEX]
    grads = tape.gradient(score, features)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1)).numpy()
    peak = cams.reshape(len(cams), -1).max(axis=1)[:, None, None]
    return np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0)


def overlay(grey: Image.Image, cam: np.ndarray, alpha: float = 0.4) -> Image.Image:
    """The heatmap, stretched to the image (as the model's input was squashed), over the X-ray."""
    from matplotlib import colormaps

    size = grey.size
    heat = Image.fromarray(np.uint8(np.clip(cam, 0, 1) * 255)).resize(size, Image.Resampling.BILINEAR)
    coloured = colormaps["jet"](np.asarray(heat) / 255.0)[..., :3]
    base = np.asarray(grey.convert("RGB"), np.float32) / 255.0
    weight = alpha * (np.asarray(heat, np.float32)[..., None] / 255.0)
    mixed = base * (1 - weight) + coloured * weight
    return Image.fromarray(np.uint8(np.round(mixed * 255)))
