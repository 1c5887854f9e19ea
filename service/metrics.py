"""Prometheus metrics (prometheus-client), one registry per app / worker process.

A registry per instance (not the global default) keeps several apps in one process (tests,
``--workers-inline``) from colliding.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128, 256)

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]


class Metrics:
    """All service metrics.

    API: ``genclip_http_requests_total{endpoint,method,status}``,
    ``genclip_request_latency_seconds{endpoint}`` (end to end, /inspect),
    ``genclip_queue_depth``, ``genclip_rejections_total{reason}``,
    ``genclip_heatmap_render_seconds``.
    Worker (inline or ``genclip worker``): ``genclip_batch_size`` (jobs per detector call),
    ``genclip_model_latency_seconds`` (detector time per batch),
    ``genclip_queue_wait_seconds`` (admission to batch start),
    ``genclip_jobs_total{outcome}``.
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

    def render(self) -> bytes:
        return generate_latest(self.registry)
