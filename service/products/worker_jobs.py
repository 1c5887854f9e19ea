"""What a detector worker does for products: fuse references into inspections, and run
``reference`` jobs (rebuild + calibrate). Everything here runs in the worker's detector thread.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from model.detector import Detector, FewShotReference
from model.fewshot import ReferenceError as BankError

from service.db.database import Database
from service.products.onboarding import CalibrationFailed, OnboardingLimits, build_and_store
from service.products.references import ReferenceMissing, ReferenceStore
from service.queue.base import (
    ERROR_CALIBRATION,
    ERROR_PRODUCT_GONE,
    ERROR_REFERENCE_MISMATCH,
    Job,
    JobResult,
)

log = logging.getLogger(__name__)


class WorkerProducts:
    """Product support of one worker: its database, reference cache and build limits."""

    def __init__(self, database: Database, detector: Detector, limits: OnboardingLimits,
                 cache_bytes: int = 512 * 2**20) -> None:
        self.database = database
        self.detector = detector
        self.limits = limits
        self.references = ReferenceStore(database, detector.identity, max_bytes=cache_bytes)

    def references_for(
        self, jobs: Sequence[Job], worker: str
    ) -> tuple[list[tuple[FewShotReference, int] | None], dict[str, JobResult]]:
        """The reference (and its version) of each inspect job; jobs whose reference cannot be
        used get a failure result instead (returned by job id) and must not be inferred."""
        references: list[tuple[FewShotReference, int] | None] = []
        failures: dict[str, JobResult] = {}
        for job in jobs:
            reference = None
            if job.product is not None:
                try:
                    reference = self.references.reference_for(job.product)
                except (ReferenceMissing, BankError) as exc:
                    failures[job.id] = JobResult.failure(
                        job, ERROR_REFERENCE_MISMATCH,
                        f"product {job.product.name!r}: {exc}. Rebuild it: POST /products/{job.product.name}/calibrate",
                        worker=worker, identity=self.detector.identity.as_dict(),
                    )
            references.append(reference)
        return references, failures

    def run_reference_job(self, job: Job, worker: str) -> JobResult:
        """Rebuild and calibrate ``job.product``; the report comes back in the result."""
        assert job.product is not None
        identity = self.detector.identity.as_dict()
        try:
            outcome = build_and_store(self.database, self.detector, job.product.id, self.limits)
        except CalibrationFailed as exc:
            return JobResult.failure(job, ERROR_CALIBRATION, f"calibration of {job.product.name!r} failed: {exc}",
                                     worker=worker, identity=identity)
        if outcome is None:
            return JobResult.failure(job, ERROR_PRODUCT_GONE, f"product {job.product.name!r} was deleted",
                                     worker=worker, identity=identity)
        report = dict(outcome.report, stored=outcome.stored)
        return JobResult(job_id=job.id, ok=True, identity=identity, worker=worker, report=report)


def worker_products(settings, database: Database, detector: Detector) -> WorkerProducts:  # type: ignore[no-untyped-def]
    """Product support for a worker configured by ``settings`` (:class:`service.settings.Settings`)."""
    return WorkerProducts(database, detector, OnboardingLimits.from_settings(settings),
                          cache_bytes=settings.reference_cache_mb * 2**20)
