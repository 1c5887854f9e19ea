"""Reading and reviewing inspection records: filters, keyset pages, reviews, CSV rows.

Pages are ordered newest first by the unique key ``(created_at, seq)``; a cursor is that key
of the page's last row (opaque, URL-safe). The next page is every row strictly below it, so
concurrent inserts (new answers, or old ones written late by the recorder's retries) never
make a page repeat or skip a row that existed when the first page was read.

Every function takes a :class:`Session` and blocks: call them through ``Database.run``.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, select, tuple_
from sqlalchemy.orm import Session

from service.db.base import utcnow
from service.db.inspections import InspectionRecord, InspectionReview

R = InspectionRecord


class CursorError(ValueError):
    """A cursor that this service did not hand out."""


def as_utc(value: datetime | None) -> datetime | None:
    """Naive datetimes from a query string are UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def encode_cursor(created_at: datetime, seq: int) -> str:
    raw = f"{as_utc(created_at).isoformat()}|{seq}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, _, seq = raw.partition("|")
        when = datetime.fromisoformat(stamp)
        number = int(seq)
        if when.tzinfo is None or not 0 <= number < 2**63:
            raise ValueError("out of range")
        return when.astimezone(UTC), number
    except (binascii.Error, UnicodeDecodeError, ValueError, OverflowError) as exc:
        raise CursorError("cursor: not a cursor from a previous page") from exc


@dataclass(frozen=True)
class InspectionFilter:
    """The filters of ``GET /inspections`` (``None`` = no filter)."""

    product: str | None = None
    station: str | None = None
    part_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    decision: str | None = None  # "anomalous" | "good"
    min_score: float | None = None
    max_score: float | None = None
    reviewed: bool | None = None
    verdict: str | None = None  # "defect" | "good"

    def clauses(self) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = []
        if self.product is not None:
            where.append(R.product == self.product)
        if self.station is not None:
            where.append(R.station == self.station)
        if self.part_id is not None:
            where.append(R.part_id == self.part_id)
        if self.since is not None:
            where.append(R.created_at >= as_utc(self.since))
        if self.until is not None:
            where.append(R.created_at < as_utc(self.until))
        if self.decision is not None:
            where.append(R.is_anomalous.is_(self.decision == "anomalous"))
        if self.min_score is not None:
            where.append(R.score >= self.min_score)
        if self.max_score is not None:
            where.append(R.score <= self.max_score)
        if self.reviewed is not None:
            where.append(R.review_verdict.is_not(None) if self.reviewed else R.review_verdict.is_(None))
        if self.verdict is not None:
            where.append(R.review_verdict == self.verdict)
        return where

    def query_params(self) -> dict[str, str]:
        """The filters as query-string parameters (links to the next page, CSV export)."""
        out: dict[str, str] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, datetime):
                out[name] = as_utc(value).isoformat()
            elif isinstance(value, bool):
                out[name] = "true" if value else "false"
            else:
                out[name] = str(value)
        return out


def list_page(session: Session, flt: InspectionFilter, limit: int,
              cursor: str | None = None) -> tuple[list[InspectionRecord], str | None]:
    """One page, newest first, and the cursor of the next page (``None`` on the last)."""
    stmt = select(R).where(*flt.clauses())
    if cursor:
        when, seq = decode_cursor(cursor)
        stmt = stmt.where(tuple_(R.created_at, R.seq) < tuple_(when, seq))
    stmt = stmt.order_by(R.created_at.desc(), R.seq.desc()).limit(limit + 1)
    rows = list(session.scalars(stmt))
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].created_at, rows[-1].seq)
    return rows, next_cursor


def get_record(session: Session, record_id: str) -> InspectionRecord | None:
    return session.scalar(select(R).where(R.id == record_id))


def get_reviews(session: Session, record_id: str) -> list[InspectionReview]:
    stmt = (select(InspectionReview).where(InspectionReview.inspection_id == record_id)
            .order_by(InspectionReview.created_at, InspectionReview.id))
    return list(session.scalars(stmt))


def add_review(session: Session, record_id: str, verdict: str, note: str | None,
               reviewer: str | None) -> tuple[InspectionRecord, list[InspectionReview]] | None:
    """Store a review and make it the record's current verdict; ``None`` if no such record."""
    record = session.scalar(select(R).where(R.id == record_id).with_for_update())
    if record is None:
        return None
    now = utcnow()
    session.add(InspectionReview(inspection_id=record_id, verdict=verdict, note=note, reviewer=reviewer,
                                 created_at=now))
    record.review_verdict, record.review_note, record.reviewer, record.reviewed_at = verdict, note, reviewer, now
    session.flush()
    return record, get_reviews(session, record_id)


def distinct_values(session: Session, column: Any, limit: int = 200) -> list[str]:
    """Distinct non-null values of a column (filter choices of the review page)."""
    stmt = select(column).where(column.is_not(None)).distinct().order_by(column).limit(limit)
    return [value for value in session.scalars(stmt)]


# ---------------------------------------------------------------------- CSV
CSV_COLUMNS = (
    "id", "created_at", "product", "product_version", "reference_version", "class_name", "class_label", "score",
    "threshold", "threshold_source", "pixel_threshold", "decision", "defects", "part_id", "station", "detector", "backbone", "checkpoint",
    "runtime", "precision", "image_size", "worker", "queue_ms", "model_ms", "total_ms", "image_width",
    "image_height", "review_verdict", "reviewer", "reviewed_at", "review_note",
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """Text cells that a spreadsheet would run as a formula get a leading quote (OWASP)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def csv_row(record: InspectionRecord) -> list[Any]:
    identity = record.identity or {}
    values = {
        "id": record.id,
        "created_at": as_utc(record.created_at).isoformat(),
        "product": record.product,
        "product_version": record.product_version,
        "reference_version": record.reference_version,
        "class_name": record.class_name,
        "class_label": record.class_label,
        "score": repr(record.score),
        "threshold": repr(record.threshold),
        "threshold_source": record.threshold_source,
        "pixel_threshold": record.pixel_threshold,
        "decision": record.decision,
        "defects": len(record.defects or []),
        "part_id": record.part_id,
        "station": record.station,
        "detector": record.detector,
        "backbone": record.backbone,
        "checkpoint": record.checkpoint,
        "runtime": identity.get("runtime"),
        "precision": identity.get("precision"),
        "image_size": identity.get("image_size"),
        "worker": record.worker,
        "queue_ms": record.queue_ms,
        "model_ms": record.model_ms,
        "total_ms": record.total_ms,
        "image_width": record.image_width,
        "image_height": record.image_height,
        "review_verdict": record.review_verdict,
        "reviewer": record.reviewer,
        "reviewed_at": as_utc(record.reviewed_at).isoformat() if record.reviewed_at else None,
        "review_note": record.review_note,
    }
    return [_cell("" if values[c] is None else values[c]) for c in CSV_COLUMNS]
