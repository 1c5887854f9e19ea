"""Admission control: never accept more work than can be answered within the deadline.

One policy for both transports, applied twice: by the upload guard before the body is read
(:meth:`Admission.precheck`, so an overloaded service sheds a request before parsing and
decoding it) and by the route when it enqueues the job (:meth:`Admission.submit`, where the
transport checks the depth limit atomically with the enqueue).

A request is refused (503, with a retry delay) when:

* ``no_worker``: no live detector worker (heartbeat expired, none started);
* ``stalled``: jobs are waiting and no live worker made progress (polled the queue or finished
  a batch) within the heartbeat window, or is in a batch not yet 3 x longer than its usual
  ones (a first batch: up to the job deadline): a worker that only proves it is alive does
  not count;
* ``queue_full``: the queue ahead of the job would not drain in time. The depth limit is
  ``queue_max_depth``, lowered to ``rate x (remaining x admission_headroom - batch time)``
  once the workers' service rate is measured (:mod:`service.queue.progress`), where
  ``remaining`` is what is left of the request's deadline, counted from its arrival at the
  server (:mod:`service.http_server`), so time spent in front of the app counts too;
* the queue backend cannot be reached (``queue_unavailable``).

The retry delay of a ``queue_full`` answer is the time the workers need, at the measured rate,
to bring the queue back under the limit; otherwise ``retry_after_s``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from service.errors import ApiError
from service.metrics import Metrics
from service.queue.base import Job, JobQueue, PendingJob, QueueError, QueueFull
from service.queue.progress import QueueLoad
from service.settings import Settings
from service.upload_guard import Refusal

# A pre-body check may use a load this old (the enqueue re-checks the depth atomically).
PRECHECK_MAX_AGE_S = 0.05
RETRY_MIN_MS = 50
RETRY_MAX_MS = 30_000


class ServiceStarting(QueueError):
    reason = "starting"


class Admission:
    """The admission policy of one API process (see the module docstring)."""

    def __init__(self, settings: Settings, queue: Callable[[], JobQueue | None], metrics: Metrics) -> None:
        self.settings = settings
        self._queue = queue
        self.metrics = metrics
        self.default_retry_ms = settings.retry_after_s * 1000
        self._cached: tuple[float, QueueLoad] | None = None
        self._refreshing: asyncio.Future[QueueLoad] | None = None
        # uploads peek() let through since the cached load was read: they are on their way to
        # the queue (body, parsing, decoding) but not in its depth yet
        self._passed_since_load = 0

    async def _load(self, max_age_s: float) -> QueueLoad:
        """The queue's load, at most ``max_age_s`` old; concurrent callers share one refresh
        (a burst of requests costs one Redis round trip, not one each)."""
        queue = self._queue()
        if queue is None:
            raise ServiceStarting("the service is starting")
        if self._cached is not None and time.monotonic() - self._cached[0] <= max_age_s:
            return self._cached[1]
        return await asyncio.shield(self._start_refresh(queue))

    def _start_refresh(self, queue: JobQueue) -> asyncio.Future[QueueLoad]:
        """The refresh in flight, or a new one."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(queue.load())
            self._refreshing.add_done_callback(self._refreshed)
        return self._refreshing

    def _refreshed(self, future: asyncio.Future[QueueLoad]) -> None:
        if not future.cancelled() and future.exception() is None:
            self._cached = (time.monotonic(), future.result())
            self._passed_since_load = 0

    def limit(self, load: QueueLoad, remaining_s: float) -> int:
        """Depth at or above which a job with ``remaining_s`` of deadline is refused."""
        limit = self.settings.queue_max_depth
        rate = load.rate
        if rate:
            batch_s = max((w.progress.batch_s or 0.0 for w in load.workers if w.progress), default=0.0)
            budget_s = remaining_s * self.settings.admission_headroom - batch_s
            limit = max(1, min(limit, math.floor(rate * budget_s)))
        return limit

    def retry_after_ms(self, load: QueueLoad | None, excess: int = 1) -> int:
        """How long until ``excess`` jobs have left the queue, at the measured rate."""
        rate = load.rate if load is not None else None
        if not rate:
            return self.default_retry_ms
        return int(min(RETRY_MAX_MS, max(RETRY_MIN_MS, 1000.0 * excess / rate)))

    def decide(self, load: QueueLoad, remaining_s: float, on_the_way: int = 0) -> Refusal | None:
        """The verdict for one more job with ``remaining_s`` of deadline, ``on_the_way`` jobs
        already admitted but not yet in ``load.depth``."""
        window = self.settings.heartbeat_ttl_s
        if not load.workers:
            return Refusal("no_worker", "no live detector worker", retry_after_ms=self.default_retry_ms)
        if load.stalled(window, first_batch_s=self.settings.job_timeout_s):
            return Refusal(
                "stalled",
                f"{load.depth} job(s) waiting and no detector worker made progress in the last {window:g} s",
                retry_after_ms=self.default_retry_ms,
            )
        limit = self.limit(load, remaining_s)
        depth = load.depth + on_the_way
        if depth >= limit:
            return Refusal(
                "queue_full",
                f"queue full: {depth} jobs waiting, in progress or on their way, admitting below {limit} "
                f"(what the workers can answer within the deadline)",
                retry_after_ms=self.retry_after_ms(load, depth - limit + 1),
            )
        return None

    def peek(self) -> Refusal | None:
        """The verdict for a request arriving now from the last known load, without waiting for
        Redis: a refusal only while that load is fresh (at most :data:`PRECHECK_MAX_AGE_S` old),
        else ``None`` (the full :meth:`precheck` decides, and refreshes the load).

        The uploads let through since that load was read count as queued: without them, at a
        high arrival rate every request of the cache's lifetime passes here while the queue
        sits one below its limit, and is refused later by :meth:`submit`, after its body was
        read, parsed and decoded: the slow 503s of an overload."""
        cached = self._cached
        age = time.monotonic() - cached[0] if cached is not None else math.inf
        queue = self._queue()
        if age > PRECHECK_MAX_AGE_S / 2 and queue is not None:
            # refresh ahead, so that under traffic the next requests find a fresh load here and
            # are not sent to the slower precheck (an ASGI task waiting for the refresh)
            self._start_refresh(queue)
        if cached is None or age > PRECHECK_MAX_AGE_S:
            return None
        refusal = self.decide(cached[1], self.settings.job_timeout_s, self._passed_since_load)
        if refusal is None:
            self._passed_since_load += 1
        return refusal

    async def precheck(self, scope: MutableMapping[str, Any]) -> Refusal | None:
        """Before the body is read (upload guard): refusal, or ``None`` to go on."""
        arrived = scope.get("genclip.t0_wall", time.time())
        remaining = arrived + self.settings.job_timeout_s - time.time()
        try:
            load = await self._load(PRECHECK_MAX_AGE_S)
        except QueueError as exc:
            return Refusal(exc.reason, str(exc), retry_after_ms=self.default_retry_ms)
        return self.decide(load, remaining)

    async def submit(self, job: Job, file_bytes: bytes | None = None) -> PendingJob:
        """Admit and enqueue ``job`` (its deadline already set), or raise :class:`ApiError` 503."""
        queue = self._queue()
        try:
            if queue is None:
                raise ServiceStarting("the service is starting")
            load = await self._load(PRECHECK_MAX_AGE_S)
            refusal = self.decide(load, job.deadline - time.time())
            if refusal is not None:
                self._reject(refusal.code)
                raise ApiError(503, refusal.code, refusal.message, retry_after_ms=refusal.retry_after_ms)
            return await queue.submit(job, file_bytes=file_bytes, max_depth=self.limit(load, job.deadline - time.time()))
        except QueueFull as exc:
            retry_ms = self.retry_after_ms(self._cached[1] if self._cached is not None else None)
            self._cached = None
            self._reject(exc.reason)
            raise ApiError(503, exc.reason, str(exc), retry_after_ms=retry_ms) from exc
        except QueueError as exc:
            self._cached = None
            self._reject(exc.reason)
            raise ApiError(503, exc.reason, str(exc), retry_after_ms=self.default_retry_ms) from exc

    def _reject(self, reason: str) -> None:
        self.metrics.rejections.labels(reason).inc()
