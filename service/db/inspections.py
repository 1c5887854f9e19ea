"""Tables of the inspection records: one row per ``/inspect`` answer, and its reviews.

* ``inspections``: what was decided about one part, with everything needed to trace the
  decision weeks later: product (with the version of its settings and of its few-shot
  reference) / class name / class label, score, threshold and where it came from, pixel
  threshold, decision, defect regions, detector identity (name, backbone, checkpoint digest, and the
  full identity JSON: runtime, precision, image size...), timings, the client's ``part_id`` /
  ``station``, the retained media files (relative to ``GENCLIP_RECORDS_DIR``), and the latest
  review (denormalised from ``inspection_reviews`` so that lists can filter on it).
* ``inspection_reviews``: every review ever given (verdict ``defect`` / ``good``, note,
  reviewer, time); the newest one is the inspection's current verdict.

Ordering and pagination use the key ``(created_at, seq)``: ``seq`` is an auto-increment
surrogate that makes the key unique, so keyset pages never skip nor repeat a row, whatever is
inserted meanwhile (rows written late by the recorder's retry land in their time slot).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, ColumnElement, Float, ForeignKey, Index, Integer, String, cast, func, literal_column
from sqlalchemy.orm import Mapped, mapped_column

from service.db.base import Base, JsonType, UtcDateTime, utcnow

SeqType = BigInteger().with_variant(Integer(), "sqlite")  # SQLite: a rowid alias (autoincrement)

ID_LENGTH = 32
PART_ID_MAX_LENGTH = 128
STATION_MAX_LENGTH = 64
NOTE_MAX_LENGTH = 2000
REVIEWER_MAX_LENGTH = 128

VERDICT_DEFECT = "defect"
VERDICT_GOOD = "good"
VERDICTS = (VERDICT_DEFECT, VERDICT_GOOD)

SCORE_BINS = 1000  # resolution of the score histograms the statistics are computed from


class InspectionRecord(Base):
    __tablename__ = "inspections"
    __table_args__ = (
        Index("ix_inspections_created_at_seq", "created_at", "seq"),
        Index("ix_inspections_product_created_at", "product", "created_at"),
        Index("ix_inspections_station_created_at", "station", "created_at"),
        Index("ix_inspections_part_id", "part_id"),
    )

    seq: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(ID_LENGTH), unique=True, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow)
    product: Mapped[str | None] = mapped_column(String(64), nullable=True)
    product_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reference_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    class_name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    class_label: Mapped[str] = mapped_column(String(128), nullable=False)
    score: Mapped[float] = mapped_column(Float, nullable=False)
    threshold: Mapped[float] = mapped_column(Float, nullable=False)
    threshold_source: Mapped[str | None] = mapped_column(String(16), nullable=True)
    pixel_threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    is_anomalous: Mapped[bool] = mapped_column(Boolean, nullable=False)
    defects: Mapped[list[dict[str, Any]] | None] = mapped_column(JsonType, nullable=True)
    component_scores: Mapped[dict[str, float] | None] = mapped_column(JsonType, nullable=True)
    detector: Mapped[str] = mapped_column(String(64), nullable=False)
    backbone: Mapped[str] = mapped_column(String(128), nullable=False)
    checkpoint: Mapped[str | None] = mapped_column(String(64), nullable=True)
    identity: Mapped[dict[str, Any]] = mapped_column(JsonType, nullable=False)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    batch_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    queue_ms: Mapped[float] = mapped_column(Float, nullable=False)
    model_ms: Mapped[float] = mapped_column(Float, nullable=False)
    total_ms: Mapped[float] = mapped_column(Float, nullable=False)
    image_width: Mapped[int | None] = mapped_column(Integer, nullable=True)
    image_height: Mapped[int | None] = mapped_column(Integer, nullable=True)
    part_id: Mapped[str | None] = mapped_column(String(PART_ID_MAX_LENGTH), nullable=True)
    station: Mapped[str | None] = mapped_column(String(STATION_MAX_LENGTH), nullable=True)
    media: Mapped[dict[str, str] | None] = mapped_column(JsonType, nullable=True)
    review_verdict: Mapped[str | None] = mapped_column(String(16), nullable=True)
    review_note: Mapped[str | None] = mapped_column(String(NOTE_MAX_LENGTH), nullable=True)
    reviewer: Mapped[str | None] = mapped_column(String(REVIEWER_MAX_LENGTH), nullable=True)
    reviewed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)

    @property
    def decision(self) -> str:
        return "anomalous" if self.is_anomalous else "good"


class InspectionReview(Base):
    __tablename__ = "inspection_reviews"

    id: Mapped[int] = mapped_column(SeqType, primary_key=True, autoincrement=True)
    inspection_id: Mapped[str] = mapped_column(
        ForeignKey("inspections.id", ondelete="CASCADE"), nullable=False, index=True
    )
    verdict: Mapped[str] = mapped_column(String(16), nullable=False)
    note: Mapped[str | None] = mapped_column(String(NOTE_MAX_LENGTH), nullable=True)
    reviewer: Mapped[str | None] = mapped_column(String(REVIEWER_MAX_LENGTH), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow)


# ---------------------------------------------------------------------- portable SQL helpers
# Constants are inlined (literal_column), not bound: PostgreSQL only matches a GROUP BY
# expression to its SELECT twin when both are textually the same, bound parameters included.
def day_of(column: Any, dialect: str) -> ColumnElement[str]:
    """The UTC calendar day ``YYYY-MM-DD`` of a :class:`UtcDateTime` column."""
    if dialect == "postgresql":
        return func.to_char(func.timezone(literal_column("'UTC'"), column), literal_column("'YYYY-MM-DD'"))
    # SQLite stores UTC text 'YYYY-MM-DD HH:MM:SS.ffffff'
    return func.substr(column, literal_column("1"), literal_column("10"))


def score_bin(column: Any, dialect: str) -> ColumnElement[int]:
    """``floor(score * SCORE_BINS)`` clamped to the last bin (a score of exactly 1.0)."""
    scaled = column * literal_column(str(SCORE_BINS))
    last = literal_column(str(SCORE_BINS - 1))
    if dialect == "postgresql":
        return func.least(cast(func.floor(scaled), Integer), last)
    return func.min(cast(scaled, Integer), last)  # SQLite: CAST truncates (scores >= 0)
