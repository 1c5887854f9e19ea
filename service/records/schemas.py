"""JSON models of the records API (``/inspections``, ``/products/{name}/stats``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.db.inspections import NOTE_MAX_LENGTH, REVIEWER_MAX_LENGTH, InspectionRecord, InspectionReview
from service.query_types import NO_CONTROL_CHARACTERS, NO_CONTROL_CHARACTERS_MULTILINE, has_control_characters
from service.records.queries import as_utc


class DefectBox(BaseModel):
    x: float
    y: float
    width: float
    height: float
    area: float | None = None
    peak: float | None = None


class ReviewOut(BaseModel):
    verdict: Literal["defect", "good"]
    note: str | None = None
    reviewer: str | None = None
    reviewed_at: datetime


class InspectionTiming(BaseModel):
    queue: float
    model: float
    total: float


class InspectionOut(BaseModel):
    id: str = Field(description="The `/inspect` answer's id.")
    created_at: datetime = Field(description="When the answer was given (UTC).")
    product: str | None = Field(description="Registered product the part was inspected as, or null.")
    product_version: int | None = Field(description="The product's version (settings, calibration) then.")
    reference_version: int | None = Field(description="Version of the product's few-shot reference used, if any.")
    class_name: str | None = Field(description="Class name as submitted.")
    class_label: str = Field(description="Class name the model used after Class Name Filtering.")
    score: float
    threshold: float
    threshold_source: str | None = Field(description="`product`, `class` or `default` (null: not reported).")
    pixel_threshold: float | None = Field(description="Map value above which a pixel counted as defective.")
    decision: Literal["anomalous", "good"]
    is_anomalous: bool
    defects: list[dict[str, Any]] | None = Field(description="Defect regions in image pixels.")
    component_scores: dict[str, float] | None = None
    detector: str
    backbone: str
    checkpoint: str | None = Field(description="sha256 of the prompt checkpoint, or null (training-free).")
    identity: dict[str, Any] = Field(description="The detector identity in full (weights, layers, size, runtime...).")
    worker: str | None
    batch_size: int | None
    timing_ms: InspectionTiming
    image_width: int | None
    image_height: int | None
    part_id: str | None
    station: str | None
    image_url: str | None = Field(description="Kept image (thumbnail or original), or null when none was kept.")
    heatmap_url: str | None = Field(description="Kept heatmap PNG, or null when none was kept.")
    original_kept: bool = Field(description="Whether the uploaded file itself was kept (`?size=full`).")
    review: ReviewOut | None = Field(description="The latest review, or null when not reviewed.")

    @classmethod
    def of(cls, record: InspectionRecord) -> InspectionOut:
        media = record.media or {}
        base = f"/inspections/{record.id}"
        review = None
        if record.review_verdict is not None and record.reviewed_at is not None:
            review = ReviewOut(verdict=record.review_verdict, note=record.review_note, reviewer=record.reviewer,
                               reviewed_at=as_utc(record.reviewed_at))
        return cls(
            id=record.id, created_at=as_utc(record.created_at), product=record.product,
            product_version=record.product_version, reference_version=record.reference_version,
            class_name=record.class_name, class_label=record.class_label, score=record.score,
            threshold=record.threshold, threshold_source=record.threshold_source, pixel_threshold=record.pixel_threshold,
            decision=record.decision, is_anomalous=record.is_anomalous, defects=record.defects,
            component_scores=record.component_scores, detector=record.detector, backbone=record.backbone,
            checkpoint=record.checkpoint, identity=record.identity or {}, worker=record.worker,
            batch_size=record.batch_size,
            timing_ms=InspectionTiming(queue=record.queue_ms, model=record.model_ms, total=record.total_ms),
            image_width=record.image_width, image_height=record.image_height, part_id=record.part_id,
            station=record.station,
            image_url=f"{base}/image" if ("thumb" in media or "image" in media) else None,
            heatmap_url=f"{base}/heatmap" if "heatmap" in media else None,
            original_kept="image" in media, review=review,
        )


class InspectionDetail(InspectionOut):
    reviews: list[ReviewOut] = Field(default_factory=list, description="Every review, oldest first.")

    @classmethod
    def with_reviews(cls, record: InspectionRecord, reviews: list[InspectionReview]) -> InspectionDetail:
        return cls(**InspectionOut.of(record).model_dump(), reviews=[
            ReviewOut(verdict=r.verdict, note=r.note, reviewer=r.reviewer, reviewed_at=as_utc(r.created_at))
            for r in reviews
        ])


class InspectionPage(BaseModel):
    items: list[InspectionOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page; null on the last.")


class ReviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    verdict: Literal["defect", "good"] = Field(description="What the part really is.")
    note: str | None = Field(default=None, max_length=NOTE_MAX_LENGTH, pattern=NO_CONTROL_CHARACTERS_MULTILINE)
    reviewer: str | None = Field(default=None, max_length=REVIEWER_MAX_LENGTH, pattern=NO_CONTROL_CHARACTERS)

    @field_validator("note", "reviewer")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        if value is not None and has_control_characters(value, multiline=True):
            raise ValueError("control characters are not allowed")
        return value



class ScoreQuantiles(BaseModel):
    p05: float | None
    p25: float | None
    p50: float | None
    p75: float | None
    p95: float | None


class DailyStats(BaseModel):
    day: str = Field(description="UTC day, YYYY-MM-DD.")
    count: int
    anomalous: int
    good: int
    quantiles: ScoreQuantiles = Field(description="Score quantiles of all parts that day.")
    good_median: float | None = Field(description="Median score of the good-decided parts that day.")
    drift: float | None = Field(description="good_median minus the calibration median.")
    drifting: bool


class ReviewOutcomes(BaseModel):
    reviewed: int
    confirmed_defects: int = Field(description="Decided anomalous, reviewed defect.")
    false_alarms: int = Field(description="Decided anomalous, reviewed good.")
    missed_defects: int = Field(description="Decided good, reviewed defect.")
    confirmed_good: int = Field(description="Decided good, reviewed good.")


class Histogram(BaseModel):
    edges: list[float] = Field(description="Bin edges (n + 1), over the range the scores and the threshold span.")
    good: list[int] = Field(description="Good-decided parts per score bin.")
    anomalous: list[int] = Field(description="Anomalous-decided parts per score bin.")


class DriftOut(BaseModel):
    window_hours: float
    reference: float | None = Field(description="Calibration median score (null: not calibrated).")
    good_count: int
    good_median: float | None
    delta: float | None
    limit: float
    min_samples: int
    drifting: bool


class ProductStats(BaseModel):
    product: str
    registered: bool
    since: datetime
    until: datetime
    total: int
    anomalous: int
    good: int
    anomalous_rate: float | None
    reviews: ReviewOutcomes
    threshold: float | None = Field(description="The product's threshold, else the latest recorded one.")
    threshold_from: str | None
    quantiles: ScoreQuantiles
    histogram: Histogram
    daily: list[DailyStats]
    drift: DriftOut
