"""API side: a product name -> what ``/inspect`` needs, from the database, cached briefly.

Every API process caches a product for ``ttl_s`` (default 1 s) at most, so a change made
through any API process (or the CLI) reaches every inspection within that time; the job then
names the exact reference version to use, so workers never serve an older one.

When the database cannot be reached, a product seen before keeps being served from the cache
(the line keeps running on the last known settings; ``stale_served`` counts it and the error is
logged once per outage); a product never seen raises :class:`DatabaseUnavailable` (503).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from service.db.database import Database
from service.products import repository
from service.queue.base import ProductRef

log = logging.getLogger(__name__)


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached and the product is not cached."""


@dataclass(frozen=True)
class ProductView:
    """A product as an inspection uses it."""

    id: int
    name: str
    class_name: str
    few_shot: bool
    fusion_weight: float
    version: int
    image_threshold: float | None
    pixel_threshold: float | None
    reference_version: int
    calibration_status: str

    def job_ref(self) -> ProductRef:
        """What the worker needs: the reference to fuse (none when few-shot is off)."""
        use = self.few_shot and self.reference_version > 0
        return ProductRef(id=self.id, name=self.name, reference_version=self.reference_version if use else 0,
                          fusion_weight=self.fusion_weight)


def product_view(session: Session, name: str) -> ProductView:
    product = repository.get_product(session, name)
    # The weight the thresholds were calibrated with (a new weight applies with its recalibration).
    calibrated_weight = (product.calibration or {}).get("fusion_weight")
    return ProductView(
        id=product.id, name=product.name, class_name=product.class_name, few_shot=product.few_shot,
        fusion_weight=float(calibrated_weight) if calibrated_weight is not None else product.fusion_weight,
        version=product.version, image_threshold=product.image_threshold,
        pixel_threshold=product.pixel_threshold, reference_version=repository.reference_version(session, product.id),
        calibration_status=product.calibration_status,
    )


class ProductResolver:
    """Cached lookups; raises :class:`repository.ProductNotFound` for unknown names."""

    def __init__(self, database: Database, ttl_s: float = 1.0, max_entries: int = 4096) -> None:
        self.database = database
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._cache: dict[str, tuple[float, ProductView]] = {}
        self.stale_served = 0
        self._outage_logged = False

    async def resolve(self, name: str) -> ProductView:
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        try:
            view = await self.database.run(lambda session: product_view(session, name))
        except SQLAlchemyError as exc:
            if not self._outage_logged:
                log.error("database unreachable, serving cached products only: %s", exc)
                self._outage_logged = True
            if hit is None:
                raise DatabaseUnavailable(f"the database is unreachable and product {name!r} is not cached") from exc
            self.stale_served += 1
            return hit[1]
        if self._outage_logged:
            log.warning("database reachable again")
            self._outage_logged = False
        if len(self._cache) >= self.max_entries:
            self._cache.clear()
        self._cache[name] = (now, view)
        return view

    def forget(self, name: str) -> None:
        """Drop a cached product (this process just changed it)."""
        self._cache.pop(name, None)
