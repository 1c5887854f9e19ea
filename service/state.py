"""What one API process holds between start-up and shutdown: database, queue, inline worker,
CPU pool, admission control, the decoded-image memory budget, inspection recorder and drift
monitor."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from collections.abc import Callable
from typing import Any

from service.admission import Admission
from service.db.database import Database, open_database
from service.limits import ByteBudget
from service.metrics import Metrics
from service.products.resolver import ProductResolver
from service.queue.base import JobQueue
from service.queue.inprocess import InProcessQueue
from service.records.drift import DriftMonitor
from service.records.recorder import NullRecorder, Recorder
from service.settings import Settings
from service.worker import BatchWorker, default_worker_id, load_detector

log = logging.getLogger(__name__)


class ServiceState:
    """The database, the queue (API side), the optional inline worker and the CPU thread pool."""

    def __init__(self, settings: Settings, metrics: Metrics, detector: Any = None,
                 start_worker: bool | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._detector = detector
        self.start_worker = settings.run_inline_worker if start_worker is None else start_worker
        self.database: Database | None = None
        self.products: ProductResolver | None = None
        self.recorder: Recorder | NullRecorder = NullRecorder()
        self.drift: DriftMonitor | None = None
        self.queue: JobQueue | None = None
        self.worker: BatchWorker | None = None
        self.worker_task: asyncio.Task | None = None
        self._worker_source: Any = None
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.cpu_threads, thread_name_prefix="genclip-cpu"
        )
        self.admission = Admission(settings, lambda: self.queue, metrics)
        self.decoded_budget = ByteBudget(settings.decoded_bytes_budget, retry_after_ms=settings.retry_after_s * 1000)

    async def run_cpu(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run blocking work (decode, PNG encode) in the pool, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))

    async def start(self) -> None:
        s = self.settings
        self.database = await asyncio.to_thread(open_database, s.database_url, s.database_migrate)
        self.products = ProductResolver(self.database, ttl_s=s.product_cache_ttl_s)
        if s.records_enabled:
            self.recorder = Recorder(s, self.database, self.metrics)
            await self.recorder.start()
            self.drift = DriftMonitor(s, self.database, self.metrics)
            await self.drift.start()
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
        from service.products.worker_jobs import worker_products  # imports the model (torch)

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
            products=worker_products(s, self.database, detector),
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
        if self.drift is not None:
            await self.drift.stop()
        await self.recorder.stop()  # after the last answer, before the database closes
        if self.database is not None:
            self.database.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
