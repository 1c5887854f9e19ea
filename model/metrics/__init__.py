"""Evaluation metrics: image-level and pixel-level, both exact.

- :func:`image_level_metrics`: AUROC, AP, F1-max over one score per image (scikit-learn).
- :class:`SegmentationMetrics`: pixel AUROC, AP, F1-max and AUPRO for one category, fed
  one anomaly map at a time; exact on the float32 scores whatever range they span (see
  :mod:`model.metrics.pixel_metrics` for the method and its memory).

Degenerate inputs (a single class present) give ``nan``, never an exception; callers say
why (:func:`model.evaluation.evaluate` reports it per category).
"""

from __future__ import annotations

from numpy.typing import ArrayLike

from model.metrics.image_metrics import f1_max, image_ap, image_auroc
from model.metrics.pixel_metrics import DEFAULT_FPR_LIMIT, SegmentationMetrics

__all__ = [
    "DEFAULT_FPR_LIMIT",
    "SegmentationMetrics",
    "f1_max",
    "image_ap",
    "image_auroc",
    "image_level_metrics",
]


def image_level_metrics(labels: ArrayLike, scores: ArrayLike) -> dict[str, float]:
    """Image-level AUROC, AP and F1-max.

    Args:
        labels: ``(N,)`` 0/1 or bool, 1 = anomalous.
        scores: ``(N,)`` image scores, higher = more anomalous.

    Returns:
        ``{"auroc", "ap", "f1_max"}``; each ``nan`` when only one class is present.
    """
    return {"auroc": image_auroc(labels, scores), "ap": image_ap(labels, scores), "f1_max": f1_max(labels, scores)}
