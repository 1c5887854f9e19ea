"""The schema: migrations match the ORM tables, are idempotent and safe to run concurrently."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from service.db import inspections, products  # noqa: F401  (tables on the metadata)
from service.db.base import Base
from service.db.engine import make_engine
from service.db.migrate import current_revision, head_revision, upgrade

ROOT = Path(__file__).resolve().parents[2]


def test_migrations_build_the_orm_schema_and_are_idempotent(database_url) -> None:
    assert upgrade(database_url) == head_revision()
    assert upgrade(database_url) == head_revision()  # second run: nothing to do, no error
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
            tables = set(inspect(connection).get_table_names())
        assert diff == [], f"migrations and ORM models disagree: {diff}"
        assert {"products", "product_images", "product_references", "inspections", "inspection_reviews",
                "alembic_version"} <= tables
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_concurrent_upgrades_from_several_processes(database_url) -> None:
    """API and workers start together and all migrate: exactly one applies, none fails."""
    script = f"from service.db.migrate import upgrade; print(upgrade({database_url!r}))"
    procs = [
        subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err
        assert out.strip() == head_revision()


def test_cli_db_upgrade_and_current(sqlite_url) -> None:
    def genclip(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)

    before = genclip("db", "current", "--database-url", sqlite_url)
    assert before.returncode == 0 and "behind head" in before.stdout
    done = genclip("db", "upgrade", "--database-url", sqlite_url)
    assert done.returncode == 0 and head_revision() in done.stdout
    after = genclip("db", "current", "--database-url", sqlite_url)
    assert "up to date" in after.stdout
    bad = genclip("db", "current", "--database-url", "mysql://nowhere/db")
    assert bad.returncode == 2 and "unsupported database" in bad.stderr
