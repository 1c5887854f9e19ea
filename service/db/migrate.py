"""Alembic migrations, applied programmatically and idempotently.

``upgrade(url)`` brings a database to the newest schema; it is safe to call from every process
at start-up (API and workers starting together): PostgreSQL serialises concurrent upgrades
with an advisory lock held by the migration transaction, SQLite with a lock file beside the
database. ``genclip db upgrade`` / ``genclip db current`` call the same functions.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

from service.db.engine import is_sqlite, make_engine, sqlite_path

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PG_LOCK_KEY = 0x67656E636C6970  # "genclip"


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


@contextlib.contextmanager
def _sqlite_lock(url: str) -> Iterator[None]:
    path = sqlite_path(url)
    if path is None:
        yield
        return
    lock_path = path.with_name(path.name + ".migrate-lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def upgrade_engine(engine: Engine, revision: str = "head") -> str:
    """Apply pending migrations on ``engine``; returns the revision the database is at."""
    url = engine.url.render_as_string(hide_password=False)
    if is_sqlite(url):
        with _sqlite_lock(url), engine.begin() as connection:
            command.upgrade(alembic_config(connection), revision)
    else:
        with engine.begin() as connection:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            command.upgrade(alembic_config(connection), revision)
    current = current_revision(engine)
    assert current is not None
    return current


def upgrade(url: str, revision: str = "head") -> str:
    """Open ``url``, apply pending migrations, close; returns the current revision."""
    engine = make_engine(url)
    try:
        return upgrade_engine(engine, revision)
    finally:
        engine.dispose()
