"""Queue interface shared by both transports.

Two sides:

* :class:`JobQueue` (API side): ``submit`` a job (admission control: raises
  :class:`QueueFull` / :class:`NoWorkerAvailable`), then await its own result through the
  returned :class:`PendingJob`.
* :class:`WorkSource` (worker side): ``receive`` up to N jobs waiting at most a timeout for
  the first, ``complete`` them with results, ``heartbeat`` while alive.

The batching policy lives in :mod:`service.worker` and only uses :class:`WorkSource`, so
the in-process and the Redis Streams transports batch with the same code.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from service.queue.progress import ProgressMeter, QueueLoad, WorkerLoad


class QueueError(RuntimeError):
    """The queue cannot take the job now (maps to 503)."""

    reason = "unavailable"


class QueueFull(QueueError):
    reason = "queue_full"


class NoWorkerAvailable(QueueError):
    reason = "no_worker"


class QueueUnavailable(QueueError):
    reason = "queue_unavailable"


class JobLost(QueueError):
    """The queue lost an admitted job (e.g. Redis restarted without persistence)."""

    reason = "job_lost"


class MalformedResult(RuntimeError):
    """A worker's result could not be decoded or does not fit its job (maps to 502)."""


# Job kinds: inspect one image, or (re)build a product's few-shot reference and calibrate it.
JOB_INSPECT = "inspect"
JOB_REFERENCE = "reference"
JOB_KINDS = (JOB_INSPECT, JOB_REFERENCE)

# Result error codes (JobResult.error) and the HTTP status the API answers for them.
ERROR_EXPIRED = "deadline_exceeded"
ERROR_INFERENCE = "inference_failed"
ERROR_DEAD_LETTER = "dead_lettered"
ERROR_BAD_JOB = "bad_job"
ERROR_REFERENCE_MISMATCH = "reference_mismatch"
ERROR_PRODUCT_GONE = "product_not_found"
ERROR_CALIBRATION = "calibration_failed"
ERROR_STATUS = {
    ERROR_EXPIRED: 504,
    ERROR_INFERENCE: 500,
    ERROR_DEAD_LETTER: 500,
    ERROR_BAD_JOB: 500,
    ERROR_REFERENCE_MISMATCH: 409,
    ERROR_PRODUCT_GONE: 404,
    ERROR_CALIBRATION: 500,
}


@dataclass(frozen=True)
class ProductRef:
    """The product a job is for, as the API saw it when admitting the job.

    Attributes:
        id: database id of the product.
        name: product name (logs, errors).
        reference_version: version of the few-shot reference to use (inspect jobs; 0 = none,
            zero-shot only); a worker uses this version or a newer one, never an older one.
        fusion_weight: weight of the few-shot branch in the fused map and score.
        images_version: the good-photo set the job must cover (reference jobs).
    """

    id: int
    name: str
    reference_version: int = 0
    fusion_weight: float = 0.5
    images_version: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "reference_version": self.reference_version,
                "fusion_weight": self.fusion_weight, "images_version": self.images_version}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProductRef:
        return cls(id=int(data["id"]), name=str(data["name"]), reference_version=int(data.get("reference_version", 0)),
                   fusion_weight=float(data.get("fusion_weight", 0.5)), images_version=int(data.get("images_version", 0)))


@dataclass
class Job:
    """One image to inspect.

    Attributes:
        id: unique job id (hex), also the response ``id``.
        class_name: the class name written in the prompts (the submitted one, or the product's),
            or ``None``.
        deadline: wall-clock epoch seconds after which nobody waits for the result.
        enqueued_at: wall-clock epoch seconds of admission.
        image: decoded RGB image (in-process transport, or once loaded on a worker).
        loader: how a worker obtains the image when ``image`` is not set (Redis payload).
        attempt: delivery count (1 on first delivery, more after reclaims).
        transport_ref: transport-private handle (e.g. the Redis stream entry id).
        kind: ``inspect`` (one image) or ``reference`` (rebuild a product's reference from its
            good photos in the database; carries no image).
        product: the product the job is for, or ``None``.
    """

    id: str
    class_name: str | None
    deadline: float
    enqueued_at: float = field(default_factory=time.time)
    image: Image.Image | None = None
    loader: Callable[[], Image.Image] | None = None
    attempt: int = 1
    transport_ref: Any = None
    kind: str = JOB_INSPECT
    product: ProductRef | None = None

    def load_image(self) -> Image.Image:
        if self.image is None:
            if self.loader is None:
                raise ValueError(f"job {self.id} carries no image")
            self.image = self.loader()
            self.loader = None
        return self.image

    def expired(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) >= self.deadline


