"""Service configuration: the one source of truth (environment variables ``GENCLIP_*``).

Every field reads from ``GENCLIP_<FIELD_NAME>`` (case-insensitive), e.g.
``GENCLIP_REDIS_URL=redis://redis:6379/0``. Lists (``GENCLIP_API_KEYS``) accept either a JSON
array or a comma-separated string. The CLI (``genclip serve`` / ``genclip worker``) overrides
individual fields from its flags; everything else (tests, the bench) builds a
:class:`Settings` directly.

The backbone / detector fields are shared with the model CLI: :meth:`Settings.detector_config`
turns them into a ``model.factory.DetectorConfig``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MB = 1024 * 1024


class Settings(BaseSettings):
    """All service settings. Field descriptions double as the README env-var table."""

    model_config = SettingsConfigDict(
        env_prefix="GENCLIP_",
        case_sensitive=False,
        extra="ignore",
        validate_default=True,
    )

    # ------------------------------------------------------------------ model / detector
    backbone: str = Field(
        "ViT-L-14-336",
        description="open_clip model name of the frozen CLIP backbone "
        "(`tiny-clip-random` = built-in tiny random test config).",
    )
    backbone_weights: str = Field(
        "openai",
        description="Backbone weights: open_clip pretrained tag, a local file path, or `random`.",
    )
    clip_cache_dir: str | None = Field(
        None, description="open_clip / Hugging Face cache directory for backbone weights."
    )
    allow_download: bool = Field(
        False,
        description="Allow fetching backbone weights from a hub at start-up "
        "(off: only local files / cache are used).",
    )
    detector: Literal["auto", "genclip", "vip2clip", "baseline", "ensemble"] = Field(
        "auto",
        description="Detector to run: `auto` (GenCLIP when a checkpoint is set, else the "
        "training-free baseline), `genclip`, `vip2clip`, `baseline` or `ensemble`.",
    )
    checkpoint: Path | None = Field(
        None, description="GenCLIP prompt checkpoint (`.safetensors` with its `.json` sidecar)."
    )
    vip2clip_checkpoint: Path | None = Field(
        None, description="ViP2-CLIP prompt checkpoint (`.safetensors` with its `.json` sidecar)."
    )
    image_size: int | None = Field(
        None,
        ge=32,
        le=2048,
        description="Model input side in pixels (unset: the checkpoint's, else 518).",
    )
    device: str = Field(
        "auto", description="Torch device of the detector: `auto` (cuda if present), `cpu`, `cuda:N`."
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="Intra-op CPU threads of the detector (`torch.set_num_threads`); unset: torch's "
        "default (one per core). Lower it when the CPU is shared with other work.",
    )
    detector_factory: str | None = Field(
        None,
        description="Advanced: `module:callable` returning a Detector; replaces the detector "
        "selection above (custom detectors, tests).",
    )

    # ------------------------------------------------------------------ queue / transport
    redis_url: str | None = Field(
        None,
        description="Redis URL for the Redis Streams transport (`redis://host:6379/0`). "
        "Unset: in-process queue with the detector running inside the API process.",
    )
    redis_prefix: str = Field(
        "genclip", description="Prefix of every Redis key used (stream, replies, heartbeats)."
    )
    workers_inline: bool = Field(
        False,
        description="With a Redis URL: also run a detector worker inside the API process "
        "(always on without a Redis URL).",
    )
    max_batch: int = Field(8, ge=1, le=256, description="Largest batch a worker sends to the detector.")
    max_wait_ms: float = Field(
        10.0,
        ge=0,
        le=10_000,
        description="How long a worker waits for a batch to fill after its first job (ms).",
    )
    queue_max_depth: int = Field(
        64,
        ge=1,
        description="Admission limit: jobs waiting or in progress (Redis: stream length) "
        "above which `/inspect` answers 503.",
    )
    job_timeout_s: float = Field(
        30.0, gt=0, description="Deadline of a request from its arrival (upload, decode, queue and "
        "inference included); past it the API answers 504."
    )
    max_inflight_requests: int = Field(
        0,
        ge=0,
        description="Cap on `/inspect` requests being handled by this API process (upload, "
        "decode, queue, render); over it: 503 before reading the body. 0 = auto "
        "(2 x queue_max_depth + 2 x max_batch).",
    )
    retry_after_s: int = Field(
        1, ge=0, description="`Retry-After` seconds sent with 503 answers."
    )
    reclaim_idle_ms: int = Field(
        15_000,
        ge=100,
        description="Redis: a job delivered to a worker that has not refreshed it for this long "
        "(dead worker) is reclaimed by another worker (XAUTOCLAIM).",
    )
    max_deliveries: int = Field(
        3,
        ge=1,
        description="Redis: a job is attempted at most this many times; then it is dead-lettered "
        "and answered with an error (poison image that kills workers).",
    )
    result_ttl_s: int = Field(
        60, ge=1, description="Redis: lifetime of an unread result key (`<prefix>:reply:<id>`)."
    )
    heartbeat_interval_s: float = Field(
        1.0, gt=0, description="Redis: worker heartbeat period."
    )
    heartbeat_ttl_s: float = Field(
        5.0,
        gt=0,
        description="Redis: a worker whose last heartbeat is older than this counts as dead.",
    )
    raw_transfer_max_bytes: int = Field(
        4 * MB,
        ge=0,
        description="Redis: send decoded pixels to workers when they fit in this many bytes "
        "(518x518 RGB is 0.8 MB), else the validated file bytes, which the worker decodes "
        "(less network traffic for large camera images).",
    )
    worker_id: str | None = Field(
        None, description="Worker name in the consumer group (default: host-pid-random)."
    )
    worker_metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="`genclip worker`: serve Prometheus metrics on this port (unset: off).",
    )

    # ------------------------------------------------------------------ request limits
    max_upload_bytes: int = Field(
        20 * MB, ge=1, description="Largest accepted image file (bytes); larger answers 413."
    )
    max_image_pixels: int = Field(
        50_000_000,
        ge=1,
        description="Largest accepted image (width x height, read from the header before "
        "decoding); larger answers 413.",
    )
    max_class_name_length: int = Field(
        128, ge=1, description="Longest accepted `class_name` form field (characters)."
    )
    cpu_threads: int = Field(
        2,
        ge=1,
        description="Threads of the API's pool that decodes uploads and renders heatmaps "
        "off the event loop.",
    )

    # ------------------------------------------------------------------ decisions / auth
    default_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="Score at or above which an image is anomalous."
    )
    thresholds_file: Path | None = Field(
        None,
        description="YAML or JSON file `{default: 0.5, classes: {name: threshold}}` with "
        "per-class-name thresholds (overrides `default_threshold`).",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Accepted API keys (comma-separated or JSON list); empty = no auth. "
        "Sent as `X-API-Key: <key>` or `Authorization: Bearer <key>`.",
    )

    # ------------------------------------------------------------------ server
    host: str = Field("127.0.0.1", description="`genclip serve` bind address (`0.0.0.0` in containers).")
    port: int = Field(8000, ge=0, le=65535, description="`genclip serve` port.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level of the service and uvicorn."
    )
    graceful_shutdown_s: float = Field(
        30.0, ge=0, description="On SIGTERM, how long in-flight requests / batches may finish."
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if value is None:
            return []
        if isinstance(value, str):
            text = value.strip()
            if not text:
                return []
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("redis_url", "clip_cache_dir", "detector_factory", "worker_id", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.heartbeat_ttl_s <= self.heartbeat_interval_s:
            raise ValueError("heartbeat_ttl_s must exceed heartbeat_interval_s")
        return self

    # ------------------------------------------------------------------ helpers
    @property
    def transport(self) -> str:
        """``redis`` when a Redis URL is set, else ``inprocess``."""
        return "redis" if self.redis_url else "inprocess"

    @property
    def inflight_limit(self) -> int:
        """Effective cap on concurrent ``/inspect`` requests in one API process."""
        return self.max_inflight_requests or 2 * self.queue_max_depth + 2 * self.max_batch

    @property
    def run_inline_worker(self) -> bool:
        """Whether the API process runs a detector worker itself."""
        return self.redis_url is None or self.workers_inline

    def detector_config(self) -> Any:
        """Build the ``model.factory.DetectorConfig`` these settings describe."""
        from model.factory import BackboneSpec, DetectorConfig

        return DetectorConfig(
            detector=self.detector,
            backbone=BackboneSpec(
                model_name=self.backbone,
                weights=self.backbone_weights,
                cache_dir=self.clip_cache_dir,
                allow_download=self.allow_download,
            ),
            checkpoint=self.checkpoint,
            vip2clip_checkpoint=self.vip2clip_checkpoint,
            image_size=self.image_size,
            device=self.device,
        )


def env_table() -> str:
    """Markdown table of every setting: env var, default, description (for the README)."""
    rows = ["| env var | default | description |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = ",".join(default) or "(empty)"
        elif default is None:
            default = "(unset)"
        rows.append(f"| `GENCLIP_{name.upper()}` | `{default}` | {field.description} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover
    print(env_table())
