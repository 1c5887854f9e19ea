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
# Room for multipart boundaries, part headers and small form fields on top of the file.
MULTIPART_OVERHEAD = 64 * 1024


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
        description="Intra-op CPU threads of the detector (`torch.set_num_threads`, and OpenVINO's "
        "inference threads with `GENCLIP_RUNTIME=openvino`); unset: one per core. Lower it when the "
        "CPU is shared with other work.",
    )
    runtime: Literal["torch", "openvino"] = Field(
        "torch",
        description="What runs the vision tower: `torch`, or `openvino` (CPU only; needs the "
        "`[openvino]` extra): the tower exported to OpenVINO IR at the serving resolution, "
        "cached in `GENCLIP_OPENVINO_CACHE_DIR`. Text passes and prompt maths stay in torch.",
    )
    precision: Literal["fp32", "int8"] = Field(
        "fp32",
        description="Vision tower precision: `fp32`, or `int8` (OpenVINO only: NNCF post-training "
        "quantization calibrated on `GENCLIP_CALIBRATION_IMAGES`, else on built-in synthetic textures).",
    )
    openvino_cache_dir: Path | None = Field(
        None,
        description="Folder of exported OpenVINO IRs, keyed by backbone weights digest, resolution, "
        "precision, tapped layers and calibration set (unset: `~/.cache/genclip/openvino`).",
    )
    calibration_images: Path | None = Field(
        None,
        description="int8: folder of images to calibrate on, searched recursively (a product's good "
        "photos); unset: built-in synthetic textures.",
    )
    calibration_product: str | None = Field(
        None,
        description="int8: calibrate on this registered product's good photos (read from the database); "
        "takes precedence over `calibration_images`.",
    )
    calibration_size: int = Field(
        16,
        ge=1,
        le=1000,
        description="int8: number of calibration images (spread over the folder's files).",
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
        description="Cap on upload requests (`/inspect`) being processed by this API process once "
        "their body has arrived (decode, queue, render); over it: 503 `overloaded`. Uploads still "
        "arriving do not count (slow clients cannot starve the others; see `body_timeout_s`). "
        "0 = auto (2 x queue_max_depth + 2 x max_batch).",
    )
    retry_after_s: int = Field(
        1,
        ge=0,
        description="Retry delay sent with 503 answers when the service cannot estimate one "
        "(queue drain time from the measured service rate is used when known): `Retry-After` "
        "(whole seconds), `Retry-After-Ms` and `retry_after_ms` in the JSON body.",
    )
    admission_headroom: float = Field(
        0.8,
        gt=0,
        le=1,
        description="Admission: a job is admitted only if the queue ahead of it, at the workers' "
        "measured service rate, drains within this fraction of the request's remaining deadline "
        "(and the queue is under `queue_max_depth`); else 503 `queue_full`.",
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

    # ------------------------------------------------------------------ database
    database_url: str = Field(
        "sqlite:///./genclip.db",
        description="Database of the durable state (products, references, thresholds, inspection "
        "records): `sqlite:///path.db` (embedded default) or `postgresql://user:pass@host:5432/db`.",
    )
    database_migrate: bool = Field(
        True,
        description="Apply pending schema migrations at start-up (API and workers, safe to run "
        "concurrently); off: run `genclip db upgrade` yourself (start-up refuses an old schema).",
    )

    # ------------------------------------------------------------------ products
    bank_max_patches: int = Field(
        4096,
        ge=64,
        description="Few-shot reference: most good-photo patches kept per tapped layer (greedy coreset "
        "subsampling, stored as float16): bounds the bank's memory and the matching cost per inspection "
        "(4096 keeps a ViT-L-14-336 / 518 px / 32-photo bank at about 25 MB).",
    )
    reference_cache_mb: int = Field(
        512, ge=1, description="Worker: memory for decoded product reference banks (least recently used "
        "dropped first)."
    )
    product_cache_ttl_s: float = Field(
        1.0, ge=0.0, le=10.0,
        description="API: how long a product's settings, thresholds and reference version are cached; "
        "a change made anywhere is used by every inspection within this time.",
    )
    calibration_wait_s: float = Field(
        120.0, ge=0.0,
        description="`POST /products/{name}/good` waits this long for the reference rebuild and "
        "calibration; past it the answer is 202 and the work goes on (poll `GET /products/{name}`).",
    )
    calibration_job_timeout_s: float = Field(
        3600.0, gt=0.0, description="Deadline of a reference rebuild job from its admission."
    )
    max_good_images_per_upload: int = Field(
        256, ge=1, description="Most files one `POST /products/{name}/good` may carry."
    )
    max_good_upload_bytes: int = Field(
        512 * MB, ge=1,
        description="Largest `POST /products/{name}/good` request body (all its photos; each photo is "
        "also held to `max_upload_bytes`); larger answers 413 before anything is read.",
    )
    default_pixel_threshold: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Map value at or above which a pixel counts as defective when no product "
        "calibration sets one (the `defects` regions and `mask_png`).",
    )
    defect_min_area_px: int = Field(
        16, ge=1, description="Smallest connected region (pixels, at the image's resolution) reported in `defects`."
    )
    max_defects: int = Field(50, ge=0, le=1000, description="Most defect regions reported per image (largest peaks first).")

    # ------------------------------------------------------------------ inspection records
    records_enabled: bool = Field(
        True,
        description="Record every `/inspect` answer in the database (written in batches off the "
        "request path; see `GET /inspections`).",
    )
    records_keep_images: Literal["none", "anomalous", "all"] = Field(
        "all",
        description="Which inspections keep their image and heatmap on disk (`records_dir`): `none`, "
        "`anomalous` (decided anomalous only) or `all`. Thumbnails unless `records_keep_originals`.",
    )
    records_keep_originals: bool = Field(
        False,
        description="Also keep the uploaded file as sent and the full-resolution heatmap PNG (else only "
        "a thumbnail JPEG and a heatmap PNG of `records_thumbnail_px`).",
    )
    records_thumbnail_px: int = Field(
        320, ge=32, le=2048, description="Longest side of the kept thumbnail and its heatmap (pixels)."
    )
    records_dir: Path = Field(
        Path("./records"), description="Directory (or mounted volume) of the kept images and heatmaps."
    )
    records_max_bytes: int = Field(
        2 * 1024 * MB,
        ge=0,
        description="Size cap of `records_dir`: past it the oldest files are deleted (records stay, "
        "without their images). 0 = no cap.",
    )
    records_retention_days: float = Field(
        30.0,
        ge=0,
        description="Kept images and heatmaps older than this many days are deleted (records stay). "
        "0 = keep until the size cap.",
    )
    records_buffer: int = Field(
        10_000,
        ge=1,
        description="Records held in memory while the database is slow or down; past it the oldest "
        "are dropped, counted (`genclip_records_dropped_total`) and logged.",
    )
    records_batch: int = Field(256, ge=1, le=10_000, description="Largest batch of records per database write.")
    records_flush_ms: float = Field(
        250.0, ge=1, le=60_000, description="How long a record may wait for its batch to fill before it is written (ms)."
    )
    drift_limit: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Drift signal: a product drifts when the median score of its good-decided parts over "
        "the last 24 h (and per day in its stats) moves more than this from its calibration median.",
    )
    drift_min_samples: int = Field(
        20, ge=1, description="Good-decided parts needed in a window (24 h, a day) before drift is judged."
    )
    drift_interval_s: float = Field(
        60.0, gt=0, description="How often the API recomputes the drift gauges of `/metrics` (seconds)."
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
    max_decoded_bytes: int = Field(
        64 * MB,
        ge=1,
        description="Largest decoded image per request (width x height x bands x bytes per sample, "
        "read from the header before decoding); larger answers 413. Peak memory of a request is "
        "about 9x this in the in-process transport (decode, model input, full-size map, heatmap).",
    )
    decoded_bytes_budget: int = Field(
        256 * MB,
        ge=1,
        description="Decoded image bytes (as `max_decoded_bytes` counts them) held by all requests "
        "of one API process at once; a request that would pass it answers 503 `overloaded`.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="HTTP: a request's headers must arrive within this many seconds of the connection "
        "(or of its first byte on a kept-alive connection); else 408 and the connection is closed.",
    )
    body_timeout_s: float = Field(
        20.0,
        gt=0,
        description="HTTP: a request body must arrive completely within this many seconds of its "
        "headers; else 408 and the connection is closed (slow uploads).",
    )
    body_idle_timeout_s: float = Field(
        5.0,
        gt=0,
        description="HTTP: longest silence allowed between the headers and the first body byte, and "
        "between body chunks; else 408 and the connection is closed.",
    )
    http_max_requests: int = Field(
        0,
        ge=0,
        description="HTTP: requests processed at once by one API process (body received); over it "
        "a request answers 503 `overloaded` before the app sees it (`/health`, `/ready`, `/metrics` "
        "exempt). Requests still sending their body are capped apart, at 4 x this. 0 = auto "
        "(2 x the in-flight cap).",
    )
    http_max_loop_lag_ms: float = Field(
        250.0,
        ge=0,
        description="HTTP: while the event loop runs this late (ms), new requests answer 503 "
        "`overloaded` before the app sees them (probes exempt); the lag also counts against each "
        "request's deadline. 0 = off.",
    )
    http_backlog: int = Field(
        512,
        ge=1,
        description="HTTP: listen backlog (connections accepted by the kernel, not yet by the server).",
    )
    http_listen_sockets: int = Field(
        4,
        ge=1,
        le=64,
        description="HTTP: listening sockets on the port (`SO_REUSEPORT`, Linux; 1 = a single socket). "
        "The event loop accepts one connection per socket per iteration: with several, a burst of new "
        "connections is not left waiting in the kernel's accept queue while the server is busy.",
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

    @field_validator("redis_url", "clip_cache_dir", "detector_factory", "worker_id", "calibration_product",
                     mode="before")
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
    def http_request_limit(self) -> int:
        """Effective cap on concurrent HTTP requests at the protocol level."""
        return self.http_max_requests or 2 * self.inflight_limit

    @property
    def max_body_bytes(self) -> int:
        """Largest request body any route accepts (the upload limit plus multipart overhead)."""
        return self.max_upload_bytes + MULTIPART_OVERHEAD

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
            runtime=self.runtime,
            precision=self.precision,
            runtime_cache_dir=self.openvino_cache_dir,
            calibration_images=self.calibration_images,
            calibration_size=self.calibration_size,
            threads=self.torch_threads,
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


README_TABLE_START = "<!-- settings-table:start (generated: python -m service.settings --write-readme) -->"
README_TABLE_END = "<!-- settings-table:end -->"


def readme_with_table(readme: str) -> str:
    """``readme`` with the text between the settings-table markers replaced by :func:`env_table`."""
    start, end = readme.index(README_TABLE_START), readme.index(README_TABLE_END)
    return readme[: start + len(README_TABLE_START)] + "\n" + env_table() + "\n" + readme[end:]


if __name__ == "__main__":  # pragma: no cover
    import argparse

    cli = argparse.ArgumentParser(description="Print the settings table, or rewrite it in README.md.")
    cli.add_argument("--write-readme", nargs="?", const="README.md", default=None, metavar="PATH")
    options = cli.parse_args()
    if options.write_readme:
        readme_path = Path(options.write_readme)
        readme_path.write_text(readme_with_table(readme_path.read_text()))
    else:
        print(env_table())
