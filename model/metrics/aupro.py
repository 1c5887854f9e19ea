"""Streaming AUPRO: area under the per-region-overlap curve up to a false-positive limit.

Definition (Bergmann et al., MVTec AD, as in its official evaluation code): each connected
component of the ground truth (8-connectivity) is one region. For a threshold ``t``,

- ``PRO(t)`` = mean over *all* regions of all images of the fraction of the region's
  pixels with score ``>= t``, so a small defect weighs as much as a large one;
- ``FPR(t)`` = normal pixels with score ``>= t`` / all normal pixels (of all images, good
  images included).

AUPRO integrates PRO over FPR from 0 to ``fpr_limit`` (0.3) with the trapezoidal rule,
interpolating the curve linearly at exactly ``fpr_limit``, and divides by ``fpr_limit`` so
a perfect map scores 1.

Streaming: thresholds form a fixed grid of ``num_thresholds`` equal bins over [0, 1]
(scores outside are clipped; non-finite scores raise). For one image, a region pixel in
bin ``k`` adds ``1 / |region|`` to bin ``k`` of an overlap histogram, and a normal pixel
adds 1 to a false-positive histogram. A reverse cumulative sum of the overlap histogram is
then the sum over regions of their overlap at every threshold, and of the other one
``FP(t)``. So the state is two ``num_thresholds`` histograms and a region count, and each
image is labelled, counted and dropped: memory ``O(num_thresholds)`` plus one image.

The result is the exact AUPRO of the scores rounded down to the grid; at the default
``2**16`` thresholds it stays within about 1e-4 of the exact all-distinct-scores value on
continuous maps.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

from model.metrics.pixel_metrics import quantize_scores, validate_map_and_mask

DEFAULT_NUM_THRESHOLDS = 2**16
DEFAULT_FPR_LIMIT = 0.3
# 8-connectivity, as MVTec AD's official evaluation: diagonal neighbours are one defect.
_REGION_STRUCTURE = np.ones((3, 3), dtype=bool)


def integrate_to_limit(x: np.ndarray, y: np.ndarray, x_limit: float) -> float:
    """Trapezoidal area under the piecewise-linear curve ``(x, y)`` for ``x`` in
    ``[x[0], x_limit]``, interpolating ``y`` at ``x_limit``.

    Args:
        x: ``(P,)`` non-decreasing abscissae (repeated values give vertical steps).
        y: ``(P,)`` ordinates.
        x_limit: upper integration bound; the curve is not extended past ``x[-1]``.

    Returns:
        The area (not normalised).
    """
    end = int(np.searchsorted(x, x_limit, side="right"))  # x[:end] <= x_limit < x[end:]
    if end == 0:
        return 0.0
    xs, ys = x[:end], y[:end]
    if end < x.size and xs[-1] < x_limit:
        x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
        y_at_limit = y0 + (y1 - y0) * (x_limit - x0) / (x1 - x0)
        xs, ys = np.append(xs, x_limit), np.append(ys, y_at_limit)
    return float(np.trapezoid(ys, xs))


class AuproAccumulator:
    """Streaming AUPRO over any number of images (see the module docstring).

    Args:
        num_thresholds: threshold grid size over [0, 1].
        fpr_limit: upper FPR bound of the integral, in (0, 1].

    Example:
        >>> accumulator = AuproAccumulator()
        >>> accumulator.update(np.array([[0.9, 0.1]]), np.array([[True, False]]))
        >>> accumulator.compute()
        1.0
    """

    def __init__(self, num_thresholds: int = DEFAULT_NUM_THRESHOLDS, fpr_limit: float = DEFAULT_FPR_LIMIT) -> None:
        if num_thresholds < 2:
            raise ValueError(f"num_thresholds must be at least 2, got {num_thresholds}")
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        self.num_thresholds = num_thresholds
        self.fpr_limit = fpr_limit
        self._overlap = np.zeros(num_thresholds, np.float64)  # sum of 1/|region| per bin
        self._negatives = np.zeros(num_thresholds, np.int64)  # normal pixels per bin
        self.num_regions = 0

    def reset(self) -> None:
        """Forget every image counted so far."""
        self._overlap[:] = 0.0
        self._negatives[:] = 0
        self.num_regions = 0

    def update(self, anomaly_map: ArrayLike, mask: ArrayLike) -> None:
        """Count one image, or a batch of images.

        Args:
            anomaly_map: scores ``(H, W)`` or ``(B, H, W)``, expected in [0, 1].
            mask: ground truth of the same shape (bool, 0/1 or 0/255, or floats ``>= 0.5``).
                Regions are found per image, never across a batch.

        Raises:
            ValueError: shapes differ, a score is not finite, or the map is not 2-D/3-D.
        """
        scores, positives = validate_map_and_mask(anomaly_map, mask)
        if scores.ndim == 2:
            self._update_image(scores, positives)
        elif scores.ndim == 3:
            for image_scores, image_positives in zip(scores, positives, strict=True):
                self._update_image(image_scores, image_positives)
        else:
            raise ValueError(f"expected an (H, W) or (B, H, W) map, got shape {scores.shape}")

    def _update_image(self, scores: np.ndarray, positives: np.ndarray) -> None:
        codes = quantize_scores(scores, self.num_thresholds)
        self._negatives += np.bincount(codes.ravel(), minlength=self.num_thresholds)
        if not positives.any():
            return
        regions, region_count = ndimage.label(positives, structure=_REGION_STRUCTURE)
        positive_codes = codes[positives]
        positive_regions = regions[positives]
        region_sizes = np.bincount(positive_regions)  # index 0 (background) stays unused
        # Counting all pixels then removing anomalous ones avoids indexing the (large)
        # normal part of the image.
        self._negatives -= np.bincount(positive_codes, minlength=self.num_thresholds)
        self._overlap += np.bincount(
            positive_codes, weights=1.0 / region_sizes[positive_regions], minlength=self.num_thresholds
        )
        self.num_regions += region_count

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """The PRO-vs-FPR curve on the threshold grid, from the strictest threshold down.

        Returns:
            ``(fpr, pro)``, each ``(num_thresholds + 1,)`` and non-decreasing, starting
            at ``(0, 0)`` (a threshold above every score).

        Raises:
            ValueError: no region or no normal pixel has been counted.
        """
        total_negative = int(self._negatives.sum())
        if self.num_regions == 0 or total_negative == 0:
            raise ValueError("AUPRO needs at least one anomalous region and one normal pixel")
        false_positives = np.cumsum(self._negatives[::-1], dtype=np.float64)
        overlap_sums = np.cumsum(self._overlap[::-1])
        fpr = np.concatenate(([0.0], false_positives / total_negative))
        pro = np.concatenate(([0.0], overlap_sums / self.num_regions))
        # Float summation can leave the last PRO a hair above 1; keep the curve in [0, 1].
        return fpr, np.minimum(pro, 1.0)

    def compute(self) -> float:
        """AUPRO up to ``fpr_limit``, normalised to [0, 1]; ``nan`` when no anomalous
        region or no normal pixel has been counted."""
        if self.num_regions == 0 or not self._negatives.any():
            return math.nan
        fpr, pro = self.curve()
        return integrate_to_limit(fpr, pro, self.fpr_limit) / self.fpr_limit
