"""``GET /products/{name}/stats``: what a product's inspection records say.

Counts, anomalous rate, review outcomes (false alarms and missed defects found by review),
score quantiles overall and per UTC day, a score histogram with the threshold, and the drift
signal (see :mod:`service.records.stats`). Window: ``since`` / ``until``, by default the
last ``days`` days (30).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request

from service.auth import ApiKeyAuth
from service.db.base import utcnow
from service.db.products import NAME_PATTERN
from service.errors import ApiError
from service.query_types import IsoDateTime
from service.records.queries import as_utc
from service.records.schemas import ProductStats
from service.records.stats import product_stats
from service.routers.db_access import run_db
from service.schemas import ErrorResponse
from service.settings import Settings

ERRORS = {
    401: "API keys are configured and the key is missing or wrong.",
    404: "No product of that name is registered or recorded.",
    422: "Bad path or query parameters.",
    500: "Unexpected error.",
    503: "The database is unavailable; see Retry-After.",
}


def build_router(settings: Settings, auth: ApiKeyAuth) -> APIRouter:
    router = APIRouter(tags=["products"], dependencies=[Depends(auth.dependency())] if auth.enabled else [])
    codes = [c for c in ERRORS if auth.enabled or c != 401]

    @router.get("/products/{name}/stats", response_model=ProductStats, summary="A product's inspection statistics",
                responses={c: {"model": ErrorResponse, "description": ERRORS[c]} for c in codes})
    async def get_product_stats(
        request: Request,
        name: Annotated[str, Path(pattern=NAME_PATTERN, description="Product name.")],
        since: Annotated[IsoDateTime | None, Query(description="Window start (ISO 8601; UTC if no offset).")] = None,
        until: Annotated[IsoDateTime | None, Query(description="Window end, exclusive (default: now); "
                                                   "not after `since`: an empty window.")] = None,
        days: Annotated[int, Query(ge=1, le=366, description="Window length when `since` is not given.")] = 30,
    ) -> ProductStats:
        now = utcnow()
        try:
            end = as_utc(until) or now
            start = as_utc(since) or end - timedelta(days=days)
        except OverflowError as exc:
            raise ApiError(422, "validation_error", "since / until: out of range") from exc
        start = min(start, end)  # until at or before since: an empty window, nothing counted
        stats = await run_db(request, lambda s: product_stats(
            s, name, start, end, now, settings.drift_limit, settings.drift_min_samples))
        if stats is None:
            raise ApiError(404, "not_found", f"no product {name!r} registered or recorded")
        return ProductStats.model_validate(stats)

    return router
