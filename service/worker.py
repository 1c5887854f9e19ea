"""Batching worker loop, transport-agnostic, plus the standalone ``genclip worker`` process.

Policy (as Triton / TorchServe / Ray Serve): wait for a first job, then keep taking jobs until
``max_batch`` are in hand or ``max_wait_ms`` has passed since the first, run the detector once
for the batch, answer every job with its own result. Jobs past their deadline are answered
``deadline_exceeded`` without inference. If the detector fails on a batch, the batch is retried
one image at a time so that one poisonous image fails alone; every job gets an answer.

The detector is synchronous and not thread-safe: it runs in a dedicated one-thread executor,
the asyncio loop stays free for transport I/O and heartbeats (which also keep the entries of
a long batch from being reclaimed by other workers).

Run a standalone Redis worker with ``genclip worker`` or ``python -m service.worker``
(configuration from ``GENCLIP_*``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import importlib
import logging
import math
import os
import signal
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from service.metrics import Metrics
from service.queue.base import (
    ERROR_BAD_JOB,
    ERROR_EXPIRED,
    ERROR_INFERENCE,
    ERROR_PRODUCT_GONE,
    JOB_INSPECT,
    Job,
    JobResult,
    WorkSource,
)
from service.queue.progress import ProgressMeter
from service.settings import Settings

log = logging.getLogger(__name__)


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def map_to_uint8(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Quantise a [0, 1] float map to uint8 (H, W), resizing to ``size`` = (W, H) if needed."""
    amap = np.asarray(anomaly_map, dtype=np.float32)
    if amap.ndim > 2:
        amap = np.squeeze(amap)
    if amap.ndim != 2:
        raise ValueError(f"anomaly map must be 2-D, got shape {amap.shape}")
    width, height = size
    if amap.shape != (height, width):
        amap = np.asarray(
            Image.fromarray(amap, mode="F").resize((width, height), Image.Resampling.BILINEAR)
        )
    amap = np.nan_to_num(amap, nan=0.0, posinf=1.0, neginf=0.0)
    return (np.clip(amap, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def load_detector(settings: Settings) -> Any:
    """The detector the settings select (``detector_factory`` or ``model.factory``)."""
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    if settings.detector_factory:
        module_name, _, attr = settings.detector_factory.partition(":")
        factory = getattr(importlib.import_module(module_name), attr or "build_detector")
        return factory(settings)
    from model.factory import build_detector

    config = settings.detector_config()
    if settings.calibration_product and settings.precision == "int8":
        config = dataclasses.replace(config, calibration_photos=tuple(product_calibration_photos(settings)))
    return build_detector(config)


def product_calibration_photos(settings: Settings) -> list[Image.Image]:
    """The good photos of ``settings.calibration_product``, decoded, for int8 calibration.

    Raises:
        model.errors.CalibrationDataError: no such product, or it has no photo.
    """
    from model.errors import CalibrationDataError
    from service.db.database import open_database
    from service.image_input import decode_image
    from service.products import repository
    from service.products.repository import ProductNotFound

    name = settings.calibration_product
    database = open_database(settings.database_url, settings.database_migrate, threads=1)
    try:
        photos = database.transaction(lambda s: repository.load_images(s, repository.get_product(s, name).id))
    except ProductNotFound:
        raise CalibrationDataError(f"GENCLIP_CALIBRATION_PRODUCT={name!r}: no such product") from None
    finally:
        database.close()
    if not photos:
        raise CalibrationDataError(f"GENCLIP_CALIBRATION_PRODUCT={name!r} has no good photos yet")
    return [decode_image(data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels).image
            for _, data in photos]


class BatchWorker:
    """Pulls jobs from a :class:`WorkSource`, batches them, runs the detector, answers."""

    def __init__(
        self,
        source: WorkSource,
        detector: Any,
        *,
        max_batch: int,
        max_wait_s: float,
        worker_id: str | None = None,
        metrics: Metrics | None = None,
        heartbeat_interval_s: float | None = None,
        poll_s: float = 0.25,
        device: str | None = None,
        products: Any = None,
    ) -> None:
        """``products``: a :class:`service.products.worker_jobs.WorkerProducts` when the worker
        has the database (few-shot references, reference jobs), else ``None``."""
        self.source = source
        self.products = products
        self.detector = detector
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.worker_id = worker_id or default_worker_id()
        self.metrics = metrics or Metrics()
        self.heartbeat_interval_s = heartbeat_interval_s
        self.poll_s = poll_s
        self.identity: dict[str, Any] = detector.identity.as_dict()
        self.device = device or str(getattr(detector, "device", "") or "")
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"detector-{self.worker_id[:12]}"
        )
        self._stop = asyncio.Event()
        self._in_flight: list[Job] = []
        self.batches = 0
        self.running = False
        self.progress = ProgressMeter()

    def stop(self) -> None:
        """Finish the current batch, then return from :meth:`run`."""
        self._stop.set()

    @property
    def info(self) -> dict[str, Any]:
        return {**self.identity, "device": self.device, "max_batch": self.max_batch}

    async def run(self) -> None:
        self.source.track_progress(self.worker_id, self.progress)
        await self.source.register(self.worker_id, self.info)
        self.running = True
        heartbeat = None
        if self.heartbeat_interval_s:
            heartbeat = asyncio.create_task(self._heartbeat_loop(), name="worker-heartbeat")
        log.info("worker %s running %s (max_batch=%d)", self.worker_id, self.identity, self.max_batch)
        backoff = 0.05
        try:
            while not self._stop.is_set():
                try:
                    jobs = await self.source.receive(self.max_batch, self.poll_s)
                    self.progress.polled()
                    if not jobs:
                        backoff = 0.05
                        continue
                    jobs = await self._fill(jobs)
                    backoff = 0.05
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # transport trouble (Redis restarting...): retry with backoff
                    log.warning("worker %s: receive failed (retry in %.2f s): %s", self.worker_id, backoff, exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                await self._process(jobs)
        finally:
            self.running = False
            if heartbeat is not None:
                heartbeat.cancel()
            try:
                await self.source.unregister(self.worker_id)
            except Exception as exc:  # pragma: no cover - best effort
                log.warning("worker %s: unregister failed: %s", self.worker_id, exc)
            self._executor.shutdown(wait=False)
            log.info("worker %s stopped after %d batches", self.worker_id, self.batches)

    async def _fill(self, jobs: list[Job]) -> list[Job]:
        """Top the batch up until full or ``max_wait_s`` after the first job."""
        deadline = time.monotonic() + self.max_wait_s
        while len(jobs) < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            jobs.extend(await self.source.receive(self.max_batch - len(jobs), remaining))
        return jobs

    async def _heartbeat_loop(self) -> None:
        assert self.heartbeat_interval_s
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            try:
                await self.source.heartbeat(self.worker_id, list(self._in_flight))
            except Exception as exc:
                log.warning("worker %s: heartbeat failed: %s", self.worker_id, exc)

    async def _process(self, jobs: list[Job]) -> None:
        inspections = [job for job in jobs if job.kind == JOB_INSPECT]
        if inspections:
            self.progress.batch_started()
            try:
                await self._process_batch(inspections)
            finally:
                self.progress.batch_finished(len(inspections))
        for job in jobs:  # reference builds: one at a time, never batched with inspections
            if job.kind != JOB_INSPECT:
                # Not a batch for the service rate (a rebuild takes far longer than an
                # inspection); while it runs the worker serves no inspection, and /ready and
                # admission say so once it outlasts the progress window.
                await self._process_reference(job)
                self.progress.polled()

    async def _process_reference(self, job: Job) -> None:
        if job.expired():
            result = JobResult.failure(job, ERROR_EXPIRED, "the reference job's deadline passed before it ran",
                                       worker=self.worker_id, identity=self.identity)
        elif self.products is None or job.product is None:
            result = JobResult.failure(job, ERROR_PRODUCT_GONE, "this worker has no product database",
                                       worker=self.worker_id, identity=self.identity)
        else:
            self._in_flight = [job]
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            try:
                result = await asyncio.shield(loop.run_in_executor(
                    self._executor, self.products.run_reference_job, job, self.worker_id))
            except Exception as exc:  # run_reference_job reports failures itself: a bug net
                log.exception("worker %s: reference job %s crashed", self.worker_id, job.id)
                result = JobResult.failure(job, ERROR_INFERENCE, f"worker error: {exc}", worker=self.worker_id)
            finally:
                self._in_flight = []
            result.model_ms = (time.perf_counter() - started) * 1000.0
        self.metrics.jobs.labels("reference_" + ("ok" if result.ok else (result.error or "error"))).inc()
        try:
            await self.source.complete([(job, result)])
        except Exception:
            log.exception("worker %s: could not deliver the result of reference job %s", self.worker_id, job.id)

    async def _process_batch(self, jobs: list[Job]) -> None:
        now = time.time()
        results: list[tuple[Job, JobResult]] = []
        live: list[Job] = []
        for job in jobs:
            if job.expired(now):
                results.append((job, JobResult.failure(
                    job, ERROR_EXPIRED, "the job's deadline passed before inference",
                    worker=self.worker_id, identity=self.identity,
                )))
                self.metrics.jobs.labels("expired").inc()
            else:
                live.append(job)
        if live:
            self._in_flight = live
            started = time.time()
            for job in live:
                self.metrics.queue_wait.observe(max(0.0, started - job.enqueued_at))
            loop = asyncio.get_running_loop()
            try:
                outs = await asyncio.shield(loop.run_in_executor(self._executor, self._run_batch, live, started))
            except Exception as exc:  # _run_batch catches detector errors; this is a bug net
                log.exception("worker %s: batch crashed", self.worker_id)
                outs = [
                    JobResult.failure(job, ERROR_INFERENCE, f"worker error: {exc}", worker=self.worker_id)
                    for job in live
                ]
            finally:
                self._in_flight = []
            results.extend(zip(live, outs, strict=True))
            self.batches += 1
        try:
            await self.source.complete(results)
        except Exception:
            # results lost; Redis jobs stay pending and are reclaimed (and retried) later
            log.exception("worker %s: could not deliver %d results", self.worker_id, len(results))

    # ------------------------------------------------------------------ detector thread
    def _run_batch(self, jobs: Sequence[Job], started: float) -> list[JobResult]:
        results: dict[str, JobResult] = {}
        ready: list[tuple[Job, Image.Image]] = []
        for job in jobs:
            try:
                ready.append((job, job.load_image()))
            except Exception as exc:
                log.error("worker %s: job %s image unusable: %s", self.worker_id, job.id, exc)
                results[job.id] = JobResult.failure(
                    job, ERROR_BAD_JOB, f"image could not be loaded: {exc}", worker=self.worker_id,
                    identity=self.identity,
                )
        if ready:
            try:
                self._infer(ready, started, results)
            except Exception as exc:
                if len(ready) == 1:
                    job = ready[0][0]
                    results[job.id] = self._failed(job, exc)
                else:
                    log.warning(
                        "worker %s: batch of %d failed (%s); retrying one by one",
                        self.worker_id, len(ready), exc,
                    )
                    for item in ready:
                        try:
                            self._infer([item], started, results)
                        except Exception as single_exc:
                            results[item[0].id] = self._failed(item[0], single_exc)
        for result in results.values():
            self.metrics.jobs.labels("ok" if result.ok else (result.error or "error")).inc()
        return [results[job.id] for job in jobs]

    def _failed(self, job: Job, exc: BaseException) -> JobResult:
        log.error("worker %s: inference failed for job %s: %r", self.worker_id, job.id, exc)
        return JobResult.failure(
            job, ERROR_INFERENCE, f"the detector failed on this image: {type(exc).__name__}: {exc}",
            worker=self.worker_id, identity=self.identity,
        )

    def _infer(self, items: Sequence[tuple[Job, Image.Image]], started: float, out: dict[str, JobResult]) -> None:
        references = None
        if any(job.product is not None for job, _ in items):
            if self.products is None:
                for job, _ in items:
                    out[job.id] = JobResult.failure(job, ERROR_PRODUCT_GONE, "this worker has no product database",
                                                    worker=self.worker_id, identity=self.identity)
                return
            references, failures = self.products.references_for([job for job, _ in items], self.worker_id)
            if failures:
                out.update(failures)
                kept = [index for index, (job, _) in enumerate(items) if job.id not in failures]
                items = [items[index] for index in kept]
                references = [references[index] for index in kept]
                if not items:
                    return
        images = [image for _, image in items]
        names = [job.class_name for job, _ in items]
        versions = [reference[1] if reference is not None else None for reference in references or [None] * len(items)]
        t0 = time.perf_counter()
        if references is not None and any(reference is not None for reference in references):
            fewshot = [reference[0] if reference is not None else None for reference in references]
            inspections = self.detector.inspect(images, names, references=fewshot)
        else:
            inspections = self.detector.inspect(images, names)
        elapsed = time.perf_counter() - t0
        if len(inspections) != len(items):
            raise RuntimeError(f"detector returned {len(inspections)} results for {len(items)} images")
        staged = []
        for (job, image), insp, version in zip(items, inspections, versions, strict=True):
            score = float(insp.score)
            if not math.isfinite(score):
                raise ValueError(f"non-finite score {score!r}")
            staged.append(JobResult(
                job_id=job.id,
                ok=True,
                score=min(1.0, max(0.0, score)),
                class_label=str(insp.class_label),
                component_scores={str(k): float(v) for k, v in (insp.component_scores or {}).items()},
                anomaly_map=map_to_uint8(insp.anomaly_map, image.size),
                identity=self.identity,
                worker=self.worker_id,
                batch_size=len(items),
                queue_ms=max(0.0, (started - job.enqueued_at) * 1000.0),
                model_ms=elapsed * 1000.0,
                reference_version=version,
            ))
        self.metrics.batch_size.observe(len(items))
        self.metrics.model_latency.observe(elapsed)
        for result in staged:
            out[result.job_id] = result


# ====================================================================== standalone process
async def serve_worker(settings: Settings, detector: Any = None) -> int:
    """Run one Redis worker until SIGTERM / SIGINT (finishes its current batch first)."""
    from service.queue.redis_streams import RedisWorkSource, wait_for_redis

    if not settings.redis_url:
        raise SystemExit("genclip worker needs a Redis URL (GENCLIP_REDIS_URL or --redis-url)")
    from service.db.database import open_database
    from service.products.worker_jobs import worker_products

    if detector is None:
        detector = await asyncio.to_thread(load_detector, settings)
    worker_id = settings.worker_id or default_worker_id()
    database = await asyncio.to_thread(open_database, settings.database_url, settings.database_migrate)
    await wait_for_redis(settings.redis_url, timeout=30.0)
    metrics = Metrics()
    if settings.worker_metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(settings.worker_metrics_port, addr=settings.host, registry=metrics.registry)
    source = RedisWorkSource(settings, consumer=worker_id)
    worker = BatchWorker(
        source,
        detector,
        max_batch=settings.max_batch,
        max_wait_s=settings.max_wait_ms / 1000.0,
        worker_id=worker_id,
        metrics=metrics,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        products=worker_products(settings, database, detector),
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, worker.stop)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-main thread
            pass
    try:
        await worker.run()
    finally:
        await source.close()
        database.close()
    return 0


def main(settings: Settings | None = None) -> int:
    settings = settings or Settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(serve_worker(settings))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
