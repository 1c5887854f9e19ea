"""FastAPI application factory: ``create_app(settings)``.

The app is assembled from one router per HTTP resource (:mod:`service.routers`), the JSON
error handlers (:mod:`service.errors`), two ASGI middlewares (request metrics outermost, then
the upload guard of the upload routes, :func:`upload_routes`) and the process state
(:mod:`service.state`: queue, inline worker, CPU pool, admission, memory budget), started and
stopped by the lifespan. Served by :func:`service.http_server.build_server`, whose protocol
guards (timeouts, sizes, shedding) answer some requests before the app sees them: those
answers are counted in the app's metrics through ``app.state.record_early_answer``.

The detector runs in a worker: inline in this process (in-process queue, or Redis with
``workers_inline``) and/or in ``genclip worker`` processes fed through Redis Streams.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline

from service.auth import ApiKeyAuth
from service.errors import error_body, install_error_handlers
from service.form_fields import forbid_undeclared_form_fields, reject_unknown_fields
from service.metrics import Metrics
from service.request_metrics import RequestMetrics, endpoint_label
from service.routers import inspection, inspections, operations, product_stats, products, ui
from service.schemas import COMMON_ERROR_RESPONSES
from service.settings import MULTIPART_OVERHEAD, Settings
from service.state import ServiceState
from service.thresholds import Thresholds
from service.upload_guard import Refusal, UploadGuard, UploadRoute, UploadSlots, UploadTicket

API_VERSION = "1.0.0"
# Time a good-photo upload may spend validating and storing its photos (beyond the body read
# and the calibration wait) before the guard answers 504.
GOOD_UPLOAD_PROCESSING_S = 120.0


def upload_routes(settings: Settings) -> list[UploadRoute]:
    """The multipart upload routes the upload guard protects (one entry per upload route)."""
    return [
        UploadRoute("POST", "/inspect", settings.max_body_bytes, admit=True, deadline_s=settings.job_timeout_s),
        # Good photos: a rebuild job goes to the workers, so admission applies before the body
        # is read; the route waits for the calibration at most calibration_wait_s (then 202)
        # after the body (at most body_timeout_s) has been validated and stored.
        UploadRoute(
            "POST", "/products/{name}/good", settings.max_good_upload_bytes + MULTIPART_OVERHEAD, admit=True,
            deadline_s=settings.body_timeout_s + settings.calibration_wait_s + GOOD_UPLOAD_PROCESSING_S,
        ),
    ]


def create_app(
    settings: Settings | None = None,
    *,
    detector: Any = None,
    start_worker: bool | None = None,
) -> FastAPI:
    """Build the ASGI app.

    Args:
        settings: configuration (default: from ``GENCLIP_*`` environment variables).
        detector: an already built detector for the inline worker (default: built from the
            settings at start-up, off the event loop; failures abort start-up with the model's
            error, e.g. ``WeightsNotFoundError`` naming the missing file).
        start_worker: force the inline worker on/off (default: on without Redis, else
            ``settings.workers_inline``).
    """
    settings = settings or Settings()
    thresholds = Thresholds.load(settings.thresholds_file, settings.default_threshold)
    auth = ApiKeyAuth(settings.api_keys)
    metrics = Metrics()
    state = ServiceState(settings, metrics, detector=detector, start_worker=start_worker)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPIOffline(
        title="GenCLIP inspection service",
        version=API_VERSION,
        description=(
            "Zero-shot industrial visual inspection. POST a part's photo to `/inspect`; get an "
            "anomaly score, a decision against the class threshold and a heatmap PNG."
        ),
        lifespan=lifespan,
        responses=COMMON_ERROR_RESPONSES,
        dependencies=[Depends(reject_unknown_fields)],
    )
    generate_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:  # generated once, then cached by FastAPI
            forbid_undeclared_form_fields(generate_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.state.service = state
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.thresholds = thresholds

    slots = UploadSlots(settings.inflight_limit)
    app.state.upload_slots = slots
    app.add_middleware(
        UploadGuard,
        routes=upload_routes(settings),
        authorize=auth.check_scope,
        error_body=error_body,
        admit=state.admission.precheck,
        slots=slots,
        retry_after_ms=settings.retry_after_s * 1000,
        on_reject=lambda reason: metrics.rejections.labels(reason).inc(),
    )
    routers = [
        inspection.build_router(settings, auth),
        products.build_router(settings, auth),
        operations.build_router(settings),
        inspections.build_router(settings, auth),
        product_stats.build_router(settings, auth),
        ui.build_router(settings, auth),
    ]
    static_paths = frozenset(route.path for router in routers for route in router.routes if "{" not in route.path)
    app.add_middleware(RequestMetrics, metrics=metrics, static_paths=static_paths)

    def record_early_answer(method: str, path: str, status: int, code: str) -> None:
        """Count an answer the HTTP protocol gave before the app saw the request."""
        metrics.requests.labels(endpoint_label(path, static_paths), method, str(status)).inc()
        if status == 503:
            metrics.rejections.labels(code).inc()

    admitted_routes = [route for route in upload_routes(settings) if route.admit]
    patterns = [(route.method, route.pattern()) for route in admitted_routes]

    def early_admission(method: str, path: str) -> Refusal | UploadTicket | None:
        """For the HTTP protocol: refuse an upload from its headers while no upload slot is free
        or the queue is known full; else let it through with a ticket on the slots."""
        if not any(method == m and pattern.match(path) for m, pattern in patterns):
            return None
        if slots.full():
            return slots.refusal(settings.retry_after_s * 1000)
        return state.admission.peek() or slots.ticket()

    app.state.record_early_answer = record_early_answer
    app.state.early_admission = early_admission
    install_error_handlers(app)
    for router in routers:
        app.include_router(router)
    ui.mount_static(app)
    return app
