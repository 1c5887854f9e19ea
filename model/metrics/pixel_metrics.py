"""Streaming pixel-level metrics: AUROC, average precision and F1-max in bounded memory.

MVTec AD's test set at 518 px is about 460 M pixels; keeping every score to call
scikit-learn would need gigabytes. Instead each image's scores are quantised into
``num_bins`` equal bins over [0, 1] and counted in two histograms (anomalous pixels,
normal pixels). Every metric here is a function of the counts above each threshold, so
the histograms are all that is kept: memory is ``O(num_bins)`` whatever the number of
images, and an image can be dropped as soon as it is counted.

Exactness: the result is exactly scikit-learn's for the scores rounded down to the bin
grid. Scores that are already tied are treated as tied, as scikit-learn does; distinct
scores closer than ``1 / num_bins`` (about 1e-6 at the default ``2**20`` bins) may fall
into one bin and then count as tied. That moves AUROC by at most half the fraction of
(anomalous, normal) pixel pairs sharing a bin, and by nothing on average when the order
inside a bin is unrelated to the label. AP is not linear in the ordering, so it can move
more when many pixels of both classes crowd into the same bins (about 6e-3 in the test
with 50 groups of 400 pixels tied to 1e-9). Smooth float32 maps stay well within 1e-3 of
scikit-learn on all three metrics (the tests and ``bench/bench_pixel_metrics.py
--check-exact`` check it: at most about 1e-6 apart on 40 M pixels).

Input range: scores outside [0, 1] are clipped into it (so a map in [0, 1.3] loses the
ordering above 1); non-finite scores raise. The detectors' maps are probabilities, so
this is the natural range; rescale other scores before updating.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

DEFAULT_NUM_BINS = 2**20


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
        ``scores`` as a floating array (float32 kept, others become float64) and
        ``positives`` as bool.

    Raises:
        ValueError: shapes differ or a score is NaN or infinite.
    """
    scores = np.asarray(anomaly_map)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    positives = as_bool_mask(mask)
    if scores.shape != positives.shape:
        raise ValueError(f"anomaly map shape {scores.shape} differs from mask shape {positives.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("anomaly map holds NaN or infinite scores")
    return scores, positives


def quantize_scores(scores: np.ndarray, num_bins: int) -> np.ndarray:
    """Bin index of each score: bin ``k`` holds ``[k / num_bins, (k + 1) / num_bins)``,
    with 1.0 in the last bin and scores outside [0, 1] clipped first.

    Args:
        scores: floating array, any shape.
        num_bins: number of bins over [0, 1].

    Returns:
        intp array, same shape, values in ``[0, num_bins)``.
    """
    scaled = np.clip(scores, 0.0, 1.0)
    scaled *= scores.dtype.type(num_bins)  # exact for power-of-two num_bins
    codes = scaled.astype(np.intp)  # truncation == floor for non-negative values
    np.minimum(codes, num_bins - 1, out=codes)
    return codes


def binned_curve_metrics(positive_counts: np.ndarray, negative_counts: np.ndarray) -> dict[str, float]:
    """AUROC, AP and F1-max from per-bin counts.

    Each non-empty bin is one threshold ("score >= bin"), swept from the top bin down,
    which is scikit-learn's curve for the binned scores.

    Args:
        positive_counts: ``(num_bins,)`` anomalous-pixel count per bin, ascending scores.
        negative_counts: ``(num_bins,)`` normal-pixel count per bin.

    Returns:
        ``auroc`` (trapezoidal area under the ROC curve), ``ap`` (step-wise
        ``sum (R_n - R_{n-1}) P_n``, as ``sklearn.metrics.average_precision_score``) and
        ``f1_max``; all ``nan`` when either class has no pixel.
    """
    total_positive = float(positive_counts.sum())
    total_negative = float(negative_counts.sum())
    if total_positive == 0 or total_negative == 0:
        return {"auroc": math.nan, "ap": math.nan, "f1_max": math.nan}
    occupied = (positive_counts + negative_counts) > 0
    # Descending thresholds; empty bins add no curve point, so drop them.
    true_positives = np.cumsum(positive_counts[::-1], dtype=np.float64)[occupied[::-1]]
    false_positives = np.cumsum(negative_counts[::-1], dtype=np.float64)[occupied[::-1]]

    tpr = np.concatenate(([0.0], true_positives / total_positive))
    fpr = np.concatenate(([0.0], false_positives / total_negative))
    auroc = float(np.trapezoid(tpr, fpr))

    precision = true_positives / (true_positives + false_positives)  # never 0/0: bins are occupied
    recall_steps = np.diff(tpr)
    ap = float(np.sum(recall_steps * precision))

    f1 = 2 * true_positives / (total_positive + true_positives + false_positives)
    return {"auroc": auroc, "ap": ap, "f1_max": float(f1.max())}


class PixelMetricAccumulator:
    """Streaming pixel AUROC / AP / F1-max over any number of images.

    Memory: two ``int64`` histograms of ``num_bins`` (16 MiB at the default ``2**20``)
    plus an ``int32`` staging buffer of ``buffer_size`` bin codes (16 MiB by default).
    Codes are staged and counted in one ``np.bincount`` per full buffer, because a
    ``bincount`` with a million-bin ``minlength`` per image would cost more than the
    counting itself.

    Args:
        num_bins: score resolution over [0, 1]; see the module docstring for accuracy.
        buffer_size: staged codes before a histogram update.

    Example:
        >>> accumulator = PixelMetricAccumulator()
        >>> accumulator.update(np.array([[0.9, 0.1]]), np.array([[True, False]]))
        >>> accumulator.compute()["pixel_auroc"]
        1.0
    """

    def __init__(self, num_bins: int = DEFAULT_NUM_BINS, buffer_size: int = 2**22) -> None:
        if num_bins < 2:
            raise ValueError(f"num_bins must be at least 2, got {num_bins}")
        if num_bins > np.iinfo(np.int32).max // 2:
            raise ValueError(f"num_bins too large for int32 codes: {num_bins}")
        self.num_bins = num_bins
        self.buffer_size = buffer_size
        # counts[:num_bins] are normal pixels, counts[num_bins:] anomalous pixels.
        self._counts = np.zeros(2 * num_bins, np.int64)
        self._buffer = np.empty(0, np.int32)  # allocated on first use
        self._staged = 0

    def reset(self) -> None:
        """Forget every pixel counted so far."""
        self._counts[:] = 0
        self._staged = 0

    def update(self, anomaly_map: ArrayLike, mask: ArrayLike) -> None:
        """Count one image (or a batch).

        Args:
            anomaly_map: scores, ``(H, W)`` or ``(B, H, W)``, expected in [0, 1]
                (clipped otherwise).
            mask: ground truth of the same shape; bool, 0/1 or 0/255 integers, or floats
                (``>= 0.5`` anomalous).

        Raises:
            ValueError: shapes differ or a score is not finite.
        """
        scores, positives = validate_map_and_mask(anomaly_map, mask)
        codes = quantize_scores(scores, self.num_bins).ravel()
        # One code space for both classes: anomalous pixels are offset by num_bins, so a
        # single bincount fills both histograms.
        np.add(codes, self.num_bins, out=codes, where=positives.ravel())
        self._stage(codes)

    def _stage(self, codes: np.ndarray) -> None:
        if codes.size > self.buffer_size:
            self.flush()
            self._counts += np.bincount(codes, minlength=2 * self.num_bins)
            return
        if self._buffer.size == 0:
            self._buffer = np.empty(self.buffer_size, np.int32)
        if self._staged + codes.size > self.buffer_size:
            self.flush()
        self._buffer[self._staged:self._staged + codes.size] = codes
        self._staged += codes.size

    def flush(self) -> None:
        """Move staged codes into the histograms (done automatically; cheap to call)."""
        if self._staged:
            self._counts += np.bincount(self._buffer[:self._staged], minlength=2 * self.num_bins)
            self._staged = 0

    @property
    def negative_counts(self) -> np.ndarray:
        """``(num_bins,)`` normal-pixel count per score bin (ascending scores)."""
        self.flush()
        return self._counts[:self.num_bins]

    @property
    def positive_counts(self) -> np.ndarray:
        """``(num_bins,)`` anomalous-pixel count per score bin (ascending scores)."""
        self.flush()
        return self._counts[self.num_bins:]

    def compute(self) -> dict[str, float]:
        """The metrics over every pixel counted so far.

        Returns:
            ``pixel_auroc``, ``pixel_ap``, ``pixel_f1_max``; each ``nan`` when no
            anomalous or no normal pixel has been seen.
        """
        metrics = binned_curve_metrics(self.positive_counts, self.negative_counts)
        return {f"pixel_{name}": value for name, value in metrics.items()}
