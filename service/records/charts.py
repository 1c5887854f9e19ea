"""Geometry of the review page's two charts, drawn as inline SVG by the templates (no JS).

* score histogram of a product (good-decided and anomalous parts stacked) with the threshold
  line;
* daily drift: the median score of good-decided parts per day against the calibration
  median, with the ``+- drift_limit`` band.

Coordinates are in a fixed viewBox (``WIDTH`` x ``HEIGHT``, plot area inside ``MARGIN``).
"""

from __future__ import annotations

from typing import Any

WIDTH, HEIGHT = 640, 220
MARGIN = {"left": 44, "right": 12, "top": 12, "bottom": 28}


def _plot_box() -> tuple[float, float, float, float]:
    x0, y0 = MARGIN["left"], MARGIN["top"]
    return x0, y0, WIDTH - MARGIN["right"] - x0, HEIGHT - MARGIN["bottom"] - y0


def histogram_chart(stats: dict[str, Any]) -> dict[str, Any]:
    """Bars (good below, anomalous stacked on top), axis ticks and the threshold line."""
    x0, y0, w, h = _plot_box()
    hist = stats["histogram"]
    edges, good, bad = hist["edges"], hist["good"], hist["anomalous"]
    lo, hi = edges[0], edges[-1]

    def x(v: float) -> float:
        return x0 + w * (v - lo) / (hi - lo)

    peak = max([g + b for g, b in zip(good, bad, strict=True)] + [1])
    bars = []
    for i, (g, b) in enumerate(zip(good, bad, strict=True)):
        left, width = x(edges[i]), max(0.5, x(edges[i + 1]) - x(edges[i]) - 1)
        gh, bh = h * g / peak, h * b / peak
        if g:
            bars.append({"x": left, "y": y0 + h - gh, "w": width, "h": gh, "cls": "good", "n": g,
                         "lo": edges[i], "hi": edges[i + 1]})
        if b:
            bars.append({"x": left, "y": y0 + h - gh - bh, "w": width, "h": bh, "cls": "anomalous", "n": b,
                         "lo": edges[i], "hi": edges[i + 1]})
    threshold = stats.get("threshold")
    ticks = [lo + (hi - lo) * t / 5 for t in range(6)]
    digits = 1 if hi - lo >= 0.5 else 2 if hi - lo >= 0.05 else 3
    return {
        "width": WIDTH, "height": HEIGHT, "x0": x0, "y0": y0, "w": w, "h": h, "bars": bars, "peak": peak,
        "xticks": [{"x": x(t), "label": f"{t:.{digits}f}", "anchor": "end" if i == len(ticks) - 1 else "middle"}
                   for i, t in enumerate(ticks)],
        "threshold_x": x(threshold) if threshold is not None and lo <= threshold <= hi else None,
        "threshold": threshold,
    }


def drift_chart(stats: dict[str, Any]) -> dict[str, Any]:
    """Daily good-part medians as a polyline (drifting days marked), reference and band."""
    x0, y0, w, h = _plot_box()
    daily = [d for d in stats["daily"] if d["good_median"] is not None]
    reference, limit = stats["drift"]["reference"], stats["drift"]["limit"]
    values = [d["good_median"] for d in daily] + ([reference - limit, reference + limit] if reference is not None else [])
    lo = max(0.0, min(values) - 0.05) if values else 0.0
    hi = min(1.0, max(values) + 0.05) if values else 1.0
    if hi - lo < 0.1:
        mid = (hi + lo) / 2
        lo, hi = max(0.0, mid - 0.05), min(1.0, mid + 0.05)

    def y(v: float) -> float:
        return y0 + h - h * (v - lo) / (hi - lo)

    step = w / max(1, len(daily) - 1) if len(daily) > 1 else 0.0
    points = [{"x": x0 + (i * step if len(daily) > 1 else w / 2), "y": y(d["good_median"]), "day": d["day"],
               "value": d["good_median"], "drifting": d["drifting"], "n": d["good"]} for i, d in enumerate(daily)]
    chart: dict[str, Any] = {
        "width": WIDTH, "height": HEIGHT, "x0": x0, "y0": y0, "w": w, "h": h, "points": points,
        "polyline": " ".join(f"{p['x']:.1f},{p['y']:.1f}" for p in points),
        "yticks": [{"y": y(lo + (hi - lo) * t / 4), "label": f"{lo + (hi - lo) * t / 4:.2f}"} for t in range(5)],
        "reference": reference, "limit": limit,
    }
    if reference is not None:
        top, bottom = y(min(hi, reference + limit)), y(max(lo, reference - limit))
        chart.update(ref_y=y(reference), band_y=top, band_h=max(0.0, bottom - top))
    return chart
