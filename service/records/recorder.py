"""The recorder: every ``/inspect`` answer becomes a row, written off the request path.

``record()`` is a plain call on the event loop that takes microseconds: it turns the answer
into a row dict and queues it. Two stages follow, neither on the request path:

1. media (only for records that keep images): thumbnail / heatmap / original written by a
   single thread of the recorder's own, at most ``MEDIA_QUEUE`` records at a time (past that a
   record is kept without images, counted in ``genclip_records_media_skipped_total``);
2. the database: rows wait in a bounded buffer (``records_buffer``); one task writes them in
   batches of up to ``records_batch`` (or whatever arrived within ``records_flush_ms``) through
   :meth:`Database.run`. ``INSERT ... ON CONFLICT (id) DO NOTHING``, so a batch retried after a
   commit whose answer was lost is not written twice.

When a write fails (database down, disk full, lock timeout) the batch goes back to the head of
the buffer and is retried with exponential backoff (0.5 s doubling to 30 s); inspection goes
on. Past the buffer's size the oldest rows are dropped: each is counted
(``genclip_records_dropped_total{reason}``) and logged as one JSON line on the
``service.records.lost`` logger, so a lost record can still be found in the logs. At shutdown
the buffer is flushed for up to ``SHUTDOWN_FLUSH_S``; what is left is dropped the same way.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from service.db.base import utcnow
from service.db.database import Database
from service.db.inspections import InspectionRecord
from service.metrics import Metrics
from service.queue.base import Job, JobResult
from service.records.media import KEEP_NONE, MediaStore
from service.settings import Settings

log = logging.getLogger(__name__)
lost_log = logging.getLogger("service.records.lost")

MEDIA_QUEUE = 32  # records whose images wait for the media thread (each holds its image and map)
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
SHUTDOWN_FLUSH_S = 10.0
SWEEP_INTERVAL_S = 600.0


def _jsonable(value: Any) -> Any:
    """Plain JSON types (numpy scalars and arrays, tuples) for the JSON columns."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    return value


def _text(value: Any, limit: int) -> str | None:
    if value is None:
        return None
    return str(value)[:limit]


def build_row(job: Job, result: JobResult, answer: Mapping[str, Any], *, image: Image.Image | None,
              part_id: str | None, station: str | None, product_version: int | None = None) -> dict[str, Any]:
    """The ``inspections`` row of one answer (every column present: batched inserts need it).

    ``answer`` is the JSON body the client got (``heatmap_png`` ignored); fields other work
    adds to it (``product``, ``threshold_source``, ``defects``, ``product_version``) are
    recorded when present. The detector identity is the worker's full identity dict.
    ``product_version`` is the version of the product's settings the decision was made with.
    """
    identity = _jsonable(dict(result.identity))
    timing = answer.get("timing_ms") or {}
    component = answer.get("component_scores") or result.component_scores or None
    return {
        "id": str(answer.get("id") or job.id),
        "created_at": utcnow(),
        "product": _text(answer.get("product"), 64),
        "product_version": product_version,
        "reference_version": answer.get("reference_version"),
        "class_name": _text(answer.get("class_name", job.class_name), 128),
        "class_label": _text(answer.get("class_label", result.class_label), 128) or "",
        "score": float(answer.get("score", result.score)),
        "threshold": float(answer["threshold"]),
        "threshold_source": _text(answer.get("threshold_source"), 16),
        "pixel_threshold": float(answer["pixel_threshold"]) if answer.get("pixel_threshold") is not None else None,
        "is_anomalous": bool(answer["is_anomalous"]),
        "defects": _jsonable(answer.get("defects")),
        "component_scores": _jsonable(component) if component else None,
        "detector": _text(identity.get("name") or answer.get("detector"), 64) or "",
        "backbone": _text(identity.get("backbone") or answer.get("backbone"), 128) or "",
        "checkpoint": _text(identity.get("checkpoint") or answer.get("checkpoint"), 64),
        "identity": identity,
        "worker": _text(result.worker, 128) or None,
        "batch_size": int(result.batch_size) if result.batch_size else None,
        "queue_ms": float(timing.get("queue", result.queue_ms)),
        "model_ms": float(timing.get("model", result.model_ms)),
        "total_ms": float(timing.get("total", 0.0)),
        "image_width": image.width if image is not None else None,
        "image_height": image.height if image is not None else None,
        "part_id": part_id,
        "station": station,
        "media": None,
        "review_verdict": None,
        "review_note": None,
        "reviewer": None,
        "reviewed_at": None,
    }


