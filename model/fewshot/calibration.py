"""Thresholds from leave-one-out scores of good images, at a target false-reject rate.

Decisions are ``value >= threshold`` (as in the service). With ``n`` good images scored
leave-one-out and a target rate ``a``:

- **Quantile rule** (enough images: ``k = ceil((n + 1)(1 - a)) <= n``, i.e. ``n >= 1/a - 1``,
  99 images at 1 %): the threshold is the ``k``-th smallest value (the split-conformal
  quantile). For a new good image exchangeable with the calibration images,
  ``P(value >= threshold) = (n + 1 - k) / (n + 1)``, which lies in ``[a - 1/(n+1), a]``: that
  is the estimated rate reported. (This holds on average over calibration sets; the rate of
  one particular set scatters around it, less as ``n`` grows.)
- **Small-sample rule** (fewer images: the empirical quantile is only defined down to about
  ``1/(n+1)``): the threshold is the larger of the largest value and a one-sided normal
  *tolerance* bound on the logit values, ``mean + k * sd`` with
  ``k = nct.ppf(0.95, n - 1, z_{1-a} sqrt(n)) / sqrt(n)`` (noncentral t, the exact factor of
  the standard tables: n = 8 -> 4.354, n = 50 -> 2.862 at a = 1 %). For normal logit values
  it keeps the rate of *this* calibration set at or below ``a`` with 95 % confidence; a
  prediction bound (``t_{n-1}(1 - a) * sd * sqrt(1 + 1/n)``) would only do so on average.
  Why: a product is calibrated once, from one set of good photos, so the guarantee must hold
  for that set. Measured on synthetic textures (tiny random backbone, 5 textures x 3 good
  sets x n in 8/16/32/50, 300 held-out good images each): the prediction bound left the
  held-out image rate above 2a in 10 of 60 builds, the 95 % tolerance bound in 1 of 60
  (n = 8; pixel threshold: 1 of 60, n = 16) with a mean rate of 0.1-0.6 %; the largest value
  alone, in 28 of 60. The price is detection: 53 % of defects instead of 60 % at n = 50. The largest value
  is kept as a floor for strongly skewed samples. The estimated rate reported is the t
  predictive tail probability at the threshold (normal logit values assumed).

The logit keeps the bound inside (0, 1) and makes bounded values closer to normal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from scipy import stats

QUANTILE_KEYS: dict[str, float] = {"min": 0.0, "p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99, "max": 1.0}
QUANTILE_RULE = "quantile"
SMALL_SAMPLE_RULE = "small-sample"
TOLERANCE_CONFIDENCE = 0.95
# Scores are clipped to [EPS, 1 - EPS] before the logit; the logit sd is floored so identical
# scores still give a finite bound (just above their common value).
_EPS = 1e-6
_MIN_LOGIT_SD = 1e-3


@dataclass(frozen=True)
class CalibratedThreshold:
    """One threshold and how it was set.

    Attributes:
        threshold: decision threshold in [0, 1] (flag when ``value >= threshold``).
        estimated_false_reject_rate: expected share of new good images at or above it.
        rule: ``quantile`` or ``small-sample`` (see the module docstring).
        description: the rule with its numbers, for reports.
    """

    threshold: float
    estimated_false_reject_rate: float
    rule: str
    description: str


def conformal_rank(count: int, rate: float) -> int:
    """``k = ceil((n + 1)(1 - rate))``: the 1-based rank of the quantile rule's threshold."""
    # The small epsilon keeps e.g. (99 + 1) * 0.99 = 99.00000000000001 from rounding up to 100.
    return int(math.ceil((count + 1) * (1.0 - rate) - 1e-9))


