"""Per-product statistics of the inspection records, and the drift signal.

The database does the counting: scores are grouped into ``SCORE_BINS`` (1000) bins per UTC
day and decision, one ``GROUP BY`` on the ``(product, created_at)`` index, identical on SQLite
and PostgreSQL. Quantiles are read off those histograms (linear inside a bin: within 0.001 of
the exact sample quantile), so a month of a busy line costs a few thousand result rows, not
millions.

Drift: the calibration of a product (its good photos, scored at registration) gives a
reference, the median calibrated score ``calibration["score_quantiles"]["p50"]``. A window
(the last 24 h for the signal; each day in the daily table) drifts when it holds at least
``drift_min_samples`` good-decided parts and their median score is more than ``drift_limit``
away from the reference. Good-decided parts only: a rising defect rate is not drift, a shift
of what "good" looks like (lighting, camera, material) is.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.inspections import SCORE_BINS, VERDICT_DEFECT, VERDICT_GOOD, InspectionRecord, day_of, score_bin
from service.db.products import Product

R = InspectionRecord
QUANTILES = {"p05": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95}
HISTOGRAM_BINS = 40  # bins of the histogram the stats answer carries, over the range the scores span
DRIFT_WINDOW = timedelta(hours=24)


def quantile(counts: np.ndarray, q: float) -> float | None:
    """The ``q`` quantile of scores given as counts per bin of width ``1 / len(counts)``."""
    total = int(counts.sum())
    if total == 0:
        return None
    cumulative = np.cumsum(counts)
    rank = q * total
    index = int(np.searchsorted(cumulative, rank, side="left"))
    index = min(index, len(counts) - 1)
    while counts[index] == 0:  # rank 0 lands before the first filled bin
        index += 1
    before = cumulative[index - 1] if index > 0 else 0
    fraction = (rank - before) / counts[index]
    return float((index + min(max(fraction, 0.0), 1.0)) / len(counts))


def quantiles(counts: np.ndarray) -> dict[str, float | None]:
    return {name: quantile(counts, q) for name, q in QUANTILES.items()}


def histogram(good: np.ndarray, bad: np.ndarray, threshold: float | None) -> dict[str, Any]:
    """``HISTOGRAM_BINS`` bins over the scores' range (with the threshold, a 10 % margin, at
    least 0.04 wide), from the fine histograms: a line whose scores all sit near 0.3 gets a
    readable histogram instead of one bar on a 0-1 axis."""
    both = good + bad
    filled = np.nonzero(both)[0]
    if len(filled) == 0:
        lo, hi = 0, SCORE_BINS
    else:
        lo, hi = int(filled[0]), int(filled[-1]) + 1
        if threshold is not None:
            t = min(SCORE_BINS - 1, max(0, int(threshold * SCORE_BINS)))
            lo, hi = min(lo, t), max(hi, t + 1)
        pad = max(5, (hi - lo) // 10)
        lo, hi = max(0, lo - pad), min(SCORE_BINS, hi + pad)
        short = HISTOGRAM_BINS - (hi - lo)
        if short > 0:
            lo = max(0, lo - short // 2 - short % 2)
            hi = min(SCORE_BINS, lo + HISTOGRAM_BINS)
            lo = hi - HISTOGRAM_BINS
    edges = np.linspace(lo, hi, HISTOGRAM_BINS + 1).round().astype(int)
    return {
        "edges": (edges / SCORE_BINS).tolist(),
        "good": np.add.reduceat(good[lo:hi], edges[:-1] - lo).tolist(),
        "anomalous": np.add.reduceat(bad[lo:hi], edges[:-1] - lo).tolist(),
    }


def calibration_reference(product: Product | None) -> float | None:
    """The product's calibration median score, when it has been calibrated."""
    if product is None or not isinstance(product.calibration, dict):
        return None
    value = (product.calibration.get("score_quantiles") or {}).get("p50")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class DriftStatus:
    reference: float | None
    good_count: int
    good_median: float | None
    delta: float | None
    limit: float
    min_samples: int
    drifting: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference, "good_count": self.good_count, "good_median": self.good_median,
            "delta": self.delta, "limit": self.limit, "min_samples": self.min_samples, "drifting": self.drifting,
        }


def judge_drift(reference: float | None, good: np.ndarray, limit: float, min_samples: int) -> DriftStatus:
    count = int(good.sum())
    median = quantile(good, 0.5)
    delta = None if reference is None or median is None else median - reference
    drifting = delta is not None and count >= min_samples and abs(delta) > limit
    return DriftStatus(reference, count, median, delta, limit, min_samples, drifting)


