"""Alembic environment: runs on the connection handed over by :mod:`service.db.migrate`."""

from __future__ import annotations

from alembic import context

from service.db.base import Base
from service.db import inspections, products  # noqa: F401  (registers the tables on Base.metadata)

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - always called through service.db.migrate
    raise RuntimeError("run migrations through service.db.migrate (genclip db upgrade)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
