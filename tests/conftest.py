"""Shared fixtures: the tiny random backbone (built once) and small images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.backbone import ClipBackbone, load_backbone
from model.weights_source import TINY_MODEL_NAME, BackboneSpec

TINY_SPEC = BackboneSpec(TINY_MODEL_NAME, "random")


@pytest.fixture(scope="session")
def tiny_backbone() -> ClipBackbone:
    torch.manual_seed(0)
    return load_backbone(TINY_SPEC)


@pytest.fixture
def single_thread():
    """One intra-op torch thread for the test, restored afterwards (heavy tests on shared cores:
    two spinning OpenMP threads per process slow everyone down)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def random_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (33, 47, 3), dtype=np.uint8)),
    ]


# ---------------------------------------------------------------------- databases
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _postgres_admin():
    import psycopg

    try:
        return psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL} ({error}); start it with "
                    "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`")


@pytest.fixture
def postgres_url():
    """A fresh PostgreSQL database on the local server, dropped after the test."""
    import uuid

    name = f"genclip_test_{uuid.uuid4().hex[:12]}"
    with _postgres_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    with _postgres_admin() as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'genclip.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request) -> str:
    """Each test using it runs on both backends: a SQLite file and a fresh PostgreSQL database."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")
