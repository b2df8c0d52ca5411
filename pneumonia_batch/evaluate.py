"""Evaluation metrics, threshold calibration and the evaluation report.

Metrics are computed with numpy so that they can be checked by hand; the
model is only needed to produce probabilities.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np

from .atomic import write_json_atomic
from .dataset import LabelledImage
from .model import CLASS_NAMES, metadata_path, read_model_info


def confusion_matrix(labels: np.ndarray, flagged: np.ndarray) -> np.ndarray:
    """2x2 counts, rows true class [NORMAL, PNEUMONIA], columns predicted."""
    labels = np.asarray(labels, int)
    flagged = np.asarray(flagged, int)
    matrix = np.zeros((2, 2), int)
    np.add.at(matrix, (labels, flagged), 1)
    return matrix


def metrics_at(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict:
    """Accuracy, sensitivity, specificity and a per-class report at one threshold."""
    matrix = confusion_matrix(labels, np.asarray(probabilities) >= threshold)
    (tn, fp), (fn, tp) = matrix
    report = {}
    for k, name in enumerate(CLASS_NAMES):
        predicted = matrix[:, k].sum()
        actual = matrix[k, :].sum()
        precision = matrix[k, k] / predicted if predicted else 0.0
        recall = matrix[k, k] / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        report[name] = {"precision": float(precision), "recall": float(recall),
                        "f1": float(f1), "support": int(actual)}
    total = matrix.sum()
    return {
        "threshold": float(threshold),
        "accuracy": float((tn + tp) / total) if total else 0.0,
        "sensitivity": float(tp / (tp + fn)) if tp + fn else 0.0,
        "specificity": float(tn / (tn + fp)) if tn + fp else 0.0,
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


def roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Area under the ROC curve (ties count half, as the Mann-Whitney statistic)."""
    labels = np.asarray(labels, int)
    if labels.min() == labels.max():
        return float("nan")
    fpr, tpr = roc_curve(labels, probabilities)
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # trapz before numpy 2
    return float(trapezoid(tpr, fpr))


def threshold_for_sensitivity(labels: np.ndarray, probabilities: np.ndarray,
                              target: float) -> float:
    """The highest threshold whose sensitivity (probability >= threshold) reaches ``target``."""
    positives = np.sort(np.asarray(probabilities)[np.asarray(labels) == 1])[::-1]
    if len(positives) == 0:
        raise ValueError("no pneumonia cases to calibrate on")
    needed = math.ceil(target * len(positives) - 1e-9)
    return float(positives[max(needed, 1) - 1])


def predict_items(model_path: Path, items: list[LabelledImage], input_scale: str,
                  batch_size: int = 32) -> np.ndarray:
    """Pneumonia probabilities for labelled image files, through the screening preprocessing."""
    from .inference import KerasRunner
    from .preprocess import model_input_from_file

    runner = KerasRunner(model_path, input_scale)
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = np.stack([model_input_from_file(str(i.path), "image")[0] for i in chunk])
        out.append(runner.predict(batch))
    return np.concatenate(out)


def calibrate_model(model_path: Path, val_items: list[LabelledImage], target_sensitivity: float = 0.97,
                    log=print) -> dict:
    """Choose the threshold on validation data and store it in the model's metadata."""
    model_path = Path(model_path)
    meta_file = metadata_path(model_path)
    meta = json.loads(meta_file.read_text())
    labels = np.array([i.label for i in val_items])
    probabilities = predict_items(model_path, val_items, meta["preprocessing"]["input_scale"])
    threshold = threshold_for_sensitivity(labels, probabilities, target_sensitivity)
    at_threshold = metrics_at(labels, probabilities, threshold)
    meta["threshold"] = {
        "value": threshold,
        "method": f"highest threshold reaching pneumonia sensitivity >= {target_sensitivity:g} "
                  f"on the {len(val_items)}-image patient-held-out validation split",
        "target_sensitivity": target_sensitivity,
        "chosen": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    meta["validation"] = {
        "n_images": len(val_items),
        "n_pneumonia": int(labels.sum()),
        "roc_auc": roc_auc(labels, probabilities),
        "at_threshold": at_threshold,
        "at_0.5": metrics_at(labels, probabilities, 0.5),
        "note": "the threshold and the checkpoint were chosen on this split, so these figures are "
                "optimistic; judge the model on data it never saw",
    }
    write_json_atomic(meta_file, meta)
    log(f"threshold {threshold:.4f}: validation sensitivity {at_threshold['sensitivity']:.3f}, "
        f"specificity {at_threshold['specificity']:.3f}, AUC {meta['validation']['roc_auc']:.4f}")
    return meta


def evaluate(model_path: Path, items: list[LabelledImage], out_dir: Path) -> dict:
    """Metrics at the model's threshold and at 0.5, as JSON plus ROC and confusion PNGs."""
    info = read_model_info(model_path)
    labels = np.array([i.label for i in items])
    probabilities = predict_items(model_path, items, info.input_scale)
    result = {
        "model": str(model_path),
        "model_sha256": info.sha256,
        "n_images": len(items),
        "n_pneumonia": int(labels.sum()),
        "roc_auc": roc_auc(labels, probabilities),
        "at_model_threshold": metrics_at(labels, probabilities, info.threshold),
        "at_0.5": metrics_at(labels, probabilities, 0.5),
        "images": [{"path": str(i.path), "label": CLASS_NAMES[i.label], "probability": float(p)}
                   for i, p in zip(items, probabilities)],
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "evaluation.json", result)
    _plot(labels, probabilities, result, out_dir)
    return result


def format_table(result: dict) -> str:
    lines = [f"{result['n_images']} images ({result['n_pneumonia']} pneumonia), "
             f"ROC-AUC {result['roc_auc']:.4f}"]
    for key in ("at_model_threshold", "at_0.5"):
        m = result[key]
        (tn, fp), (fn, tp) = m["confusion_matrix"]
        lines.append(f"threshold {m['threshold']:.4f}: accuracy {m['accuracy']:.3f}  "
                     f"sensitivity {m['sensitivity']:.3f}  specificity {m['specificity']:.3f}  "
                     f"confusion [[TN {tn}, FP {fp}], [FN {fn}, TP {tp}]]")
        lines.append(f"  {'class':<10} {'precision':>9} {'recall':>7} {'f1':>6} {'support':>8}")
        for name, row in m["classification_report"].items():
            lines.append(f"  {name:<10} {row['precision']:>9.3f} {row['recall']:>7.3f} "
                         f"{row['f1']:>6.3f} {row['support']:>8d}")
    return "\n".join(lines)


def _plot(labels: np.ndarray, probabilities: np.ndarray, result: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fpr, tpr = roc_curve(labels, probabilities)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"AUC {result['roc_auc']:.3f}")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    m = result["at_model_threshold"]
    ax.scatter([1 - m["specificity"]], [m["sensitivity"]], color="red", zorder=3,
               label=f"threshold {m['threshold']:.3f}")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "roc.png", dpi=90)
    plt.close(fig)

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
    fig.savefig(out_dir / "confusion.png", dpi=90)
    plt.close(fig)
