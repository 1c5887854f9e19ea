"""Outermost ASGI middleware: counts and times requests by route template and status."""

from __future__ import annotations

import time
from typing import Any

from service.metrics import Metrics


def endpoint_label(path: str, static_paths: frozenset[str]) -> str:
    """The ``endpoint`` label of a request not routed (yet): its path if a parameter-free route."""
    return path if path in static_paths else "other"


class RequestMetrics:
    """Counts every HTTP request (``genclip_http_requests_total``) and stamps its arrival.

    ``scope["genclip.t0"]`` (monotonic) and ``scope["genclip.t0_wall"]`` (epoch seconds) mark
    when the request arrived: set by the HTTP protocol when the first byte was parsed (see
    :mod:`service.http_server`), else here; deadlines and ``timing_ms.total`` run from there.
    The ``endpoint`` label is the matched route's template (``/products/{name}``), or
    ``other`` for unmatched paths, so label cardinality stays bounded whatever clients send.
    A request answered before routing (e.g. refused by the upload guard) is labelled by its
    path when that path is one of the app's parameter-free routes.
    """

    def __init__(self, app: Any, metrics: Metrics, static_paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.static_paths = static_paths

    def _endpoint(self, scope: dict) -> str:
        route = scope.get("route")
        if getattr(route, "path", None):
            return route.path
        return endpoint_label(scope["path"], self.static_paths)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        # the HTTP protocol (service.http_server) stamps the arrival earlier when it serves us
        scope.setdefault("genclip.t0", start)
        scope.setdefault("genclip.t0_wall", time.time())
        status = 500

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            endpoint = self._endpoint(scope)
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            self.metrics.request_latency.labels(endpoint).observe(time.perf_counter() - scope["genclip.t0"])
