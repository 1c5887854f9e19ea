"""Rows of the ``inspections`` table for tests (the shape the recorder writes)."""

from __future__ import annotations

import uuid
from datetime import datetime


def make_row(created_at: datetime, score: float = 0.3, *, product: str | None = "bottle", threshold: float = 0.5,
             station: str | None = "s1", part_id: str | None = None, **extra) -> dict:
    row = {
        "id": uuid.uuid4().hex, "created_at": created_at, "product": product, "product_version": 1, "reference_version": None, "pixel_threshold": None,
        "class_name": product, "class_label": product or "object", "score": score, "threshold": threshold,
        "threshold_source": "product", "is_anomalous": score >= threshold, "defects": None,
        "component_scores": None, "detector": "baseline", "backbone": "tiny", "checkpoint": None,
        "identity": {"name": "baseline", "backbone": "tiny"}, "worker": "w", "batch_size": 1,
        "queue_ms": 1.0, "model_ms": 2.0, "total_ms": 3.0, "image_width": 10, "image_height": 10,
        "part_id": part_id, "station": station, "media": None, "review_verdict": None, "review_note": None,
        "reviewer": None, "reviewed_at": None,
    }
    row.update(extra)
    return row