@dataclass
class JobResult:
    """What a worker answers for one job.

    ``anomaly_map`` is the detector's map quantised to uint8 (0..255 for 0..1) at the input
    image's resolution: compact to move between processes and all the heatmap PNG needs.
    ``report`` is the calibration report of a ``reference`` job (JSON-able dict);
    ``reference_version`` the product reference an inspection was fused with (``None``: none).
    """

    job_id: str
    ok: bool
    score: float = 0.0
    class_label: str = ""
    component_scores: dict[str, float] = field(default_factory=dict)
    anomaly_map: np.ndarray | None = None
    identity: dict[str, Any] = field(default_factory=dict)
    worker: str = ""
    batch_size: int = 0
    queue_ms: float = 0.0
    model_ms: float = 0.0
    error: str | None = None
    message: str = ""
    report: dict[str, Any] | None = None
    reference_version: int | None = None

    @classmethod
    def failure(
        cls, job: Job, error: str, message: str, *, worker: str = "", identity: dict | None = None
    ) -> JobResult:
        return cls(
            job_id=job.id,
            ok=False,
            error=error,
            message=message,
            worker=worker,
            identity=dict(identity or {}),
            queue_ms=max(0.0, (time.time() - job.enqueued_at) * 1000.0),
        )


class PendingJob(abc.ABC):
    """Handle on a submitted job: await its own result."""

    job: Job

    @abc.abstractmethod
    async def result(self, timeout: float) -> JobResult:
        """Wait at most ``timeout`` seconds; raises ``TimeoutError`` when none came."""

    def cancel(self) -> None:  # noqa: B027 - optional hook
        """Nobody waits for this job any more (worker may skip it)."""


@dataclass
class WorkerInfo:
    worker_id: str
    identity: dict[str, Any]


class JobQueue(abc.ABC):
    """API side of a transport."""

    name: str = "abstract"

    async def start(self) -> None:  # noqa: B027
        pass

    async def close(self) -> None:  # noqa: B027
        pass

    @abc.abstractmethod
    async def submit(self, job: Job, file_bytes: bytes | None = None, *, max_depth: int | None = None) -> PendingJob:
        """Admit and enqueue a job, or raise :class:`QueueError`.

        ``job.image`` is the decoded image; ``file_bytes`` the validated upload, which a
        transport may ship instead of raw pixels when smaller. ``max_depth`` (default: the
        configured ``queue_max_depth``) is the depth at or above which the job is refused
        (:class:`QueueFull`), checked atomically with the enqueue.
        """

    @abc.abstractmethod
    async def depth(self) -> int:
        """Jobs admitted and not finished (waiting + in progress)."""

    @abc.abstractmethod
    async def workers(self) -> list[WorkerInfo]:
        """Live workers and what they run."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """Whether the queue backend is reachable."""

    async def load(self) -> QueueLoad:
        """Depth and live workers with their progress (admission, ``/ready``)."""
        return QueueLoad(await self.depth(), [WorkerLoad(w.worker_id, w.identity) for w in await self.workers()])


class WorkSource(abc.ABC):
    """Worker side of a transport."""

    @abc.abstractmethod
    async def register(self, worker_id: str, identity: dict[str, Any]) -> None:
        """Announce a live worker (heartbeat starts)."""

    @abc.abstractmethod
    async def unregister(self, worker_id: str) -> None:
        """Remove a worker that stops cleanly."""

    @abc.abstractmethod
    async def receive(self, max_jobs: int, timeout: float) -> list[Job]:
        """Up to ``max_jobs`` jobs; waits at most ``timeout`` s for the first one."""

    @abc.abstractmethod
    async def complete(self, results: Sequence[tuple[Job, JobResult]]) -> None:
        """Deliver results to their jobs' waiters and acknowledge the jobs."""

    async def heartbeat(self, worker_id: str, in_flight: Sequence[Job]) -> None:  # noqa: B027
        """Called periodically while the worker lives (and while a batch runs)."""

    def track_progress(self, worker_id: str, meter: ProgressMeter) -> None:  # noqa: B027
        """The worker's progress meter, published with its liveness (see :mod:`.progress`)."""

    async def close(self) -> None:  # noqa: B027
        pass
