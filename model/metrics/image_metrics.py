"""Image-level detection metrics: AUROC, average precision, F1-max.

Image-level sets are small (one score per image), so these use scikit-learn's exact
implementations on the full arrays. Each returns ``nan`` instead of raising when the
labels hold a single class, because a category without defective (or without good)
images is a normal event in a per-category report, not a crash.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score


def _validated(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray] | None:
    """Flatten and check ``labels``/``scores``; ``None`` when only one class is present.

    Raises:
        ValueError: lengths differ, labels are not binary, or a score is not finite.
    """
    label_array = np.asarray(labels).reshape(-1)
    score_array = np.asarray(scores, dtype=np.float64).reshape(-1)
    if label_array.shape != score_array.shape:
        raise ValueError(f"labels and scores differ in length: {label_array.size} vs {score_array.size}")
    if not np.isin(label_array, (0, 1)).all():
        raise ValueError("labels must be 0/1 or booleans")
    if not np.isfinite(score_array).all():
        raise ValueError("scores must be finite (found NaN or inf)")
    label_array = label_array.astype(bool)
    if label_array.all() or not label_array.any():
        return None
    return label_array, score_array


def image_auroc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve.

    Args:
        labels: ``(N,)`` 0/1 or bool, 1 = anomalous.
        scores: ``(N,)`` higher = more anomalous.

    Returns:
        AUROC in [0, 1], or ``nan`` when only one class is present.
    """
    checked = _validated(labels, scores)
    return math.nan if checked is None else float(roc_auc_score(*checked))


def image_ap(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision (step-wise area under the precision-recall curve).

    Args:
        labels: ``(N,)`` 0/1 or bool, 1 = anomalous.
        scores: ``(N,)`` higher = more anomalous.

    Returns:
        AP in [0, 1], or ``nan`` when only one class is present.
    """
    checked = _validated(labels, scores)
    return math.nan if checked is None else float(average_precision_score(*checked))


def f1_max(labels: ArrayLike, scores: ArrayLike) -> float:
    """Best F1 over all thresholds (each distinct score is one threshold).

    Args:
        labels: ``(N,)`` 0/1 or bool, 1 = anomalous.
        scores: ``(N,)`` higher = more anomalous.

    Returns:
        max F1 in [0, 1], or ``nan`` when only one class is present.
    """
    checked = _validated(labels, scores)
    if checked is None:
        return math.nan
    precision, recall, _ = precision_recall_curve(*checked)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return float(f1.max())
