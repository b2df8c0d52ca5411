"""Evaluation metrics, threshold calibration and the evaluation report.

Metrics are computed with numpy so that they can be checked by hand; the
model is only needed to produce probabilities.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from pathlib import Path

import numpy as np

from .atomic import write_json_atomic
from .dataset import VALIDATION_SPLIT, LabelledImage, UnusedFile, patient_of, training_patients
from .discover import count_reasons, readable
from .model import CLASS_NAMES, metadata_path, metadata_to_update, read_model_info

Z_95 = 1.959964  # two-sided 95 % normal quantile


def confusion_matrix(labels: np.ndarray, flagged: np.ndarray) -> np.ndarray:
    """2x2 counts, rows true class [NORMAL, PNEUMONIA], columns predicted."""
    labels = np.asarray(labels, int)
    flagged = np.asarray(flagged, int)
    matrix = np.zeros((2, 2), int)
    np.add.at(matrix, (labels, flagged), 1)
    return matrix


def wilson_interval(successes: int, n: int) -> list[float] | None:
    """95 % Wilson score interval of a proportion; None when there is nothing to count.

    Sensitivity and specificity are proportions of a few hundred cases at best:
    the interval says how far they may move on the next images of the same kind.
    """
    if n == 0:
        return None
    p, z2 = successes / n, Z_95 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def metrics_at(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict:
    """Accuracy, sensitivity, specificity (with 95 % intervals) and a per-class report at one threshold.

    Sensitivity without pneumonia images, and specificity without normal ones,
    are None (null in JSON): not 0, which would read as a model that misses everything.
    """
    matrix = confusion_matrix(labels, np.asarray(probabilities) >= threshold)
    (tn, fp), (fn, tp) = matrix
    report = {}
    for k, name in enumerate(CLASS_NAMES):
        predicted = matrix[:, k].sum()
        actual = matrix[k, :].sum()
        precision = float(matrix[k, k] / predicted) if predicted else None  # nothing called this class
        recall = f1 = None  # a class with no images
        if actual:
            recall = float(matrix[k, k] / actual)
            # a recall of 0 makes F1 0 whatever the precision, even an undefined one
            f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
        report[name] = {"precision": precision, "recall": recall, "f1": f1, "support": int(actual)}
    total = matrix.sum()
    return {
        "threshold": float(threshold),
        "accuracy": float((tn + tp) / total) if total else 0.0,
        "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
        "specificity": float(tn / (tn + fp)) if tn + fp else None,
        "sensitivity_95ci": wilson_interval(int(tp), int(tp + fn)),
        "specificity_95ci": wilson_interval(int(tn), int(tn + fp)),
        "confusion_matrix": matrix.tolist(),
        "classification_report": report,
    }


def roc_curve(labels: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold, from (0,0) to (1,1)."""
    labels = np.asarray(labels, int)
    order = np.argsort(-np.asarray(probabilities), kind="mergesort")
    scores = np.asarray(probabilities)[order]
    hits = labels[order]
    distinct = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(hits)[distinct]
    fps = (distinct + 1) - tps
    n_pos, n_neg = hits.sum(), len(hits) - hits.sum()
    return np.r_[0.0, fps / max(n_neg, 1)], np.r_[0.0, tps / max(n_pos, 1)]


def roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half, as the Mann-Whitney statistic); None for one class."""
    labels = np.asarray(labels, int)
    if labels.min() == labels.max():
        return None
    fpr, tpr = roc_curve(labels, probabilities)
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # trapz before numpy 2
    return float(trapezoid(tpr, fpr))


# Runtimes round a probability differently in its last digits: TFLite and Keras differed by up to
# 8e-7 on the 525 validation images here, and other TensorFlow builds or a GPU differ
# more.  A threshold set exactly on the pneumonia image it needs could leave that very image
# unflagged at screening.
RUNTIME_MARGIN = 1e-4


def threshold_for_sensitivity(labels: np.ndarray, probabilities: np.ndarray,
                              target: float) -> float:
    """A threshold whose sensitivity (probability >= threshold) reaches ``target``: the lowest
    pneumonia probability that needs, less ``RUNTIME_MARGIN``, but never past the midpoint to the
    next lower probability of any image, so that every image is flagged or not as at that boundary."""
    probabilities = np.asarray(probabilities, float)
    positives = np.sort(probabilities[np.asarray(labels) == 1])[::-1]
    if len(positives) == 0:
        raise ValueError("no pneumonia cases to calibrate on")
    needed = math.ceil(target * len(positives) - 1e-9)
    boundary = float(positives[max(needed, 1) - 1])
    below = probabilities[probabilities < boundary]
    midpoint = (boundary + float(below.max())) / 2 if below.size else 0.0
    return max(boundary - RUNTIME_MARGIN, midpoint)


def predict_items(model_path: Path, items: list[LabelledImage], input_scale: str, batch_size: int = 32,
                  ) -> tuple[list[LabelledImage], np.ndarray, list[UnusedFile]]:
    """Pneumonia probabilities through the screening decode and preprocessing.

    Returns the items that decoded, their probabilities, and the files that did
    not decode with the error screening would report for them.
    """
    from .inference import KerasRunner
    from .pipeline import NO_PROBABILITY, decode_for_model

    runner = KerasRunner(model_path, input_scale)
    kept, failed, out = [], [], []
    for start in range(0, len(items), batch_size):
        inputs = []
        for item in items[start:start + batch_size]:
            array, _, why_not = decode_for_model(str(item.path), item.kind)
            if array is None:
                failed.append(UnusedFile(item.path, readable(why_not)))
            else:
                kept.append(item)
                inputs.append(array)
        if inputs:
            out.append(runner.predict(np.stack(inputs)))
    if not kept:
        raise ValueError(f"none of the {len(items)} images could be decoded: "
                         f"{count_reasons(u.reason for u in failed)}")
    probabilities = np.concatenate(out)
    if not np.isfinite(probabilities).all():  # no metric or threshold means anything then
        raise ValueError(f"{NO_PROBABILITY} ({np.count_nonzero(~np.isfinite(probabilities))} "
                         f"of {len(kept)} images)")
    return kept, probabilities, failed


def calibrate_model(model_path: Path, items: list[LabelledImage], data: str, target_sensitivity: float = 0.97,
                    unused: list[UnusedFile] = (), log=print, folder: Path | None = None) -> dict:
    """Choose the threshold on labelled data and store it in the model's metadata.

    ``data`` says what the images are, for the record: the patient-held-out
    validation split of the training data, or a user's own labelled images.
    """
    model_path = Path(model_path)
    meta = metadata_to_update(model_path)  # the threshold must be written for this very model
    _require_both_classes(items)
    items, probabilities, failed = predict_items(model_path, items, meta["preprocessing"]["input_scale"])
    _require_both_classes(items)  # still, after the files that did not decode
    unused = [*unused, *failed]
    labels = np.array([i.label for i in items], int)
    threshold = threshold_for_sensitivity(labels, probabilities, target_sensitivity)
    at_threshold = metrics_at(labels, probabilities, threshold)
    meta["threshold"] = {
        "value": threshold,
        "method": f"just below the lowest pneumonia probability giving sensitivity >= {target_sensitivity:g} "
                  f"on {data} ({len(items)} images): by {RUNTIME_MARGIN:g} for runtimes' rounding, or by half "
                  "the gap to the next lower probability when that is less",
        "target_sensitivity": target_sensitivity,
        "chosen": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        # a user's own folder (--local): evaluate warns about figures on its images at this threshold
        **({"chosen_on_folder": str(Path(folder).resolve())} if folder else {}),
    }
    meta["validation"] = {
        "data": data,
        "n_images": len(items),
        "n_pneumonia": int(labels.sum()),
        "not_used": count_reasons(u.reason for u in unused),
        "roc_auc": roc_auc(labels, probabilities),
        "at_threshold": at_threshold,
        "at_0.5": metrics_at(labels, probabilities, 0.5),
        "note": ("the threshold and the checkpoint were chosen on this split" if data == VALIDATION_SPLIT
                 else "the threshold was chosen on these images")
                + ", so these figures are optimistic; judge the model on data it never saw",
    }
    write_json_atomic(metadata_path(model_path), meta)
    if unused:
        log(f"{len(unused)} files not used: {count_reasons(u.reason for u in unused)}")
    low, high = at_threshold["sensitivity_95ci"]  # both classes are there: every figure is defined
    log(f"threshold {threshold:.4f} on {len(items)} images ({int(labels.sum())} pneumonia): sensitivity "
        f"{at_threshold['sensitivity']:.3f} (95 % interval {low:.3f}-{high:.3f}), specificity "
        f"{at_threshold['specificity']:.3f}, AUC {meta['validation']['roc_auc']:.4f}")
    return meta


def _require_both_classes(items: list[LabelledImage]) -> None:
    present = {i.label for i in items}
    missing = [name for label, name in enumerate(CLASS_NAMES) if label not in present]
    if missing:
        raise ValueError(f"no {missing[0]} images among the {len(items)} usable ones: a threshold needs both "
                         "classes, pneumonia for its sensitivity and normal for its specificity")


def evaluate(model_path: Path, items: list[LabelledImage], out_dir: Path,
             unused: list[UnusedFile] = ()) -> dict:
    """Metrics at the model's threshold and at 0.5, as JSON plus ROC and confusion PNGs.

    A folder of one class is evaluated too (the sensitivity of a pneumonia-only
    set); the figures the other class would give are None.
    """
    info = read_model_info(model_path)  # scaling and threshold from the metadata only
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # a bad --out-dir fails before the inference, not after
    items, probabilities, failed = predict_items(model_path, items, info.input_scale)
    unused = [*unused, *failed]
    labels = np.array([i.label for i in items], int)
    trained_on = training_patients(info.metadata.get("training"))
    result = {
        "model": str(model_path),
        "model_sha256": info.sha256,
        "n_images": len(items),
        "n_pneumonia": int(labels.sum()),
        # figures that include these patients' images are optimistic; None: no metadata lists them
        "n_with_training_patient_token": (None if trained_on is None else
                                          sum(patient_of(i.path) in trained_on for i in items)),
        "n_in_threshold_folder": _count_in(info.metadata.get("threshold", {}).get("chosen_on_folder"), items),
        "roc_auc": roc_auc(labels, probabilities),
        "at_model_threshold": metrics_at(labels, probabilities, info.threshold),
        "at_0.5": metrics_at(labels, probabilities, 0.5),
        "images": [{"path": readable(str(i.path)), "label": CLASS_NAMES[i.label], "probability": float(p)}
                   for i, p in zip(items, probabilities)],
        "not_used": [{"path": readable(str(u.path)), "reason": u.reason} for u in unused],
    }
    write_json_atomic(out_dir / "evaluation.json", result)
    _plot(labels, probabilities, result, out_dir)
    return result


def _figure(value: float | None, interval: list[float] | None = None) -> str:
    """A figure for the table; n/a when its class has no images."""
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" ({interval[0]:.3f}-{interval[1]:.3f})" if interval else "")


def _count_in(folder: str | None, items: list[LabelledImage]) -> int | None:
    """How many of ``items`` lie in ``folder``, found where they are named or where their links lead;
    None without a folder."""
    if not folder:
        return None
    return sum(any(place.is_relative_to(folder) for place in
                   (Path(os.path.realpath(item.path.parent)), Path(item.path).resolve())) for item in items)


def format_table(result: dict) -> str:
    auc = "n/a (one class only)" if result["roc_auc"] is None else f"{result['roc_auc']:.4f}"
    lines = [f"{result['n_images']} images ({result['n_pneumonia']} pneumonia), ROC-AUC {auc}"]
    if result["n_with_training_patient_token"]:
        lines.append(f"warning: {result['n_with_training_patient_token']} of these images carry the patient "
                     "token (from the file name) of images the model was trained on: if they are the same "
                     "patients, these figures are optimistic")
    if result.get("n_in_threshold_folder"):
        lines.append(f"warning: {result['n_in_threshold_folder']} of these images are in the folder the model's "
                     "threshold was chosen on (calibrate --local): the figures at that threshold are optimistic")
    if result["not_used"]:
        lines.append(f"{len(result['not_used'])} files not used: "
                     f"{count_reasons(u['reason'] for u in result['not_used'])}")
    for key in ("at_model_threshold", "at_0.5"):
        m = result[key]
        (tn, fp), (fn, tp) = m["confusion_matrix"]
        sensitivity, specificity = (_figure(m[k], m[k + "_95ci"]) for k in ("sensitivity", "specificity"))
        lines.append(f"threshold {m['threshold']:.4f}: accuracy {m['accuracy']:.3f}  "
                     f"sensitivity {sensitivity}  specificity {specificity}  "
                     f"confusion [[TN {tn}, FP {fp}], [FN {fn}, TP {tp}]]")
        lines.append(f"  {'class':<10} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}")
        for name, row in m["classification_report"].items():
            lines.append(f"  {name:<10} {_figure(row['precision']):>9} {_figure(row['recall']):>7} "
                         f"{_figure(row['f1']):>6} {row['support']:>8d}")
    lines.append("sensitivity and specificity with their 95 % Wilson intervals")
    return "\n".join(lines)


def _plot(labels: np.ndarray, probabilities: np.ndarray, result: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = result["at_model_threshold"]
    if result["roc_auc"] is not None:  # a curve needs both classes
        fpr, tpr = roc_curve(labels, probabilities)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(fpr, tpr, label=f"AUC {result['roc_auc']:.3f}")
        ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
        ax.scatter([1 - m["specificity"]], [m["sensitivity"]], color="red", zorder=3,
                   label=f"threshold {m['threshold']:.3f}")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out_dir / "roc.png", dpi=90, bbox_inches="tight")
        plt.close(fig)
    else:  # nor may an earlier evaluation's curve stand beside this one's figures
        (out_dir / "roc.png").unlink(missing_ok=True)

    fig, ax = plt.subplots(figsize=(4, 3.6))
    matrix = np.array(m["confusion_matrix"])
    ax.imshow(matrix, cmap="Blues")
    for (r, c), v in np.ndenumerate(matrix):
        ax.text(c, r, str(v), ha="center", va="center",
                color="white" if v > matrix.max() / 2 else "black")
    ax.set_xticks([0, 1], CLASS_NAMES)
    ax.set_yticks([0, 1], CLASS_NAMES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"threshold {m['threshold']:.3f}")
    fig.tight_layout()
    fig.savefig(out_dir / "confusion.png", dpi=90, bbox_inches="tight")  # tight_layout alone cut the "true" label
    plt.close(fig)
