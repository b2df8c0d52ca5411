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

    The feature maps and the score come from models cut from the classifier's own graph, so a
    skip connection or a merge layer (DenseNet's concatenations, a ResNet's additions) runs as it
    was built: calling the layers one after another would hand a merge layer a single input.
    """
    import keras
    import tensorflow as tf

    feature = _last_feature_map(model)
    x = tf.convert_to_tensor(scale_batch(batch, input_scale))
    try:  # the head alone on the tape: taping the backbone too doubles the time of a map
        head = keras.Model(feature, model.outputs[0])
    except ValueError:  # a head that also reads earlier layers: the whole network on the tape
        head = None
    if head is not None:
        features = keras.Model(model.inputs, feature)(x, training=False)
        with tf.GradientTape() as tape:
            tape.watch(features)
            score = head(features, training=False)[:, PNEUMONIA_INDEX]
    else:
        with tf.GradientTape() as tape:
            features, probabilities = keras.Model(model.inputs, [feature, model.outputs[0]])(x, training=False)
            score = probabilities[:, PNEUMONIA_INDEX]
    grads = tape.gradient(score, features)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1)).numpy()
    peak = cams.reshape(len(cams), -1).max(axis=1)[:, None, None]
    return np.divide(cams, peak, out=np.zeros_like(cams), where=peak > 0)


def _last_feature_map(model):
    """The output of the model's last layer with a 4-D output, as a tensor of the model's graph.

    Taken from the node where the model calls the layer: a nested backbone (the shipped model's
    DenseNet-121 is one layer) answers ``.output`` with its own inner tensor, which is not
    connected to the outer model's inputs.
    """
    import keras

    outputs = [layer._inbound_nodes[-1].output_tensors[0] for layer in model.layers
               if not isinstance(layer, keras.layers.InputLayer)]
    spatial = [tensor for tensor in outputs if len(tensor.shape) == 4]
    if not spatial:
        raise ValueError("the model has no layer with 4-D (spatial) output to draw a heatmap from")
    return spatial[-1]


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
