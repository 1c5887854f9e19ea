"""Worker progress and queue load: what admission control and ``/ready`` decide from.

A heartbeat only proves that a worker process lives. Whether it *serves* is progress: a
successful poll of the queue (jobs taken, or none waiting) or a finished batch. Each worker
keeps a :class:`ProgressMeter`; the transport publishes its :class:`WorkerProgress` (the
in-process queue reads it directly, Redis workers send it with every heartbeat, timed by the
Redis server's clock), and the API reads the whole picture as one :class:`QueueLoad`.

Service rate: each worker's jobs per second over its recent batches (exponential moving
averages of batch size and batch wall time, receive-to-results included). At low load the
batches are small and the figure underestimates what the worker can do; it grows with the
batches as load rises, so admission errs on the safe side.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class WorkerProgress:
    """One worker's state, as ages in seconds at the time it was taken."""

    progress_age_s: float  # since the last successful poll or finished batch
    busy_s: float | None  # into the batch being run, None when not running one
    rate: float | None  # jobs/s over recent batches, None before the first
    batch_s: float | None  # typical batch wall time, None before the first


class ProgressMeter:
    """Kept by a worker (on its event loop): what it did and when."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self._progress = time.monotonic()
        self._busy_since: float | None = None
        self._size: float | None = None
        self._seconds: float | None = None

    def polled(self) -> None:
        """The worker asked the queue for work and got an answer (jobs or none)."""
        self._progress = time.monotonic()

    def batch_started(self) -> None:
        self._busy_since = time.monotonic()

    def batch_finished(self, jobs: int) -> None:
        now = time.monotonic()
        if self._busy_since is not None and jobs > 0:
            seconds = max(now - self._busy_since, 1e-6)
            a = self.alpha
            self._size = jobs if self._size is None else (1 - a) * self._size + a * jobs
            self._seconds = seconds if self._seconds is None else (1 - a) * self._seconds + a * seconds
        self._busy_since = None
        self._progress = now

    def snapshot(self) -> WorkerProgress:
        now = time.monotonic()
        rate = self._size / self._seconds if self._size is not None and self._seconds else None
        return WorkerProgress(
            progress_age_s=max(0.0, now - self._progress),
            busy_s=None if self._busy_since is None else max(0.0, now - self._busy_since),
            rate=rate,
            batch_s=self._seconds,
        )


@dataclass(frozen=True)
class WorkerLoad:
    """A live worker as the API sees it."""

    worker_id: str
    identity: dict[str, Any]
    progress: WorkerProgress | None = None  # None: the worker reports none (older worker)

    def progressing(self, window_s: float, first_batch_s: float | None = None) -> bool:
        """Whether the worker made progress within ``window_s``: polled or finished a batch, or
        is running a batch not yet much longer than its usual ones (its first batch, whose
        length nobody knows yet, gets ``first_batch_s``: model warm-up can be slow)."""
        p = self.progress
        if p is None:
            return True
        if p.progress_age_s <= window_s:
            return True
        if p.busy_s is not None:
            usual = 3.0 * p.batch_s if p.batch_s is not None else (first_batch_s or 0.0)
            return p.busy_s <= max(window_s, usual)
        return False


@dataclass(frozen=True)
class QueueLoad:
    """Jobs admitted and not finished, and the live workers (heartbeat not expired)."""

    depth: int
    workers: list[WorkerLoad] = field(default_factory=list)

    @property
    def rate(self) -> float | None:
        """Jobs/s the live workers have been finishing (sum), None when none measured yet."""
        rates = [w.progress.rate for w in self.workers if w.progress is not None and w.progress.rate]
        return sum(rates) if rates else None

    def progressing(self, window_s: float, first_batch_s: float | None = None) -> bool:
        return any(w.progressing(window_s, first_batch_s) for w in self.workers)

    def stalled(self, window_s: float, first_batch_s: float | None = None) -> bool:
        """Jobs wait and no live worker made progress within ``window_s``."""
        return self.depth > 0 and bool(self.workers) and not self.progressing(window_s, first_batch_s)
