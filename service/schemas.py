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


class ThresholdSource(StrEnum):
    product = "product"
    class_ = "class"
    default = "default"


class DefectRegion(BaseModel):
    x: int = Field(description="Left edge of the bounding box (pixels of the submitted image).")
    y: int = Field(description="Top edge of the bounding box.")
    width: int
    height: int
    area: int = Field(description="Pixels of the region at or above the pixel threshold.")
    peak: float = Field(description="Highest map value inside the region, in [0, 1].")


class InspectResponse(BaseModel):
    id: str = Field(description="Job id (also in the logs).")
    score: float = Field(ge=0.0, le=1.0, description="Image-level anomaly score in [0, 1].")
    is_anomalous: bool = Field(description="score >= threshold.")
    threshold: float = Field(description="Threshold in force (see `threshold_source`).")
    threshold_source: ThresholdSource = Field(
        description="`product`: the product's calibrated threshold; `class`: the thresholds file's entry "
        "for the class name; `default`: GENCLIP_DEFAULT_THRESHOLD."
    )
    product: str | None = Field(description="Product inspected against (its class name, reference and thresholds), or null.")
    reference_version: int | None = Field(
        default=None, description="Version of the product's few-shot reference fused into this answer, or null."
    )
    pixel_threshold: float = Field(description="Map value at or above which a pixel counts as defective.")
    defects: list[DefectRegion] = Field(
        description="Connected regions of the map at or above the pixel threshold, highest peak first."
    )
    mask_png: str | None = Field(
        default=None, description="Base64 1-bit PNG of the defective pixels (only with `mask=true`)."
    )
    class_label: str = Field(description="Class name the model used after Class Name Filtering, or `object`.")
    class_name: str | None = Field(description="Class name as submitted, or null.")
    heatmap_png: str | None = Field(
        description="Base64 PNG heatmap at the input image's resolution (null with heatmap=none)."
    )
    detector: str = Field(description="Detector that ran (genclip, vip2clip, baseline, ensemble).")
    backbone: str = Field(description="open_clip backbone name.")
    runtime: str = Field(description="What ran the vision tower: `torch` or `openvino`.")
    precision: str = Field(description="Vision tower arithmetic: `fp32`, `int8` (OpenVINO) or `fp16` (CUDA).")
    checkpoint: str | None = Field(description="sha256 of the prompt checkpoint, or null (training-free).")
    timing_ms: TimingMs
    component_scores: dict[str, float] | None = Field(
        default=None, description="Component scores: per detector (ensemble), `zero_shot` and `few_shot` "
        "(product with a reference); absent otherwise."
    )


class ErrorResponse(BaseModel):
    error: str = Field(description="Machine-readable error code.")
    message: str = Field(description="What went wrong, for a person.")
    status: int = Field(description="HTTP status code.")
    id: str | None = Field(default=None, description="Job id when the job had been admitted.")
    detail: Any = Field(default=None, description="Validation details (422).")
    retry_after_ms: int | None = Field(
        default=None,
        description="503: when to retry, in milliseconds (also the `Retry-After-Ms` header; "
        "`Retry-After` carries it rounded up to whole seconds).",
    )


class HealthResponse(BaseModel):
    status: str = "ok"


class WorkerStatus(BaseModel):
    worker_id: str
    identity: dict[str, Any]
    progress_age_s: float | None = Field(
        default=None, description="Seconds since the worker last polled the queue or finished a batch.")
    jobs_per_s: float | None = Field(default=None, description="Jobs per second over its recent batches.")


class ReadyResponse(BaseModel):
    status: str = Field(description="`ready` or `not_ready`.")
    transport: str = Field(description="`inprocess` or `redis`.")
    detector: dict[str, Any] | None = Field(description="Identity of the detector that runs (first live worker).")
    workers: list[WorkerStatus] = Field(default_factory=list)
    queue_depth: int | None = None
    reason: str | None = Field(default=None, description="Why not ready.")


_RETRY_HEADERS = {
    "Retry-After": {"description": "Seconds to wait before retrying (rounded up).",
                    "schema": {"type": "integer", "minimum": 0}},
    "Retry-After-Ms": {"description": "Milliseconds to wait before retrying.",
                       "schema": {"type": "integer", "minimum": 0}},
}

# Answers any route can give (declared app-wide in service.app): they come from the HTTP protocol
# guard (service.http_server) or the request parsing, before a route's own code runs.
COMMON_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed HTTP request or malformed multipart body."},
    408: {"model": ErrorResponse, "description": "Headers or body too slow to arrive (connection closed)."},
    413: {"model": ErrorResponse, "description": "Request body over the size limit."},
    431: {"model": ErrorResponse, "description": "Request headers too large."},
    503: {"model": ErrorResponse, "headers": _RETRY_HEADERS,
          "description": "Overloaded (too many requests in progress, event loop behind, memory budget "
          "spent), queue full, no live worker, queue backend unavailable or the job lost with it."},
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    **COMMON_ERROR_RESPONSES,
    401: {"model": ErrorResponse, "description": "API keys are configured and the key is missing or wrong."},
    413: {"model": ErrorResponse, "description": "File over the size limit, image over the pixel limit or "
          "its decoded size over the per-request budget (read from the header, before decoding)."},
    415: {"model": ErrorResponse, "description": "Not a JPEG/PNG/BMP/TIFF image, or not multipart/form-data."},
    422: {"model": ErrorResponse, "description": "Bad, missing or repeated form fields / query parameters, "
          "or a multi-frame image."},
    500: {"model": ErrorResponse, "description": "The detector failed on this image."},
    502: {"model": ErrorResponse, "description": "A worker returned a malformed result."},
    504: {"model": ErrorResponse, "description": "The job's deadline passed before it was answered."},
}
