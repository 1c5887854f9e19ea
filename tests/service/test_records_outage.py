"""The database goes away mid-run: /inspect keeps answering, records are buffered and counted,
and every one is written once the database is back.

PostgreSQL: a private server of this test's own (initdb + pg_ctl on a free port, run as the
``postgres`` OS user when the tests run as root), stopped hard (``-m immediate``) and started
again; the shared server is never touched. SQLite: the records table is renamed away by
another connection (every write fails with "no such table") and renamed back.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from svc_fakes import EchoDetector
from svc_helpers import app_client, files, free_port, image_bytes, metric_value, settings_for, solid

from service.db.inspections import InspectionRecord


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on a free loopback port."""

    def __init__(self) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found:
            pytest.fail("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin")
        self.bindir = Path(found[-1]).parent
        self.base = Path(tempfile.mkdtemp(prefix="genclip-pg-"))
        self.data = self.base / "data"
        self.port = free_port()
        self.as_root = os.geteuid() == 0
        if self.as_root:  # the server refuses to run as root
            shutil.chown(self.base, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        cmd = [str(self.bindir / tool), *args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{tool} failed: {done.stdout}\n{done.stderr}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.base / "server.log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def private_postgres():
    server = PrivatePostgres()
    server.start()
    yield server
    server.remove()


async def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def run_outage(database_url: str, break_it, repair) -> None:
    settings = settings_for(database_url=database_url, records_flush_ms=20.0)
    async with app_client(settings, detector=EchoDetector()) as (app, client):
        recorder, database = app.state.service.recorder, app.state.service.database

        async def inspect(i: int) -> str:
            r = await client.post("/inspect", files=files(image_bytes(solid(24, 24, 20 * i))), data={"part_id": f"P{i}"})
            assert r.status_code == 200, r.text
            return r.json()["id"]

        async def metric(name: str) -> float:
            return metric_value((await client.get("/metrics")).text, name)

        before = [await inspect(i) for i in range(3)]
        assert await recorder.flush(10)
        break_it()
        during = [await inspect(i) for i in range(3, 9)]  # the service keeps inspecting
        await wait_for(lambda: _true_if(metric("genclip_records_write_errors_total"), lambda v: v >= 1), 30,
                       "a failed write")
        await wait_for(lambda: _true_if(metric("genclip_records_buffered"), lambda v: v == len(during)), 30,
                       "every record of the outage in the buffer")
        assert await metric("genclip_records_written_total") == len(before)
        r = await client.get("/inspections")
        assert r.status_code == 503 and r.json()["error"] == "database_unavailable"
        repair()
        await wait_for(lambda: _true_if(metric("genclip_records_buffered"), lambda v: v == 0), 60, "the buffer to drain")
        assert await metric("genclip_records_written_total") == len(before) + len(during)
        assert await metric("genclip_records_dropped_total") == 0
        ids = database.transaction(lambda s: list(s.scalars(select(InspectionRecord.id))))
        assert sorted(ids) == sorted(before + during)
        count = database.transaction(lambda s: s.scalar(select(func.count()).select_from(InspectionRecord)))
        assert count == len(before + during)


async def _true_if(value_coro, test) -> bool:
    return test(await value_coro)


@pytest.mark.slow
async def test_postgres_stopped_mid_run(private_postgres) -> None:
    await run_outage(private_postgres.url, private_postgres.stop, private_postgres.start)


async def test_sqlite_records_table_unusable_mid_run(sqlite_url) -> None:
    from sqlalchemy import create_engine

    other = create_engine(sqlite_url)  # another process's connection, e.g. an operator's sqlite3 shell

    def rename(a: str, b: str):
        def run() -> None:
            with other.begin() as connection:
                connection.execute(text(f"ALTER TABLE {a} RENAME TO {b}"))
        return run

    try:
        await run_outage(sqlite_url, rename("inspections", "inspections_away"), rename("inspections_away", "inspections"))
    finally:
        other.dispose()
