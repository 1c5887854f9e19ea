"""Operations resources: ``/health`` (process alive), ``/ready`` (can serve), ``/metrics``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from service.errors import retry_after_headers
from service.metrics import CONTENT_TYPE_LATEST
from service.schemas import HealthResponse, ReadyResponse, WorkerStatus
from service.settings import Settings
from service.state import ServiceState


def build_router(settings: Settings) -> APIRouter:
    router = APIRouter(tags=["operations"])

    @router.get("/health", response_model=HealthResponse, summary="Process alive")
    async def health() -> HealthResponse:
        return HealthResponse()

    @router.get("/ready", response_model=ReadyResponse, responses={503: {"model": ReadyResponse}},
                summary="A detector worker serves the queue and the queue is reachable")
    async def ready(request: Request) -> Response:
        """Ready when the queue answers, a detector worker is alive, and, if jobs are waiting, a
        worker made progress (polled the queue or finished a batch) within the heartbeat window:
        a heartbeat alone only proves that a process lives."""
        state: ServiceState = request.app.state.service
        queue = state.queue
        body = ReadyResponse(status="not_ready", transport=settings.transport, detector=None)
        window = settings.heartbeat_ttl_s
        if queue is None:
            body.reason = "starting"
        elif not await queue.ping():
            body.reason = "queue backend unreachable"
        else:
            try:
                load = await queue.load()
            except Exception as exc:
                load, body.reason = None, f"queue error: {exc}"
            if load is not None:
                body.queue_depth = load.depth
                body.workers = [
                    WorkerStatus(
                        worker_id=w.worker_id, identity=w.identity,
                        progress_age_s=None if w.progress is None else round(w.progress.progress_age_s, 3),
                        jobs_per_s=None if w.progress is None or w.progress.rate is None else round(w.progress.rate, 3),
                    )
                    for w in load.workers
                ]
                if not load.workers:
                    body.reason = "no live detector worker"
                elif load.stalled(window, first_batch_s=settings.job_timeout_s):
                    body.reason = (f"{load.depth} job(s) waiting and no detector worker made progress "
                                   f"in the last {window:g} s")
                else:
                    body.status = "ready"
                    body.detector = load.workers[0].identity
        code = 200 if body.status == "ready" else 503
        headers = None if code == 200 else retry_after_headers(settings.retry_after_s * 1000)
        content = {k: v for k, v in body.model_dump(mode="json", exclude_none=True).items()}
        if "detector" not in content:
            content["detector"] = None
        return JSONResponse(content, status_code=code, headers=headers)

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response,
                responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    async def prometheus_metrics(request: Request) -> Response:
        state: ServiceState = request.app.state.service
        loop_lag = getattr(request.app.state, "loop_lag", None)  # set when served by service.http_server
        if loop_lag is not None:
            state.metrics.loop_lag.set(loop_lag.current())
        if state.queue is not None:
            try:
                state.metrics.queue_depth.set(await state.queue.depth())
            except Exception:  # scrape still works when Redis is down
                pass
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return router
