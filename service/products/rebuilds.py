"""API side of a reference rebuild: queue a ``reference`` job and wait for it (bounded).

The job goes through the same queue and workers as ``/inspect``. If it cannot be queued (queue
full, no worker), the product is marked ``stale`` so nobody waits for a rebuild that will not
come, and the caller answers 503 (the photos stay stored: ``POST .../calibrate`` retries).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

from service.db.database import Database
from service.db.products import CALIBRATION_STALE
from service.products import repository
from service.queue.base import JOB_REFERENCE, Job, JobQueue, JobResult, ProductRef, QueueError

log = logging.getLogger(__name__)


@dataclass
class RebuildOutcome:
    """``result`` is the worker's answer, or ``None`` if it did not come within the wait."""

    job_id: str
    result: JobResult | None


async def queue_rebuild(
    queue: JobQueue, database: Database, name: str, *, job_timeout_s: float, wait_s: float
) -> RebuildOutcome:
    """Queue a rebuild of product ``name`` and wait up to ``wait_s`` for it.

    Raises:
        repository.ProductNotFound: the product is gone.
        QueueError: the job could not be queued (the product is then marked ``stale``).
    """
    target = await database.run(lambda session: repository.calibration_target(repository.get_product(session, name)))
    job = Job(
        id=uuid.uuid4().hex, class_name=target.class_name, deadline=time.time() + job_timeout_s, kind=JOB_REFERENCE,
        product=ProductRef(id=target.product_id, name=target.name, images_version=target.images_version,
                           fusion_weight=target.fusion_weight),
    )
    try:
        pending = await queue.submit(job)
    except QueueError:
        await database.run(lambda session: repository.mark_calibration(
            session, target, CALIBRATION_STALE, "no rebuild could be queued (queue full or no worker); "
            f"retry with POST /products/{name}/calibrate"))
        raise
    if wait_s <= 0:
        return RebuildOutcome(job.id, None)
    try:
        # no cancel() on timeout: the rebuild goes on without a waiter
        return RebuildOutcome(job.id, await pending.result(timeout=min(wait_s, job_timeout_s)))
    except TimeoutError:
        return RebuildOutcome(job.id, None)
