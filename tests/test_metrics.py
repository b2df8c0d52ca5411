"""Metrics and calibration against answers worked out by hand."""

import numpy as np
import pytest

from pneumonia_batch.evaluate import (RUNTIME_MARGIN, confusion_matrix, metrics_at, roc_auc,
                                      threshold_for_sensitivity, wilson_interval)

LABELS = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
SCORES = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.7, 0.6, 0.3, 0.95, 0.5])


def test_confusion_matrix_and_report_by_hand():
    m = metrics_at(LABELS, SCORES, 0.5)
    # normals: 0.1, 0.4, 0.35 below, 0.8 above -> TN 3, FP 1
    # pneumonia: 0.9, 0.7, 0.6, 0.95, 0.5 at/above, 0.3 below -> TP 5, FN 1
    assert m["confusion_matrix"] == [[3, 1], [1, 5]]
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["sensitivity"] == pytest.approx(5 / 6)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["classification_report"]["PNEUMONIA"]["precision"] == pytest.approx(5 / 6)
    assert m["classification_report"]["NORMAL"]["f1"] == pytest.approx(0.75)


def test_roc_auc_counts_ordered_pairs():
    # 6 x 4 = 24 (pneumonia, normal) pairs against normals 0.1, 0.35, 0.4, 0.8:
    # 0.95 and 0.9 beat 4 each, 0.7, 0.6 and 0.5 beat 3 each, 0.3 beats 1: 18 pairs.
    assert roc_auc(LABELS, SCORES) == pytest.approx(18 / 24)


def test_auc_ties_count_half():
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    assert roc_auc(np.array([0, 1, 1]), np.array([0.2, 0.9, 0.8])) == pytest.approx(1.0)


def test_calibration_sits_just_below_the_pneumonia_probability_it_needs():
    rng = np.random.default_rng(1)
    positives = np.linspace(0.01, 1.0, 100)  # sensitivity >= 0.97 needs 97 of them: 0.04 and above
    labels = np.r_[np.ones(100), np.zeros(50)].astype(int)
    scores = np.r_[rng.permutation(positives), rng.uniform(0.1, 0.5, 50)]
    t = threshold_for_sensitivity(labels, scores, 0.97)
    assert t == pytest.approx(0.04 - RUNTIME_MARGIN, abs=1e-12)  # next lower score 0.03: the margin
    assert metrics_at(labels, scores, t)["sensitivity"] == pytest.approx(0.97)
    # a runtime rounding every probability a little lower still flags the boundary image
    assert metrics_at(labels, scores - 1e-6, t)["sensitivity"] == pytest.approx(0.97)
    assert metrics_at(labels, scores, 0.04 + 1e-9)["sensitivity"] < 0.97


def test_calibration_never_passes_the_next_lower_probability():
    labels = np.array([1, 1, 0, 1])
    scores = np.array([0.9, 0.04, 0.03996, 0.01])  # 2 of 3 pneumonia: the boundary 0.04
    t = threshold_for_sensitivity(labels, scores, 0.6)
    assert t == pytest.approx(0.03998, abs=1e-12)  # halfway to the normal image at 0.03996
    assert metrics_at(labels, scores, t)["confusion_matrix"] == [[1, 0], [1, 2]]
    assert threshold_for_sensitivity(labels, scores, 1.0) == pytest.approx(0.01 - RUNTIME_MARGIN)  # none lower


def test_confusion_matrix_shape():
    assert confusion_matrix([0, 1, 1], [False, True, False]).tolist() == [[1, 0], [1, 1]]


def test_wilson_interval_by_hand():
    # 8 of 10: centre (0.8 + z^2/20) / (1 + z^2/10) = 0.7167, half-width 0.2266 (z = 1.96)
    assert wilson_interval(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-4)
    # all of n: the upper end is 1 and the lower n / (n + z^2)
    assert wilson_interval(10, 10) == pytest.approx([10 / (10 + 1.959964 ** 2), 1.0])
    assert wilson_interval(0, 0) is None
    m = metrics_at(LABELS, SCORES, 0.5)  # sensitivity 5/6, specificity 3/4 (above)
    assert m["sensitivity_95ci"] == pytest.approx(wilson_interval(5, 6))
    assert m["specificity_95ci"] == pytest.approx(wilson_interval(3, 4))


def test_one_class_leaves_the_other_classs_figures_undefined():
    """A pneumonia-only set has a sensitivity; its specificity and AUC are not 0 but undefined."""
    m = metrics_at(np.array([1, 1, 1]), np.array([0.9, 0.2, 0.6]), 0.5)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["sensitivity_95ci"] == pytest.approx(wilson_interval(2, 3))
    assert m["specificity"] is None and m["specificity_95ci"] is None
    assert m["classification_report"]["NORMAL"] == {"precision": 0.0, "recall": None, "f1": None, "support": 0}
    assert roc_auc(np.array([1, 1, 1]), np.array([0.9, 0.2, 0.6])) is None
    assert metrics_at(np.array([0, 0]), np.array([0.9, 0.2]), 0.5)["sensitivity"] is None
    none_called_normal = metrics_at(np.array([1, 1]), np.array([0.9, 0.6]), 0.5)["classification_report"]
    assert none_called_normal["NORMAL"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    missed = metrics_at(np.array([0, 1]), np.array([0.9, 0.8]), 0.5)["classification_report"]["NORMAL"]
    assert missed == {"precision": None, "recall": 0.0, "f1": 0.0, "support": 1}


@pytest.mark.parametrize("count, warned", [(None, False), (0, False), (2, True)])
def test_the_table_warns_only_when_images_share_training_patient_tokens(count, warned):
    from pneumonia_batch.evaluate import format_table

    result = {"n_images": 10, "n_pneumonia": 6, "roc_auc": roc_auc(LABELS, SCORES), "not_used": [],
              "n_with_training_patient_token": count,
              "at_model_threshold": metrics_at(LABELS, SCORES, 0.4), "at_0.5": metrics_at(LABELS, SCORES, 0.5)}
    lines = format_table(result).splitlines()
    assert (lines[1] == "warning: 2 of these images carry the patient token (from the file name) of images the "
                        "model was trained on: if they are the same patients, these figures are optimistic") == warned
    assert sum("warning" in line for line in lines) == warned
