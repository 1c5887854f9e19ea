"""Job queue: one interface (:mod:`.base`), two transports (:mod:`.inprocess`, :mod:`.redis_streams`)."""

from service.queue.base import (
    Job,
    JobLost,
    JobQueue,
    JobResult,
    MalformedResult,
    NoWorkerAvailable,
    PendingJob,
    QueueError,
    QueueFull,
    QueueUnavailable,
    WorkerInfo,
    WorkSource,
)

__all__ = [
    "Job",
    "JobLost",
    "JobQueue",
    "JobResult",
    "MalformedResult",
    "NoWorkerAvailable",
    "PendingJob",
    "QueueError",
    "QueueFull",
    "QueueUnavailable",
    "WorkSource",
    "WorkerInfo",
]
