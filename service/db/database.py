"""One process's handle on the database: engine, sessions, schema check, async bridge.

SQLAlchemy runs synchronously here (psycopg / pysqlite); the event loop never blocks on it:
:meth:`Database.run` executes a unit of work in a small thread pool of its own, in a
transaction (committed on success, rolled back on error).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from service.db.engine import make_engine, make_session_factory
from service.db.migrate import current_revision, head_revision, upgrade_engine

log = logging.getLogger(__name__)
T = TypeVar("T")


class SchemaOutdatedError(RuntimeError):
    """The database schema is behind the code and migrations are not applied automatically."""


class Database:
    """Engine + session factory + a thread pool for async callers."""

    def __init__(self, url: str, *, threads: int = 4) -> None:
        self.url = url
        self.engine: Engine = make_engine(url, pool_size=threads)
        self.sessions = make_session_factory(self.engine)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="genclip-db")

    def ensure_schema(self, migrate: bool) -> str:
        """Apply pending migrations (``migrate``) or check the schema is current."""
        if migrate:
            revision = upgrade_engine(self.engine)
            log.info("database %s at schema %s", self.engine.url.render_as_string(hide_password=True), revision)
            return revision
        revision = current_revision(self.engine)
        if revision != head_revision():
            raise SchemaOutdatedError(
                f"database schema is at {revision or 'nothing'}, the code needs {head_revision()}: "
                "run `genclip db upgrade` (or set GENCLIP_DATABASE_MIGRATE=true)"
            )
        return revision

    def transaction(self, work: Callable[[Session], T]) -> T:
        """Run ``work(session)`` in a transaction (blocking)."""
        with self.sessions.begin() as session:
            return work(session)

    async def run(self, work: Callable[[Session], T]) -> T:
        """:meth:`transaction` off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(self.transaction, work))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.engine.dispose()

    def __repr__(self) -> str:  # never print a password
        return f"Database({self.engine.url.render_as_string(hide_password=True)})"


def open_database(url: str, migrate: bool, threads: int = 4) -> Database:
    """Open ``url`` and make sure its schema is current; closes it again on failure."""
    database = Database(url, threads=threads)
    try:
        database.ensure_schema(migrate)
    except BaseException:
        database.close()
        raise
    return database
