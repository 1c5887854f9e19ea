"""Prometheus metrics (prometheus-client), one registry per app / worker process.

A registry per instance (not the global default) keeps several apps in one process (tests,
``--workers-inline``) from colliding.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.gc_tuning import frozen_objects

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]


class Metrics:
    """All service metrics.

    API: ``genclip_http_requests_total{endpoint,method,status}``,
    ``genclip_request_latency_seconds{endpoint}`` (end to end, /inspect),
    ``genclip_queue_depth``, ``genclip_rejections_total{reason}``,
    ``genclip_heatmap_render_seconds``, ``genclip_event_loop_lag_seconds``,
    ``genclip_gc_frozen_objects`` (start-up heap kept out of full GC passes: :mod:`service.gc_tuning`).
    Worker (inline or ``genclip worker``): ``genclip_batch_size`` (jobs per detector call),
    ``genclip_model_latency_seconds`` (detector time per batch),
    ``genclip_queue_wait_seconds`` (admission to batch start),
    ``genclip_jobs_total{outcome}``.
    Records (API): ``genclip_records_written_total``, ``genclip_records_write_errors_total``
    (failed batch writes, retried), ``genclip_records_dropped_total{reason}`` (records lost:
    ``buffer_full``, ``shutdown``, ``invalid``), ``genclip_records_buffered`` (waiting for the
    database), ``genclip_records_media_skipped_total{reason}`` (records kept without images),
    ``genclip_records_media_bytes`` (kept images on disk).
    Drift (API, per registered product with a calibration): ``genclip_product_drift{product}``
    (median score of good-decided parts over the last 24 h minus the calibration median),
    ``genclip_product_drifting{product}`` (1 when past ``GENCLIP_DRIFT_LIMIT``),
    ``genclip_product_good_median{product}``.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "genclip_http_requests", "HTTP requests by endpoint, method and status code.",
            ["endpoint", "method", "status"], registry=r,
        )
        self.request_latency = Histogram(
            "genclip_request_latency_seconds", "End-to-end request latency (server side).",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge(
            "genclip_queue_depth", "Jobs admitted and not finished (waiting + in progress).",
            registry=r,
        )
        self.rejections = Counter(
            "genclip_rejections", "Requests refused by admission control, by reason.",
            ["reason"], registry=r,
        )
        self.gc_frozen = Gauge(
            "genclip_gc_frozen_objects",
            "Objects frozen after start-up (never scanned by full GC passes; 0 when not frozen).",
            registry=r,
        )
        self.gc_frozen.set_function(frozen_objects)
        self.loop_lag = Gauge(
            "genclip_event_loop_lag_seconds",
            "How late the API's event loop runs (time requests wait before the app sees them).",
            registry=r,
        )
        self.heatmap_render = Histogram(
            "genclip_heatmap_render_seconds", "Heatmap colouring + PNG encoding time.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            "genclip_batch_size", "Jobs per detector call.", buckets=BATCH_BUCKETS, registry=r,
        )
        self.model_latency = Histogram(
            "genclip_model_latency_seconds", "Detector time per batch.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "genclip_queue_wait_seconds", "Time from admission to the start of the job's batch.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.jobs = Counter(
            "genclip_jobs", "Jobs finished by workers, by outcome.", ["outcome"], registry=r,
        )

        self.records_written = Counter(
            "genclip_records_written", "Inspection records written to the database.", registry=r,
        )
        self.records_write_errors = Counter(
            "genclip_records_write_errors", "Failed database writes of record batches (retried).", registry=r,
        )
        self.records_dropped = Counter(
            "genclip_records_dropped", "Inspection records lost (never written), by reason.",
            ["reason"], registry=r,
        )
        self.records_buffered = Gauge(
            "genclip_records_buffered", "Inspection records waiting to be written.", registry=r,
        )
        self.records_media_skipped = Counter(
            "genclip_records_media_skipped", "Records kept without their images, by reason.",
            ["reason"], registry=r,
        )
        self.records_media_bytes = Gauge(
            "genclip_records_media_bytes", "Bytes of kept images and heatmaps in the records directory.",
            registry=r,
        )
        self.product_drift = Gauge(
            "genclip_product_drift", "Median score of good-decided parts over the last 24 h minus the "
            "product's calibration median.", ["product"], registry=r,
        )
        self.product_drifting = Gauge(
            "genclip_product_drifting", "1 when the product's drift is past the drift limit.",
            ["product"], registry=r,
        )
        self.product_good_median = Gauge(
            "genclip_product_good_median", "Median score of good-decided parts over the last 24 h.",
            ["product"], registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
