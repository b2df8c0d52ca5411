"""Grad-CAM shows where the pneumonia score comes from, and the overlay puts it over that place.

The model is built here so that its pneumonia score depends on the top-right quadrant of the image
only, while its last feature maps are active everywhere.  Top-right is the one quadrant that no
flip or transpose of a map leaves in place.
"""

import numpy as np
import pytest
from PIL import Image

from pneumonia_batch.gradcam import heatmaps, overlay
from pneumonia_batch.model import INPUT_SIZE, PNEUMONIA_INDEX
from pneumonia_batch.preprocess import scale_batch, to_model_input

INPUT_SCALE = "unit"


def top_right(plane: np.ndarray) -> np.ndarray:
    h, w = plane.shape[:2]
    return plane[:h // 2, w // 2:]


def top_right_beside_all():
    """The last spatial layer: the features masked to the top-right quadrant, which the head reads
    for pneumonia, beside the same features unmasked, which it ignores.  Only the gradient tells
    the two apart: a map of the activations alone would light up everywhere."""
    import keras

    class TopRightBesideAll(keras.layers.Layer):
        def call(self, x):
            mask = np.zeros((1, x.shape[1], x.shape[2], 1), np.float32)
            top_right(mask[0])[:] = 1
            return keras.ops.concatenate([x * mask, x], axis=-1)

    return TopRightBesideAll()


@pytest.fixture(scope="module", params=["chain", "skip-connection", "nested-backbone", "head-reads-earlier"])
def model(request):
    """Positive convolutions, then the top-right layer, then a head reading its masked half.

    As a single chain of layers; with a skip connection (an ``Add`` of two branches, as in ResNets
    and, by concatenation, DenseNet); with that branching backbone nested as one layer, as the
    shipped model nests its DenseNet-121; and with a head that also pools an earlier layer (with
    weight 0), so it cannot be cut from the backbone at the last feature maps."""
    import keras

    keras.utils.set_random_seed(0)
    positive = keras.initializers.RandomUniform(0.0, 0.1, seed=0)
    head = np.zeros((16, 2), np.float32)
    head[:8, PNEUMONIA_INDEX] = 0.05  # small enough that the softmax is not saturated
    conv = dict(strides=2, padding="same", activation="relu", kernel_initializer=positive)
    if request.param == "chain":
        return keras.Sequential([
            keras.Input((INPUT_SIZE, INPUT_SIZE, 3)),
            keras.layers.Conv2D(4, 3, **conv),
            keras.layers.Conv2D(8, 3, **conv),
            keras.layers.Conv2D(8, 3, **conv),
            keras.layers.Conv2D(8, 3, **conv),
            top_right_beside_all(),  # the last spatial layer: 14 x 14
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(2, activation="softmax", kernel_initializer=keras.initializers.Constant(head)),
        ])
    image = keras.Input((INPUT_SIZE, INPUT_SIZE, 3))
    x = keras.layers.Conv2D(4, 3, **conv)(image)
    x = keras.layers.Conv2D(8, 3, **conv)(x)
    x = keras.layers.Conv2D(8, 3, **conv)(x)
    x = keras.layers.Conv2D(8, 3, **conv)(x)
    branch = keras.layers.Conv2D(8, 1, activation="relu", kernel_initializer=positive)(x)
    x = top_right_beside_all()(keras.layers.Add()([x, branch]))
    if request.param == "nested-backbone":
        backbone = keras.Model(image, x, name="backbone")
        image = keras.Input((INPUT_SIZE, INPUT_SIZE, 3))
        x = backbone(image)
    x = keras.layers.GlobalAveragePooling2D()(x)
    if request.param == "head-reads-earlier":
        x = keras.layers.Concatenate()([x, keras.layers.GlobalAveragePooling2D()(branch)])
        head = np.concatenate([head, np.zeros((8, 2), np.float32)])
    scores = keras.layers.Dense(2, activation="softmax", kernel_initializer=keras.initializers.Constant(head))(x)
    return keras.Model(image, scores)


def xray(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(60, 256, (height, width), np.uint8))


def pneumonia(model, batch: np.ndarray) -> np.ndarray:
    return np.asarray(model(scale_batch(batch, INPUT_SCALE), training=False))[:, PNEUMONIA_INDEX]


def test_the_score_comes_from_the_top_right_quadrant_only(model):
    batch = to_model_input(xray(300, 200, 0))[None]
    outside, inside = batch.copy(), batch.copy()
    outside[:, INPUT_SIZE // 2 + 24:] = 0  # bottom half, clear of what the quadrant's features see
    top_right(inside[0])[:] = 0
    assert 0.5 < pneumonia(model, batch)[0] < 0.99  # a saturated score would have no gradient
    assert np.allclose(pneumonia(model, outside), pneumonia(model, batch))
    assert not np.allclose(pneumonia(model, inside), pneumonia(model, batch), atol=1e-3)


def test_the_heatmap_peaks_in_the_quadrant_the_score_comes_from(model):
    batch = np.stack([to_model_input(xray(300, 200, seed)) for seed in (1, 2)])
    batch[1] //= 2  # a darker image: each map is normalised on its own
    cams = heatmaps(model, batch, INPUT_SCALE)
    assert cams.shape == (2, 14, 14)
    for cam in cams:
        assert cam.min() >= 0 and cam.max() == pytest.approx(1.0)
        row, col = np.unravel_index(np.argmax(cam), cam.shape)
        assert row < cam.shape[0] // 2 and col >= cam.shape[1] // 2
        assert top_right(cam).sum() > 0.9 * cam.sum()


def test_the_overlay_is_the_xray_with_the_heat_over_the_same_quadrant(model):
    grey = xray(300, 200, 3)  # landscape: the heatmap is stretched, not cropped
    cam = heatmaps(model, to_model_input(grey)[None], INPUT_SCALE)[0]
    picture = overlay(grey, cam)
    assert picture.size == grey.size and picture.mode == "RGB"
    change = np.abs(np.asarray(picture, np.float32) - np.asarray(grey.convert("RGB"), np.float32)).sum(axis=2)
    h, w = change.shape
    quadrants = {"top-left": change[:h // 2, :w // 2], "top-right": top_right(change),
                 "bottom-left": change[h // 2:, :w // 2], "bottom-right": change[h // 2:, w // 2:]}
    means = {name: float(q.mean()) for name, q in quadrants.items()}
    assert max(means, key=means.get) == "top-right"
    assert means["top-right"] > 10 * max(v for k, v in means.items() if k != "top-right")


def test_only_the_head_is_taped_where_it_can_be_cut_from_the_backbone(model, request, monkeypatch):
    """Taping the backbone too doubles a map's time: only a head that also reads earlier layers
    puts the whole network on the tape (and then watches nothing by hand)."""
    import tensorflow as tf

    watched = []
    watch = tf.GradientTape.watch
    monkeypatch.setattr(tf.GradientTape, "watch", lambda tape, tensor: watched.append(tensor) or watch(tape, tensor))
    heatmaps(model, to_model_input(xray(300, 200, 4))[None], INPUT_SCALE)
    assert len(watched) == (0 if request.node.callspec.params["model"] == "head-reads-earlier" else 1)
