"""FastAPI application factory: ``create_app(settings)``.

Request path of ``POST /inspect``::

    UploadGuard (ASGI: API key, multipart content type, body size - before parsing)
      -> multipart parse -> part content type -> decode + validate (thread pool)
      -> queue.submit (admission: 503) -> await the job's own result (deadline: 504)
      -> threshold -> heatmap PNG render (thread pool) -> JSON or image/png

The detector runs in a worker: inline in this process (in-process queue, or Redis with
``workers_inline``) and/or in ``genclip worker`` processes fed through Redis Streams.
"""


import asyncio
import base64
import concurrent.futures
import functools
import logging
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import heatmap as heatmap_mod
from service.auth import ApiKeyAuth
from service.image_input import (
    MULTIPART_OVERHEAD,
    ImageRejected,
    UploadGuard,
    check_part_content_type,
    decode_image,
)
from service.metrics import CONTENT_TYPE_LATEST, Metrics
from service.queue.base import (
    ERROR_STATUS,
    Job,
    JobQueue,
    JobResult,
    NoWorkerAvailable,
    QueueError,
)
from service.queue.inprocess import InProcessQueue
from service.schemas import (
    ERROR_RESPONSES,
    ErrorResponse,
    HealthResponse,
    HeatmapMode,
    InspectResponse,
    ReadyResponse,
    TimingMs,
    WorkerStatus,
)
from service.settings import Settings
from service.thresholds import Thresholds
from service.worker import BatchWorker, default_worker_id, load_detector

log = logging.getLogger(__name__)

API_VERSION = "1.0.0"
KNOWN_ENDPOINTS = frozenset({"/inspect", "/health", "/ready", "/metrics", "/docs", "/openapi.json"})
_STATUS_CODES = {
    400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
    406: "not_acceptable", 413: "payload_too_large", 415: "unsupported_media_type",
    422: "validation_error", 500: "internal_error", 503: "service_unavailable",
    504: "deadline_exceeded",
}


class ApiError(HTTPException):
    """An HTTP error with a machine-readable code (rendered as :class:`ErrorResponse`)."""

    def __init__(self, status: int, code: str, message: str, *, headers: dict | None = None,
                 job_id: str | None = None) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code
        self.job_id = job_id


def error_body(status: int, code: str, message: str, job_id: str | None = None, detail: Any = None) -> bytes:
    return ErrorResponse(error=code, message=message, status=status, id=job_id, detail=detail) \
        .model_dump_json(exclude_none=True).encode()


def _error_response(status: int, code: str, message: str, *, headers: dict | None = None,
                    job_id: str | None = None, detail: Any = None) -> Response:
    return Response(error_body(status, code, message, job_id, detail), status_code=status,
                    media_type="application/json", headers=headers)


def prefers_png(accept: str | None) -> bool:
    """Whether the Accept header ranks image/png above application/json (ties: JSON)."""
    if not accept:
        return False
    q: dict[str, float] = {}
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        weight = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        q[media.lower()] = max(weight, q.get(media.lower(), 0.0))

    def best(*names: str) -> float:
        for name in names:
            if name in q:
                return q[name]
        return 0.0

    return best("image/png", "image/*", "*/*") > best("application/json", "application/*", "*/*")


def _header_text(value: str) -> str:
    return quote(value, safe=" !#$&'()*+,-./:;<=>?@[]^_`{|}~")