def calibrate_threshold(values: Sequence[float] | np.ndarray, rate: float) -> CalibratedThreshold:
    """Threshold at false-reject rate ``rate`` from ``n >= 2`` leave-one-out values in [0, 1]."""
    scores = np.sort(np.asarray(values, dtype=np.float64).ravel())
    count = int(scores.size)
    if count < 2:
        raise ValueError(f"calibration needs at least 2 values, got {count}")
    if not 0.0 < rate < 1.0:
        raise ValueError(f"false-reject rate must lie in (0, 1), got {rate}")
    if not np.isfinite(scores).all():
        raise ValueError("calibration values must be finite")
    rank = conformal_rank(count, rate)
    if rank <= count:
        threshold = float(scores[rank - 1])
        estimate = (count + 1 - rank) / (count + 1)
        return CalibratedThreshold(
            threshold,
            estimate,
            QUANTILE_RULE,
            f"quantile: {rank}-th smallest of {count} leave-one-out values (k = ceil((n+1)(1-{rate:g}))); "
            f"estimated rate (n+1-k)/(n+1) = {estimate:.4f}, exact for exchangeable good images",
        )
    logits = _logit(scores)
    mean = float(logits.mean())
    spread = max(float(logits.std(ddof=1)), _MIN_LOGIT_SD)
    dof = count - 1
    factor = tolerance_factor(count, rate)
    bound = _sigmoid(mean + factor * spread)
    largest = float(scores[-1])
    threshold = max(bound, largest)
    predictive_scale = spread * math.sqrt(1.0 + 1.0 / count)
    estimate = float(stats.t.sf((float(_logit(np.asarray([threshold]))[0]) - mean) / predictive_scale, dof))
    winner = "the tolerance bound" if bound >= largest else "the largest value"
    return CalibratedThreshold(
        threshold,
        estimate,
        SMALL_SAMPLE_RULE,
        f"small-sample ({count} values, the {1 - rate:g} quantile needs {math.ceil(1.0 / rate - 1.0)}): "
        f"max(largest value {largest:.6f}, normal tolerance bound on logit values mean + {factor:.3f} sd "
        f"= {bound:.6f}, content {1 - rate:g}, confidence {TOLERANCE_CONFIDENCE:g}) = {winner}; "
        f"estimated rate = Student-t ({dof} dof) predictive tail probability at the threshold = {estimate:.4f}",
    )


def tolerance_factor(count: int, rate: float, confidence: float = TOLERANCE_CONFIDENCE) -> float:
    """One-sided normal tolerance factor ``k``: with probability ``confidence`` over the sample,
    ``mean + k * sd`` of ``count`` normal values exceeds the ``1 - rate`` quantile."""
    root = math.sqrt(count)
    return float(stats.nct.ppf(confidence, count - 1, float(stats.norm.ppf(1.0 - rate)) * root) / root)


def quantile_summary(values: Sequence[float] | np.ndarray) -> dict[str, float]:
    """``{"min", "p50", "p90", "p95", "p99", "max"}`` (linear interpolation) of the values."""
    array = np.asarray(values, dtype=np.float64).ravel()
    return {key: float(np.quantile(array, q)) for key, q in QUANTILE_KEYS.items()}


def _logit(values: np.ndarray) -> np.ndarray:
    clipped = np.clip(values, _EPS, 1.0 - _EPS)
    return np.log(clipped) - np.log1p(-clipped)


def _sigmoid(value: float) -> float:
    return 1.0 / (1.0 + math.exp(-value))


PIXEL_STATISTIC = (
    "per-image maximum of the fused anomaly map (at the model input size): a pixel threshold at "
    "the target rate of these maxima reports any defect region on at most that share of good parts"
)


@dataclass
class CalibrationReport:
    """What calibrating a product's reference produced (JSON-able through :meth:`as_dict`).

    Attributes:
        image_count: good images used.
        false_reject_rate_target: the configured target.
        image_threshold: decision threshold on the fused image score.
        pixel_threshold: threshold on the fused map for defect regions and masks.
        estimated_false_reject_rate: expected share of good images at or above the image
            threshold; ``estimate_method`` says how it was estimated.
        rule: ``quantile`` or ``small-sample`` (the rule that set both thresholds).
        score_quantiles: of the leave-one-out fused image scores (``p50`` serves drift checks).
        pixel_quantiles: of the per-image maxima of the leave-one-out fused maps.
        leave_one_out_scores: the fused image score of each good image (input order) against
            the bank without that image's patches.
        bank_patches_per_layer: patches kept per layer.
        bank_bytes: the bank tensors' size in bytes.
        fusion_weight: weight the thresholds were calibrated for.
        seconds: build time (vision passes, coreset, calibration).
        estimate_method: how ``estimated_false_reject_rate`` was obtained, with the numbers.
        pixel_estimated_false_reject_rate: the same estimate for the pixel threshold (share
            of good images on which some defect region would be reported).
        pixel_statistic: what the pixel threshold thresholds.
        leave_one_out_pixel_maxima: the per-image statistic behind ``pixel_quantiles``.
    """

    image_count: int
    false_reject_rate_target: float
    image_threshold: float
    pixel_threshold: float
    estimated_false_reject_rate: float
    rule: str
    score_quantiles: dict[str, float]
    pixel_quantiles: dict[str, float]
    leave_one_out_scores: list[float]
    bank_patches_per_layer: list[int]
    bank_bytes: int
    fusion_weight: float
    seconds: float
    estimate_method: str
    pixel_estimated_false_reject_rate: float
    pixel_statistic: str = PIXEL_STATISTIC
    leave_one_out_pixel_maxima: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationReport:
        """Inverse of :meth:`as_dict` (unknown keys are ignored, so older readers keep working)."""
        known = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})