def insert_rows(session: Session, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows``, skipping ids already present (a retried batch is written once)."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(insert(InspectionRecord).on_conflict_do_nothing(index_elements=["id"]), rows)


class Recorder:
    """Batches inspection records into the database (see the module docstring)."""

    def __init__(self, settings: Settings, database: Database, metrics: Metrics) -> None:
        self.settings = settings
        self.database = database
        self.metrics = metrics
        self.buffer_size = settings.records_buffer
        self.batch_size = settings.records_batch
        self.flush_s = settings.records_flush_ms / 1000.0
        self.media: MediaStore | None = None
        if settings.records_keep_images != KEEP_NONE:
            self.media = MediaStore(
                settings.records_dir, keep=settings.records_keep_images,
                originals=settings.records_keep_originals, thumbnail_px=settings.records_thumbnail_px,
                max_bytes=settings.records_max_bytes, retention_days=settings.records_retention_days,
            )
        self._rows: collections.deque[dict[str, Any]] = collections.deque()
        self._pending: set[str] = set()
        self._media_waiting = 0
        self._media_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="genclip-media")
        self._wake = asyncio.Event()
        self._stopping = False
        self._urgent = False
        self._task: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: list[dict[str, Any]] = []
        self._failures = 0
        self._last_error_log = 0.0

    # ------------------------------------------------------------------ request side
    @property
    def wants_original(self) -> bool:
        """Whether :meth:`record` wants the uploaded file bytes (``records_keep_originals``)."""
        return self.media is not None and self.media.originals

    def record(self, job: Job, result: JobResult, answer: Mapping[str, Any], *, image: Image.Image | None = None,
               original: bytes | None = None, part_id: str | None = None, station: str | None = None,
               product_version: int | None = None) -> None:
        """Queue the record of one answer; never raises, never blocks."""
        try:
            row = build_row(job, result, answer, image=image, part_id=part_id, station=station,
                            product_version=product_version)
        except Exception:
            log.exception("cannot build the record of job %s", job.id)
            self.metrics.records_dropped.labels("invalid").inc()
            return
        self._pending.add(row["id"])
        media = self.media
        if media is not None and image is not None and media.wants(row["is_anomalous"]):
            if self._media_waiting < MEDIA_QUEUE and self._loop is not None:
                self._media_waiting += 1
                future = self._loop.run_in_executor(
                    self._media_pool, media.save, row["id"], row["created_at"], image, result.anomaly_map, original
                )
                future.add_done_callback(lambda done, row=row: self._media_done(row, done))
                return
            self.metrics.records_media_skipped.labels("busy").inc()
        self._enqueue(row)

    def _media_done(self, row: dict[str, Any], done: asyncio.Future) -> None:
        self._media_waiting -= 1
        if done.cancelled() or done.exception() is not None:
            log.error("cannot keep the images of record %s: %r", row["id"], None if done.cancelled() else done.exception())
            self.metrics.records_media_skipped.labels("error").inc()
        else:
            row["media"] = done.result()
            if self.media is not None:
                self.metrics.records_media_bytes.set(self.media.total_bytes)
        self._enqueue(row)

    def _enqueue(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        while len(self._rows) > self.buffer_size:
            self._drop(self._rows.popleft(), "buffer_full")
        self.metrics.records_buffered.set(len(self._rows))
        if len(self._rows) == 1 or len(self._rows) >= self.batch_size or self._stopping:
            self._wake.set()  # first row: the writer starts its flush_ms wait; full: write now

    def _drop(self, row: dict[str, Any], reason: str) -> None:
        self._pending.discard(row["id"])
        self.metrics.records_dropped.labels(reason).inc()
        fields = {k: row[k] for k in ("id", "product", "class_name", "class_label", "score", "threshold",
                                      "is_anomalous", "detector", "backbone", "checkpoint", "part_id", "station")}
        fields["created_at"] = row["created_at"].isoformat()
        lost_log.error("record not written (%s): %s", reason, json.dumps(fields, default=str))

    # ------------------------------------------------------------------ queries from the API
    def is_pending(self, record_id: str) -> bool:
        """Whether a record was answered but is not in the database yet."""
        return record_id in self._pending

    @property
    def buffered(self) -> int:
        return len(self._rows)

    async def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every record queued so far is written or dropped (``False`` on timeout)."""
        waiting = set(self._pending)
        deadline = time.monotonic() + timeout
        while waiting & self._pending:
            if time.monotonic() > deadline:
                return False
            self._urgent = True  # the writer stops waiting for a full batch
            self._wake.set()
            await asyncio.sleep(0.01)
        return True

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.media is not None:
            await self._loop.run_in_executor(self._media_pool, self.media.sweep)
            self.metrics.records_media_bytes.set(self.media.total_bytes)
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="records-media-sweep")
        self._task = asyncio.create_task(self._flush_loop(), name="records-writer")

    async def stop(self) -> None:
        self._stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        deadline = time.monotonic() + SHUTDOWN_FLUSH_S
        while self._media_waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), max(0.1, deadline - time.monotonic()))
            except (TimeoutError, Exception):
                self._task.cancel()
        for row in self._inflight:  # a write cut short by the shutdown deadline
            self._drop(row, "shutdown")
        self._inflight = []
        while self._rows:
            self._drop(self._rows.popleft(), "shutdown")
        self.metrics.records_buffered.set(0)
        self._media_pool.shutdown(wait=False, cancel_futures=True)

    async def _sweep_loop(self) -> None:
        assert self.media is not None and self._loop is not None
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                await self._loop.run_in_executor(self._media_pool, self.media.sweep)
                self.metrics.records_media_bytes.set(self.media.total_bytes)
            except Exception:
                log.exception("records media sweep failed")

    async def _flush_loop(self) -> None:
        while True:
            if not self._rows:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            deadline = time.monotonic() + self.flush_s
            while len(self._rows) < self.batch_size and not (self._stopping or self._urgent):  # let it fill
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), remaining)
                except TimeoutError:
                    break
            if await self._write_batch():
                if not self._rows:
                    self._urgent = False
                continue
            if self._stopping:
                return
            delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (self._failures - 1))
            try:  # wait out the backoff, unless shutdown begins
                await asyncio.wait_for(self._until_stopping(), delay)
            except TimeoutError:
                pass

    async def _write_batch(self) -> bool:
        """Write the oldest rows (up to a batch); on failure put them back. ``True`` if written."""
        batch = [self._rows.popleft() for _ in range(min(self.batch_size, len(self._rows)))]
        self._inflight = batch
        try:
            await self.database.run(lambda session: insert_rows(session, batch))
        except Exception as exc:
            self._inflight = []
            self._rows.extendleft(reversed(batch))
            while len(self._rows) > self.buffer_size:
                self._drop(self._rows.popleft(), "buffer_full")
            self.metrics.records_buffered.set(len(self._rows))
            self.metrics.records_write_errors.inc()
            self._failures += 1
            now = time.monotonic()
            if self._failures == 1 or now - self._last_error_log > 10.0:
                self._last_error_log = now
                log.warning("cannot write %d inspection record(s) (%d buffered, attempt %d): %s",
                            len(batch), len(self._rows), self._failures, exc)
            return False
        self._inflight = []
        if self._failures:
            log.warning("inspection records written again after %d failed attempt(s)", self._failures)
            self._failures = 0
        for row in batch:
            self._pending.discard(row["id"])
        self.metrics.records_written.inc(len(batch))
        self.metrics.records_buffered.set(len(self._rows))
        return True

    async def _until_stopping(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.05)


class NullRecorder:
    """What the app holds with ``records_enabled=false``: records nothing."""

    wants_original = False
    media = None
    buffered = 0

    def record(self, *args: Any, **kwargs: Any) -> None:
        return None

    def is_pending(self, record_id: str) -> bool:
        return False

    async def flush(self, timeout: float = 5.0) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None
