"""Pydantic models of the HTTP responses (JSON), used for validation and the OpenAPI schema."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field


class HeatmapMode(StrEnum):
    png = "png"
    overlay = "overlay"
    none = "none"


class TimingMs(BaseModel):
    queue: float = Field(description="Admission to the start of the job's batch (ms).")
    model: float = Field(description="Detector time of the batch that held the job (ms).")
    total: float = Field(description="Server time from request receipt to response (ms).")


class InspectResponse(BaseModel):
    id: str = Field(description="Job id (also in the logs).")
    score: float = Field(ge=0.0, le=1.0, description="Image-level anomaly score in [0, 1].")
    is_anomalous: bool = Field(description="score >= threshold.")
    threshold: float = Field(description="Threshold in force for this class name.")
    class_label: str = Field(description="Class name the model used after Class Name Filtering, or `object`.")
    class_name: str | None = Field(description="Class name as submitted, or null.")
    heatmap_png: str | None = Field(
        description="Base64 PNG heatmap at the input image's resolution (null with heatmap=none)."
    )
    detector: str = Field(description="Detector that ran (genclip, vip2clip, baseline, ensemble).")
    backbone: str = Field(description="open_clip backbone name.")
    checkpoint: str | None = Field(description="sha256 of the prompt checkpoint, or null (training-free).")
    timing_ms: TimingMs
    component_scores: dict[str, float] | None = Field(
        default=None, description="Per-detector scores (ensemble only; absent otherwise)."
    )


class ErrorResponse(BaseModel):
    error: str = Field(description="Machine-readable error code.")
    message: str = Field(description="What went wrong, for a person.")
    status: int = Field(description="HTTP status code.")
    id: str | None = Field(default=None, description="Job id when the job had been admitted.")
    detail: Any = Field(default=None, description="Validation details (422).")


class HealthResponse(BaseModel):
    status: str = "ok"


class WorkerStatus(BaseModel):
    worker_id: str
    identity: dict[str, Any]


class ReadyResponse(BaseModel):
    status: str = Field(description="`ready` or `not_ready`.")
    transport: str = Field(description="`inprocess` or `redis`.")
    detector: dict[str, Any] | None = Field(description="Identity of the detector that runs (first live worker).")
    workers: list[WorkerStatus] = Field(default_factory=list)
    queue_depth: int | None = None
    reason: str | None = Field(default=None, description="Why not ready.")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "API keys are configured and the key is missing or wrong."},
    413: {"model": ErrorResponse, "description": "File over the size limit, or image over the pixel limit."},
    415: {"model": ErrorResponse, "description": "Not a JPEG/PNG/BMP/TIFF image, or not multipart/form-data."},
    422: {"model": ErrorResponse, "description": "Bad or missing form fields / query parameters."},
    500: {"model": ErrorResponse, "description": "The detector failed on this image."},
    503: {"model": ErrorResponse, "description": "Queue full or no live worker; see Retry-After."},
    504: {"model": ErrorResponse, "description": "The job's deadline passed before it was answered."},
}
