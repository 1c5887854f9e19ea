"""Database calls from routes: off the event loop, with an outage answered 503 (JSON)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from fastapi import Request
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from service.errors import ApiError

T = TypeVar("T")

# Errors of an unreachable / locked / failing database (not of a wrong query): 503, try later.
UNAVAILABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)


async def run_db(request: Request, work: Callable[[Session], T]) -> T:
    """``work(session)`` in a transaction on the app's database (see ``Database.run``)."""
    state = request.app.state.service
    retry_after = {"Retry-After": str(request.app.state.settings.retry_after_s)}
    if state.database is None:
        raise ApiError(503, "starting", "the service is starting", headers=retry_after)
    try:
        return await state.database.run(work)
    except UNAVAILABLE as exc:
        raise ApiError(503, "database_unavailable", f"the database is unavailable ({type(exc).__name__}); "
                       "try again later", headers=retry_after) from exc
