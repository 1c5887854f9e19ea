"""In-process transport: an asyncio deque shared by the API and the inline worker.

The embedded default on one machine (no Redis URL). Jobs carry the decoded PIL image and
results come back as Python objects through one future per job: nothing is serialised.
Both sides must run on the same event loop (the inline worker does).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any

from service.queue.base import (
    Job,
    JobQueue,
    JobResult,
    NoWorkerAvailable,
    PendingJob,
    QueueFull,
    WorkerInfo,
    WorkSource,
)
from service.queue.progress import ProgressMeter, QueueLoad, WorkerLoad


class _InProcessPending(PendingJob):
    def __init__(self, job: Job, future: asyncio.Future[JobResult]) -> None:
        self.job = job
        self.future = future

    async def result(self, timeout: float) -> JobResult:
        if timeout <= 0 and not self.future.done():
            raise TimeoutError
        # shield: a timeout must not cancel the future the worker will complete
        return await asyncio.wait_for(asyncio.shield(self.future), timeout)

    def cancel(self) -> None:
        if not self.future.done():
            self.future.cancel()


class InProcessQueue(JobQueue, WorkSource):
    """Bounded asyncio queue; admission counts waiting + in-progress jobs."""

    name = "inprocess"

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self._items: collections.deque[tuple[Job, asyncio.Future[JobResult]]] = collections.deque()
        self._futures: dict[str, asyncio.Future[JobResult]] = {}
        self._available = asyncio.Event()
        self._running: set[str] = set()  # ids of jobs handed to a worker and not completed
        self._workers: dict[str, dict[str, Any]] = {}
        self._meters: dict[str, ProgressMeter] = {}

    # ------------------------------------------------------------------ API side
    async def submit(self, job: Job, file_bytes: bytes | None = None, *, max_depth: int | None = None) -> PendingJob:
        if not self._workers:
            raise NoWorkerAvailable("no detector worker is running")
        limit = self.max_depth if max_depth is None else min(max_depth, self.max_depth)
        depth = len(self._items) + len(self._running)
        if depth >= limit:
            raise QueueFull(f"queue full ({depth} jobs waiting or in progress, admitting below {limit})")
        future: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        self._items.append((job, future))
        self._futures[job.id] = future
        future.add_done_callback(lambda _f, jid=job.id: self._futures.pop(jid, None))
        self._available.set()
        return _InProcessPending(job, future)

    async def depth(self) -> int:
        return len(self._items) + len(self._running)

    async def load(self) -> QueueLoad:
        return QueueLoad(
            len(self._items) + len(self._running),
            [WorkerLoad(wid, dict(identity), self._meters[wid].snapshot() if wid in self._meters else None)
             for wid, identity in self._workers.items()],
        )

    async def workers(self) -> list[WorkerInfo]:
        return [WorkerInfo(wid, dict(identity)) for wid, identity in self._workers.items()]

    async def ping(self) -> bool:
        return True

    # ------------------------------------------------------------------ worker side
    async def register(self, worker_id: str, identity: dict[str, Any]) -> None:
        self._workers[worker_id] = dict(identity)

    def track_progress(self, worker_id: str, meter: ProgressMeter) -> None:
        self._meters[worker_id] = meter

    async def unregister(self, worker_id: str) -> None:
        self._workers.pop(worker_id, None)
        self._meters.pop(worker_id, None)
        if not self._workers:
            # nobody will serve what is queued or was in the stopped worker's hands: fail it now
            # rather than at its deadline
            while self._items:
                job, future = self._items.popleft()
                if not future.done():
                    future.set_exception(NoWorkerAvailable("the detector worker stopped"))
            for job_id in list(self._running):
                future = self._futures.get(job_id)
                if future is not None and not future.done():
                    future.set_exception(NoWorkerAvailable("the detector worker stopped during the job"))
            self._running.clear()

    async def receive(self, max_jobs: int, timeout: float) -> list[Job]:
        if not self._items and timeout > 0:
            self._available.clear()
            try:
                await asyncio.wait_for(self._available.wait(), timeout)
            except TimeoutError:
                pass
        jobs: list[Job] = []
        while self._items and len(jobs) < max_jobs:
            job, future = self._items.popleft()
            if future.done():  # the API gave up (deadline / client gone)
                continue
            jobs.append(job)
        if not self._items:
            self._available.clear()
        self._running.update(job.id for job in jobs)
        return jobs

    async def complete(self, results: Sequence[tuple[Job, JobResult]]) -> None:
        for job, result in results:
            self._running.discard(job.id)
            future = self._futures.get(job.id)
            if future is not None and not future.done():
                future.set_result(result)