class RequestMetrics:
    """Outermost ASGI middleware: counts requests by endpoint/status and times them."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        scope["genclip.t0"] = start
        scope["genclip.t0_wall"] = time.time()
        path = scope["path"]
        endpoint = path if path in KNOWN_ENDPOINTS else "other"
        status = 500

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
            if endpoint == "/inspect":
                self.metrics.request_latency.labels(endpoint).observe(time.perf_counter() - start)


class ServiceState:
    """What the app holds between start-up and shutdown."""

    def __init__(self, settings: Settings, metrics: Metrics, detector: Any = None,
                 start_worker: bool | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._detector = detector
        self.start_worker = settings.run_inline_worker if start_worker is None else start_worker
        self.queue: JobQueue | None = None
        self.worker: BatchWorker | None = None
        self.worker_task: asyncio.Task | None = None
        self._worker_source: Any = None
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.cpu_threads, thread_name_prefix="genclip-cpu"
        )

    async def run_cpu(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    async def start(self) -> None:
        s = self.settings
        if s.redis_url:
            from service.queue.redis_streams import RedisJobQueue

            self.queue = RedisJobQueue(s)
        else:
            self.queue = InProcessQueue(s.queue_max_depth)
        await self.queue.start()
        if not self.start_worker:
            return
        detector = self._detector
        if detector is None:
            log.info("loading detector %s on %s (backbone %s)", s.detector, s.device, s.backbone)
            detector = await asyncio.to_thread(load_detector, s)
        worker_id = s.worker_id or f"inline-{default_worker_id()}"
        if s.redis_url:
            from service.queue.redis_streams import RedisWorkSource

            source: Any = RedisWorkSource(s, consumer=worker_id)
            self._worker_source = source
            heartbeat = s.heartbeat_interval_s
        else:
            source, heartbeat = self.queue, None
        self.worker = BatchWorker(
            source, detector, max_batch=s.max_batch, max_wait_s=s.max_wait_ms / 1000.0,
            worker_id=worker_id, metrics=self.metrics, heartbeat_interval_s=heartbeat,
        )
        self.worker_task = asyncio.create_task(self.worker.run(), name="inline-worker")
        self.worker_task.add_done_callback(self._worker_done)
        for _ in range(500):  # until registered (a few loop turns; Redis: one round trip)
            if self.worker.running or self.worker_task.done():
                break
            await asyncio.sleep(0.01)
        if self.worker_task.done() and self.worker_task.exception():
            raise RuntimeError("inline worker failed to start") from self.worker_task.exception()

    def _worker_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("inline worker died: %r", task.exception(), exc_info=task.exception())

    async def stop(self) -> None:
        if self.worker is not None and self.worker_task is not None:
            self.worker.stop()
            try:
                await asyncio.wait_for(asyncio.shield(self.worker_task), self.settings.graceful_shutdown_s)
            except (TimeoutError, Exception):
                self.worker_task.cancel()
        if self._worker_source is not None:
            await self._worker_source.close()
        if self.queue is not None:
            await self.queue.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


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
    )
    app.state.service = state
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.thresholds = thresholds

    async def admit() -> tuple[str, str] | None:
        queue = state.queue
        if queue is None:
            return "starting", "the service is starting"
        try:
            depth = await queue.depth()
        except QueueError as exc:
            return exc.reason, str(exc)
        if depth >= settings.queue_max_depth:
            return "queue_full", f"queue full ({depth} jobs waiting or in progress)"
        return None

    app.add_middleware(
        UploadGuard,
        path="/inspect",
        max_body_bytes=settings.max_upload_bytes + MULTIPART_OVERHEAD,
        authorize=auth.check_scope,
        error_body=lambda status, code, message: error_body(status, code, message),
        drain_bytes=2 * (settings.max_upload_bytes + MULTIPART_OVERHEAD),
        admit=admit,
        max_inflight=settings.inflight_limit,
        retry_after_s=settings.retry_after_s,
        on_reject=lambda reason: metrics.rejections.labels(reason).inc(),
    )
    app.add_middleware(RequestMetrics, metrics=metrics)

    # ------------------------------------------------------------------ error handlers
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = getattr(exc, "code", None) or _STATUS_CODES.get(exc.status_code, "error")
        return _error_response(exc.status_code, code, str(exc.detail), headers=exc.headers,
                               job_id=getattr(exc, "job_id", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        message = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:] or e['loc'])}: {e['msg']}" for e in errors
        ) or "invalid request"
        return _error_response(422, "validation_error", message, detail=jsonable_encoder(errors))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(500, "internal_error", f"internal error: {type(exc).__name__}")

    # ------------------------------------------------------------------ routes
    inspect_deps = [Depends(auth.dependency())] if auth.enabled else []
    retry_after = {"Retry-After": str(settings.retry_after_s)}

    @app.post(
        "/inspect",
        response_model=InspectResponse,
        responses={
            200: {
                "description": "Inspection result (JSON), or the heatmap PNG itself when "
                "`Accept: image/png` (fields in `X-Anomaly-*` headers).",
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            },
            406: {"model": ErrorResponse, "description": "Accept: image/png with heatmap=none."},
            **ERROR_RESPONSES,
        },
        dependencies=inspect_deps,
        summary="Inspect one part image",
        tags=["inspection"],
    )
    async def inspect(
        request: Request,
        image: Annotated[UploadFile, File(description="The part's photo: JPEG, PNG, BMP or TIFF.")],
        class_name: Annotated[
            str | None,
            Form(max_length=settings.max_class_name_length,
                 description="Product name (e.g. `bottle`); optional."),
        ] = None,
        heatmap: Annotated[
            HeatmapMode,
            Query(description="`png`: coloured map; `overlay`: map blended over the image; `none`."),
        ] = HeatmapMode.png,
    ) -> Response:
        t0 = request.scope.get("genclip.t0", time.perf_counter())
        want_png = prefers_png(request.headers.get("accept"))
        if want_png and heatmap is HeatmapMode.none:
            raise ApiError(406, "not_acceptable", "Accept: image/png needs a heatmap (heatmap=png or overlay)")
        if class_name is not None:
            if any(ord(ch) < 32 or ord(ch) == 127 for ch in class_name):
                raise ApiError(422, "validation_error", "class_name: control characters are not allowed")
            class_name = " ".join(class_name.split()) or None
        queue = state.queue
        assert queue is not None
        data = await image.read()
        try:
            check_part_content_type(image.content_type)
            if len(data) > settings.max_upload_bytes:
                raise ImageRejected(413, "payload_too_large",
                                    f"image file is {len(data)} bytes, the limit is {settings.max_upload_bytes}")
            decoded = await state.run_cpu(
                decode_image, data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels
            )
        except ImageRejected as exc:
            raise ApiError(exc.status, exc.code, exc.message) from exc
        finally:
            await image.close()

        # the deadline runs from the request's arrival: time spent uploading and decoding counts
        arrived = request.scope.get("genclip.t0_wall", time.time())
        job = Job(id=uuid.uuid4().hex, class_name=class_name,
                  deadline=arrived + settings.job_timeout_s, image=decoded.image)
        if job.expired():
            raise ApiError(504, "deadline_exceeded",
                           f"the request's deadline ({settings.job_timeout_s:g} s) passed before queueing",
                           job_id=job.id)
        try:
            pending = await queue.submit(job, file_bytes=data)
        except QueueError as exc:
            metrics.rejections.labels(exc.reason).inc()
            raise ApiError(503, exc.reason, str(exc), headers=retry_after) from exc
        del data
        try:
            result = await pending.result(timeout=job.deadline - time.time())
        except TimeoutError:
            pending.cancel()
            raise ApiError(504, "deadline_exceeded",
                           f"no result within the job deadline ({settings.job_timeout_s:g} s)",
                           job_id=job.id) from None
        except NoWorkerAvailable as exc:
            raise ApiError(503, exc.reason, str(exc), headers=retry_after, job_id=job.id) from exc
        except QueueError as exc:
            raise ApiError(503, exc.reason, str(exc), headers=retry_after, job_id=job.id) from exc
        except asyncio.CancelledError:  # client went away
            pending.cancel()
            raise
        if not result.ok:
            status = ERROR_STATUS.get(result.error or "", 500)
            raise ApiError(status, result.error or "inference_failed", result.message, job_id=job.id)
        return await _respond(job, result, decoded.image, heatmap, want_png, t0)

    async def _respond(job: Job, result: JobResult, image: Any, mode: HeatmapMode, want_png: bool,
                       t0: float) -> Response:
        threshold = thresholds.for_class(job.class_name, result.class_label)
        png: bytes | None = None
        if mode is not HeatmapMode.none and result.anomaly_map is not None:
            r0 = time.perf_counter()
            if mode is HeatmapMode.overlay:
                png = await state.run_cpu(heatmap_mod.overlay_png, result.anomaly_map, image)
            else:
                png = await state.run_cpu(heatmap_mod.heatmap_png, result.anomaly_map)
            metrics.heatmap_render.observe(time.perf_counter() - r0)
        identity = result.identity
        total_ms = (time.perf_counter() - t0) * 1000.0
        timing = TimingMs(queue=round(result.queue_ms, 3), model=round(result.model_ms, 3),
                          total=round(total_ms, 3))
        is_anomalous = result.score >= threshold
        if want_png:
            if png is None:
                raise ApiError(500, "internal_error", "the worker returned no anomaly map", job_id=job.id)
            headers = {
                "X-Anomaly-Id": job.id,
                "X-Anomaly-Score": repr(result.score),
                "X-Anomaly-Is-Anomalous": "true" if is_anomalous else "false",
                "X-Anomaly-Threshold": repr(threshold),
                "X-Anomaly-Class-Label": _header_text(result.class_label),
                "X-Anomaly-Detector": str(identity.get("name", "")),
                "X-Anomaly-Backbone": str(identity.get("backbone", "")),
                "X-Anomaly-Checkpoint": str(identity.get("checkpoint") or ""),
                "X-Anomaly-Timing-Queue-Ms": f"{timing.queue:.3f}",
                "X-Anomaly-Timing-Model-Ms": f"{timing.model:.3f}",
                "X-Anomaly-Timing-Total-Ms": f"{timing.total:.3f}",
                "X-Worker-Id": result.worker,
            }
            if job.class_name is not None:
                headers["X-Anomaly-Class-Name"] = _header_text(job.class_name)
            if result.component_scores:
                headers["X-Anomaly-Component-Scores"] = ",".join(
                    f"{_header_text(k)}={v!r}" for k, v in result.component_scores.items()
                )
            return Response(png, media_type="image/png", headers=headers)
        body: dict[str, Any] = {
            "id": job.id,
            "score": result.score,
            "is_anomalous": is_anomalous,
            "threshold": threshold,
            "class_label": result.class_label,
            "class_name": job.class_name,
            "heatmap_png": base64.b64encode(png).decode("ascii") if png is not None else None,
            "detector": identity.get("name", ""),
            "backbone": identity.get("backbone", ""),
            "checkpoint": identity.get("checkpoint"),
            "timing_ms": timing.model_dump(),
        }
        if result.component_scores:
            body["component_scores"] = result.component_scores
        return JSONResponse(body, headers={"X-Worker-Id": result.worker})

    @app.get("/health", response_model=HealthResponse, tags=["operations"], summary="Process alive")
    async def health() -> HealthResponse:
        return HealthResponse()

    @app.get("/ready", response_model=ReadyResponse, tags=["operations"],
             responses={503: {"model": ReadyResponse}},
             summary="Detector loaded somewhere and queue reachable")
    async def ready() -> Response:
        queue = state.queue
        body = ReadyResponse(status="not_ready", transport=settings.transport, detector=None)
        if queue is None:
            body.reason = "starting"
        elif not await queue.ping():
            body.reason = "queue backend unreachable"
        else:
            try:
                workers = await queue.workers()
                body.queue_depth = await queue.depth()
            except Exception as exc:
                workers, body.reason = [], f"queue error: {exc}"
            body.workers = [WorkerStatus(worker_id=w.worker_id, identity=w.identity) for w in workers]
            if workers:
                body.status = "ready"
                body.detector = workers[0].identity
            elif body.reason is None:
                body.reason = "no live detector worker"
        code = 200 if body.status == "ready" else 503
        headers = None if code == 200 else retry_after
        content = {k: v for k, v in body.model_dump(mode="json").items() if v is not None}
        return JSONResponse(content, status_code=code, headers=headers)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics",
             response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus_metrics() -> Response:
        if state.queue is not None:
            try:
                metrics.queue_depth.set(await state.queue.depth())
            except Exception:  # scrape still works when Redis is down
                pass
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
