"""Evaluation metrics: image-level (exact) and pixel-level (streaming, bounded memory).

- :func:`image_level_metrics`: AUROC, AP, F1-max over one score per image.
- :class:`SegmentationMetrics`: pixel AUROC, AP, F1-max and AUPRO for one category,
  fed one anomaly map at a time, so a full MVTec AD run never holds all maps.

Degenerate inputs (a single class present) give ``nan``, never an exception.
"""

from __future__ import annotations

from numpy.typing import ArrayLike

from model.metrics.aupro import DEFAULT_FPR_LIMIT, DEFAULT_NUM_THRESHOLDS, AuproAccumulator
from model.metrics.image_metrics import f1_max, image_ap, image_auroc
from model.metrics.pixel_metrics import DEFAULT_NUM_BINS, PixelMetricAccumulator

__all__ = [
    "AuproAccumulator",
    "PixelMetricAccumulator",
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


class SegmentationMetrics:
    """Pixel AUROC / AP / F1-max and AUPRO for one category, one map at a time.

    Args:
        num_bins: score bins of the pixel histograms (see :class:`PixelMetricAccumulator`).
        num_thresholds: threshold grid of AUPRO (see :class:`AuproAccumulator`).
        fpr_limit: AUPRO integration limit.
    """

    def __init__(
        self,
        num_bins: int = DEFAULT_NUM_BINS,
        num_thresholds: int = DEFAULT_NUM_THRESHOLDS,
        fpr_limit: float = DEFAULT_FPR_LIMIT,
    ) -> None:
        self.pixel = PixelMetricAccumulator(num_bins)
        self.aupro = AuproAccumulator(num_thresholds, fpr_limit)

    def update(self, anomaly_map: ArrayLike, mask: ArrayLike) -> None:
        """Count one image ``(H, W)`` or a batch ``(B, H, W)``; scores in [0, 1], mask
        bool (or 0/1, 0/255). Good images count too (their pixels are all normal)."""
        self.pixel.update(anomaly_map, mask)
        self.aupro.update(anomaly_map, mask)

    def reset(self) -> None:
        """Forget every image counted so far."""
        self.pixel.reset()
        self.aupro.reset()

    def compute(self) -> dict[str, float]:
        """``pixel_auroc``, ``pixel_ap``, ``pixel_f1_max`` and ``aupro`` (``nan`` where
        the data has no anomalous or no normal pixel)."""
        return {**self.pixel.compute(), "aupro": self.aupro.compute()}