def _bins(session: Session, *where: Any, by_day: bool) -> dict[tuple[str, bool], np.ndarray]:
    dialect = session.get_bind().dialect.name
    bin_col = score_bin(R.score, dialect).label("bin")
    cols = [R.is_anomalous, bin_col]
    if by_day:
        cols.insert(0, day_of(R.created_at, dialect).label("day"))
    stmt = select(*cols, func.count().label("n")).where(*where).group_by(*(c for c in cols))
    out: dict[tuple[str, bool], np.ndarray] = defaultdict(lambda: np.zeros(SCORE_BINS, dtype=np.int64))
    for row in session.execute(stmt):
        day = row.day if by_day else ""
        out[(day, bool(row.is_anomalous))][int(row.bin)] += int(row.n)
    return out


def drift_last_24h(session: Session, product: str, reference: float | None, now: datetime,
                   limit: float, min_samples: int) -> DriftStatus:
    bins = _bins(session, R.product == product, R.created_at >= now - DRIFT_WINDOW, R.is_anomalous.is_(False),
                 by_day=False)
    return judge_drift(reference, bins.get(("", False), np.zeros(SCORE_BINS, dtype=np.int64)), limit, min_samples)


def product_stats(session: Session, name: str, since: datetime, until: datetime, now: datetime,
                  limit: float, min_samples: int) -> dict[str, Any] | None:
    """The statistics answer of ``GET /products/{name}/stats`` (``None``: unknown product)."""
    product = session.scalar(select(Product).where(Product.name == name))
    in_window = (R.product == name, R.created_at >= since, R.created_at < until)
    if product is None and session.scalar(select(R.seq).where(R.product == name).limit(1)) is None:
        return None
    reference = calibration_reference(product)
    bins = _bins(session, *in_window, by_day=True)
    zeros = np.zeros(SCORE_BINS, dtype=np.int64)
    days = sorted({day for day, _ in bins})
    daily = []
    all_good, all_bad = zeros.copy(), zeros.copy()
    for day in days:
        good, bad = bins.get((day, False), zeros), bins.get((day, True), zeros)
        all_good += good
        all_bad += bad
        both = good + bad
        drift = judge_drift(reference, good, limit, min_samples)
        daily.append({
            "day": day, "count": int(both.sum()), "anomalous": int(bad.sum()), "good": int(good.sum()),
            "quantiles": quantiles(both), "good_median": drift.good_median, "drift": drift.delta,
            "drifting": drift.drifting,
        })
    total, anomalous = int((all_good + all_bad).sum()), int(all_bad.sum())

    stmt = (select(R.is_anomalous, R.review_verdict, func.count()).where(*in_window)
            .group_by(R.is_anomalous, R.review_verdict))
    outcome = {(bool(a), v): int(n) for a, v, n in session.execute(stmt)}
    reviews = {
        "reviewed": sum(n for (_, v), n in outcome.items() if v is not None),
        "confirmed_defects": outcome.get((True, VERDICT_DEFECT), 0),
        "false_alarms": outcome.get((True, VERDICT_GOOD), 0),
        "missed_defects": outcome.get((False, VERDICT_DEFECT), 0),
        "confirmed_good": outcome.get((False, VERDICT_GOOD), 0),
    }

    threshold = product.image_threshold if product is not None else None
    threshold_from = "product" if threshold is not None else None
    if threshold is None:
        threshold = session.scalar(select(R.threshold).where(R.product == name)
                                   .order_by(R.created_at.desc(), R.seq.desc()).limit(1))
        threshold_from = "latest_record" if threshold is not None else None
    return {
        "product": name,
        "registered": product is not None,
        "since": since,
        "until": until,
        "total": total,
        "anomalous": anomalous,
        "good": total - anomalous,
        "anomalous_rate": anomalous / total if total else None,
        "reviews": reviews,
        "threshold": threshold,
        "threshold_from": threshold_from,
        "quantiles": quantiles(all_good + all_bad),
        "histogram": histogram(all_good, all_bad, threshold),
        "daily": daily,
        "drift": {"window_hours": DRIFT_WINDOW.total_seconds() / 3600,
                  **drift_last_24h(session, name, reference, now, limit, min_samples).as_dict()},
    }


def calibrated_products(session: Session) -> list[tuple[str, float]]:
    """``(name, calibration median)`` of every product that has one (the drift monitor's list)."""
    out = []
    for product in session.scalars(select(Product).order_by(Product.name)):
        reference = calibration_reference(product)
        if reference is not None:
            out.append((product.name, reference))
    return out
