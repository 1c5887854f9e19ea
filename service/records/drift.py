"""Drift gauges on ``/metrics``, refreshed in the background (a scrape never waits on SQL).

Every ``drift_interval_s`` the API recomputes, for each product with a calibration median, the
median score of its good-decided parts over the last 24 h (:func:`service.records.stats.drift_last_24h`)
and sets ``genclip_product_drift``, ``genclip_product_drifting`` and
``genclip_product_good_median``. Products deleted or no longer calibrated lose their series.
"""

from __future__ import annotations

import asyncio
import logging

from service.db.base import utcnow
from service.db.database import Database
from service.metrics import Metrics
from service.records.stats import DriftStatus, calibrated_products, drift_last_24h
from service.settings import Settings

log = logging.getLogger(__name__)


class DriftMonitor:
    def __init__(self, settings: Settings, database: Database, metrics: Metrics) -> None:
        self.settings = settings
        self.database = database
        self.metrics = metrics
        self._series: set[str] = set()
        self._task: asyncio.Task | None = None

    async def refresh(self) -> dict[str, DriftStatus]:
        """Recompute every product's drift now and update the gauges."""
        limit, min_samples = self.settings.drift_limit, self.settings.drift_min_samples

        def work(session) -> dict[str, DriftStatus]:
            now = utcnow()
            return {name: drift_last_24h(session, name, reference, now, limit, min_samples)
                    for name, reference in calibrated_products(session)}

        statuses = await self.database.run(work)
        m = self.metrics
        for gone in self._series - set(statuses):
            for gauge in (m.product_drift, m.product_drifting, m.product_good_median):
                try:
                    gauge.remove(gone)
                except KeyError:
                    pass
        for name, status in statuses.items():
            m.product_drifting.labels(name).set(1.0 if status.drifting else 0.0)
            m.product_drift.labels(name).set(status.delta if status.delta is not None else float("nan"))
            m.product_good_median.labels(name).set(
                status.good_median if status.good_median is not None else float("nan"))
        self._series = set(statuses)
        return statuses

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # database down: keep the last values, try again later
                log.warning("drift gauges not refreshed: %s", exc)
            await asyncio.sleep(self.settings.drift_interval_s)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="drift-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
