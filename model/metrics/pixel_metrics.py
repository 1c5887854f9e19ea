"""Exact pixel-level metrics for one category: AUROC, AP, F1-max and AUPRO.

Why exact: a fixed histogram over [0, 1] is not invariant under a monotone rescaling of
the maps. A category whose maps span 1e-4 falls into a handful of bins, its pixels count
as tied, and AUPRO moved from 0.941 (exact) to 0.895. Every metric here depends on the
*order* of the scores only, so it is computed on the order itself.

How: each pixel becomes one ``uint64`` key. The high 32 bits are the float32 score mapped
to an unsigned integer with the same order (:func:`ordered_score_keys`); the low 32 bits
are the id of the ground-truth region the pixel belongs to (0 for normal pixels; regions
are the 8-connected components of each mask, as MVTec AD's official evaluation, numbered
across the category's images). Sorting the keys in place orders the pixels by score.
Each distinct score is one threshold (ties stay ties, as in scikit-learn); a sweep over
the sorted keys, in chunks, yields per threshold the true positives, false positives and
the summed region overlap, and accumulates

- AUROC: trapezoidal area under the ROC curve (``sklearn.metrics.roc_auc_score``),
- AP: ``sum (R_n - R_{n-1}) P_n`` (``sklearn.metrics.average_precision_score``),
- F1-max over the thresholds,
- AUPRO: PRO (mean over regions of the fraction of each region at or above the threshold)
  integrated over FPR from 0 to ``fpr_limit`` with the trapezoidal rule, the curve
  interpolated linearly at ``fpr_limit``, divided by ``fpr_limit`` (Bergmann et al.).

Precision: scores are compared as float32, the detectors' precision (float64 maps are
rounded to float32 first); within that, the results are exact up to float64 summation.

Memory: 8 bytes per pixel of the category while it is counted (one 200-image category at
518 px is 54 M pixels, 430 MB), plus ``O(chunk)`` during :meth:`SegmentationMetrics.compute`
(the sort is in place and the sweep never makes a per-pixel float64 array). An evaluation
computes a category as soon as its last image is counted and drops it, so the peak is set
by the largest category, not by the data set (``bench/bench_pixel_metrics.py`` measures it).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

DEFAULT_FPR_LIMIT = 0.3
SWEEP_CHUNK = 1 << 22  # pixels per sweep step: ~100 MB of temporaries at most
# 8-connectivity, as MVTec AD's official evaluation: diagonal neighbours are one defect.
_REGION_STRUCTURE = np.ones((3, 3), dtype=bool)
_SIGN_BIT = np.uint32(0x80000000)
# Column of the low (region id) and high (score) 32-bit word in a uint64 viewed as 2 x uint32.
_LOW, _HIGH = (0, 1) if sys.byteorder == "little" else (1, 0)


def as_bool_mask(mask: ArrayLike) -> np.ndarray:
    """Ground truth as booleans: bool kept, integers ``> 0`` (0/1 or 0/255 masks), floats
    ``>= 0.5`` (masks resized with interpolation)."""
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return mask
    if np.issubdtype(mask.dtype, np.integer):
        return mask > 0
    return mask >= 0.5


def validate_map_and_mask(anomaly_map: ArrayLike, mask: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Check a map/mask pair and return ``(scores, positives)`` with the same shape.

    Returns:
        ``scores`` as float32 and ``positives`` as bool.

    Raises:
        ValueError: shapes differ or a score is NaN or infinite.
    """
    scores = np.asarray(anomaly_map)
    if scores.dtype != np.float32:
        with np.errstate(over="ignore"):  # values beyond float32 become inf, refused below
            scores = scores.astype(np.float32)
    positives = as_bool_mask(mask)
    if scores.shape != positives.shape:
        raise ValueError(f"anomaly map shape {scores.shape} differs from mask shape {positives.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("anomaly map holds NaN or infinite scores (or values beyond float32)")
    return scores, positives


def ordered_score_keys(scores: np.ndarray) -> np.ndarray:
    """float32 scores -> uint32 keys with the same order (``a < b`` iff ``key(a) < key(b)``).

    The usual trick: flip the sign bit of non-negative floats and every bit of negative
    ones. ``-0.0`` is turned into ``+0.0`` first so that equal scores get equal keys.
    """
    values = np.ascontiguousarray(scores, dtype=np.float32) + np.float32(0.0)  # -0.0 + 0.0 = +0.0
    bits = values.view(np.uint32)
    return np.where(bits & _SIGN_BIT, ~bits, bits | _SIGN_BIT).astype(np.uint32, copy=False)


@dataclass
class _Sweep:
    """Running sums of the curve metrics over consecutive curve points.

    Points are (TP, FP, overlap) at one threshold; a segment joins a point to the next
    point of a *higher* threshold. Every metric is a sum over segments (plus a max), so the
    points can be fed in chunks, in ascending score order.
    """

    positives: int
    negatives: int
    regions: int
    fpr_limit: float
    roc_area: float = 0.0  # in units of positives x negatives
    ap_sum: float = 0.0  # in units of positives
    f1_max: float = 0.0
    pro_area: float = 0.0

    def add_segments(self, low: np.ndarray, high: np.ndarray) -> None:
        """Segments from points ``low`` (lower threshold) to ``high``; each ``(3, K)`` float64
        rows TP, FP, overlap."""
        tp, fp, overlap = low
        tp_high, fp_high, overlap_high = high
        self.roc_area += float(np.dot(fp - fp_high, tp + tp_high)) / 2.0
        self.ap_sum += float(np.dot(tp - tp_high, tp / (tp + fp)))
        if self.regions == 0 or self.negatives == 0:
            return
        x0, x1 = fp_high / self.negatives, fp / self.negatives
        y0, y1 = np.minimum(overlap_high / self.regions, 1.0), np.minimum(overlap / self.regions, 1.0)
        inside = x0 < self.fpr_limit
        if not inside.any():
            return
        x0, x1, y0, y1 = x0[inside], x1[inside], y0[inside], y1[inside]
        crossing = x1 > self.fpr_limit
        if crossing.any():  # the one segment that crosses the limit: interpolate at the limit
            y1 = np.where(crossing, y0 + (y1 - y0) * (self.fpr_limit - x0) / np.where(crossing, x1 - x0, 1.0), y1)
            x1 = np.where(crossing, self.fpr_limit, x1)
        self.pro_area += float(np.dot(x1 - x0, y0 + y1)) / 2.0

    def add_points(self, points: np.ndarray) -> None:
        tp, fp, _ = points
        if self.positives:
            self.f1_max = max(self.f1_max, float(np.max(2.0 * tp / (self.positives + tp + fp))))

    def result(self) -> dict[str, float]:
        nan = math.nan
        defined = self.positives > 0 and self.negatives > 0
        return {
            "pixel_auroc": self.roc_area / (self.positives * self.negatives) if defined else nan,
            "pixel_ap": self.ap_sum / self.positives if defined else nan,
            "pixel_f1_max": self.f1_max if defined else nan,
            "aupro": self.pro_area / self.fpr_limit if self.regions and self.negatives else nan,
        }


class SegmentationMetrics:
    """Exact pixel AUROC / AP / F1-max and AUPRO for one category, fed one map at a time.

    See the module docstring for the method and the memory it takes.

    Args:
        fpr_limit: AUPRO integration limit, in (0, 1].
        expected_pixels: pixels the category will hold (images x map side²); sizes the
            buffer once instead of growing it (growing can briefly need 1.5x).

    Example:
        >>> metrics = SegmentationMetrics()
        >>> metrics.update(np.array([[0.9, 0.1]]), np.array([[True, False]]))
        >>> metrics.compute()["pixel_auroc"]
        1.0
    """

    def __init__(self, fpr_limit: float = DEFAULT_FPR_LIMIT, expected_pixels: int | None = None) -> None:
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        self.fpr_limit = fpr_limit
        self._expected = int(expected_pixels or 0)
        self.reset()

    # ------------------------------------------------------------------ counting
    def reset(self) -> None:
        """Forget every image counted so far (and free the buffer)."""
        self._keys = np.empty(0, np.uint64)
        self._size = 0
        self._region_sizes: list[np.ndarray] = []
        self.num_regions = 0
        self.anomalous_pixels = 0

    @property
    def pixels(self) -> int:
        """Pixels counted so far."""
        return self._size

    @property
    def nbytes(self) -> int:
        """Bytes held by the pixel buffer."""
        return int(self._keys.nbytes)

    def update(self, anomaly_map: ArrayLike, mask: ArrayLike) -> None:
        """Count one image ``(H, W)`` or a batch ``(B, H, W)``.

        Args:
            anomaly_map: scores, any real range (higher = more anomalous).
            mask: ground truth of the same shape; bool, 0/1 or 0/255 integers, or floats
                (``>= 0.5`` anomalous). Good images count too (all normal). Regions are
                found per image, never across a batch.

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
        keys = ordered_score_keys(scores).astype(np.uint64) << np.uint64(32)
        if positives.any():
            regions, count = ndimage.label(positives, structure=_REGION_STRUCTURE)
            if self.num_regions + count >= 2**32:
                raise ValueError("more than 2**32 ground-truth regions in one category")
            self._region_sizes.append(np.bincount(regions.ravel())[1:])
            keys[positives] |= (regions[positives] + self.num_regions).astype(np.uint64)
            self.num_regions += count
            self.anomalous_pixels += int(np.count_nonzero(positives))
        self._append(keys.ravel())

    def _append(self, keys: np.ndarray) -> None:
        needed = self._size + keys.size
        if needed > self._keys.size:
            capacity = max(needed, self._expected, int(self._keys.size * 1.5))
            grown = np.empty(capacity, np.uint64)
            grown[: self._size] = self._keys[: self._size]
            self._keys = grown
        self._keys[self._size : needed] = keys
        self._size = needed

    # ------------------------------------------------------------------ metrics
    def compute(self) -> dict[str, float]:
        """``pixel_auroc``, ``pixel_ap``, ``pixel_f1_max`` and ``aupro``; the first three
        are ``nan`` without anomalous or without normal pixels, AUPRO without a region or
        without a normal pixel. Counting may continue afterwards."""
        total = self._size
        positives = self.anomalous_pixels
        sweep = _Sweep(positives, total - positives, self.num_regions, self.fpr_limit)
        if total == 0:
            return sweep.result()
        keys = self._keys[:total]
        keys.sort()  # in place: ascending score, ties ordered by region id (irrelevant)
        words = keys.view(np.uint32).reshape(total, 2)
        inverse_sizes = (
            1.0 / np.concatenate(self._region_sizes).astype(np.float64) if self._region_sizes else np.empty(0)
        )
        positives_below, weight_below_chunk = 0, 0.0
        previous: np.ndarray | None = None  # highest-score point of the previous chunk
        for start in range(0, total, SWEEP_CHUNK):
            stop = min(start + SWEEP_CHUNK, total)
            scores, region_ids = words[start:stop, _HIGH], words[start:stop, _LOW]
            is_group_start = np.empty(stop - start, bool)
            is_group_start[0] = start == 0 or scores[0] != words[start - 1, _HIGH]
            np.not_equal(scores[1:], scores[:-1], out=is_group_start[1:])
            is_positive = region_ids != 0
            weights = np.zeros(stop - start, np.float64)
            weights[is_positive] = inverse_sizes[region_ids[is_positive].astype(np.int64) - 1]
            # Exclusive prefix sums: the positives and region weight below each group.
            count_below = positives_below + np.cumsum(is_positive, dtype=np.int64) - is_positive
            weight_below = weight_below_chunk + np.cumsum(weights) - weights
            starts = np.flatnonzero(is_group_start)
            true_positive = (positives - count_below[starts]).astype(np.float64)
            false_positive = (total - start - starts) - true_positive
            overlap = self.num_regions - weight_below[starts]
            points = np.stack([true_positive, false_positive, overlap])  # (3, K), ascending score
            if points.shape[1]:
                sweep.add_points(points)
                chain = points if previous is None else np.concatenate([previous, points], axis=1)
                if chain.shape[1] > 1:  # point i (lower threshold) to point i + 1
                    sweep.add_segments(chain[:, :-1], chain[:, 1:])
                previous = points[:, -1:]
            positives_below += int(np.count_nonzero(is_positive))
            weight_below_chunk += float(weights.sum())
        if previous is not None:  # the top segment: highest threshold to the origin
            sweep.add_segments(previous, np.zeros((3, 1)))
        return sweep.result()
