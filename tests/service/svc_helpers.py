"""Helpers shared by the service tests (images, app client, metrics parsing, subprocess env)."""

from __future__ import annotations

import base64
import io
import os
import socket
import struct
import zlib
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@asynccontextmanager
async def app_client(settings, **kwargs):
    """The real ASGI app (lifespan run) behind an httpx client."""
    from service.app import create_app

    app = create_app(settings, **kwargs)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc", timeout=60) as client:
            yield app, client


def settings_for(**overrides):
    """Test settings; without a ``database_url``, a private SQLite file in a fresh temp dir."""
    import tempfile

    from service.settings import Settings

    base = {"max_wait_ms": 5.0, "job_timeout_s": 20.0, "heartbeat_interval_s": 0.2, "heartbeat_ttl_s": 2.0}
    folder = tempfile.mkdtemp(prefix="genclip-test-")
    if "database_url" not in overrides:
        base["database_url"] = f"sqlite:///{folder}/genclip.db"
    base["records_dir"] = f"{folder}/records"
    base.update(overrides)
    return Settings(_env_file=None, **base)


# ------------------------------------------------------------------ images
def image_bytes(img: Image.Image, fmt: str = "PNG", **save_kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kw)
    return buf.getvalue()


def solid(width: int, height: int, value: int | tuple = 128, mode: str = "RGB") -> Image.Image:
    """A uniform image; an int value means that grey level."""
    if isinstance(value, int) and mode == "RGB":
        value = (value, value, value)
    return Image.new(mode, (width, height), value)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A syntactically valid PNG claiming ``width`` x ``height`` with almost no pixel data."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def decode_png_b64(text: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(text)))
    assert img.format == "PNG"
    img.load()
    return img


def files(data: bytes, filename: str = "part.png", content_type: str = "image/png") -> dict:
    return {"image": (filename, data, content_type)}


def metric_value(text: str, name: str, labels: dict | None = None) -> float:
    """Sum of a Prometheus sample (exact name) matching all given labels."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        metric, _, label_text = head.partition("{")
        if metric != name:
            continue
        if labels and not all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            continue
        total += float(value)
    return total


def wait_until_ready(base: str, proc, timeout: float = 120.0) -> bool:
    """Poll ``base + /ready`` until 200; ``False`` if ``proc`` exits or the time runs out."""
    import time

    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(base + "/ready", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


def subprocess_env(**extra: str) -> dict:
    """Environment for a ``genclip`` subprocess: this checkout importable, a private database."""
    import tempfile

    env = dict(os.environ)
    folder = tempfile.mkdtemp(prefix="genclip-proc-")
    env["GENCLIP_DATABASE_URL"] = f"sqlite:///{folder}/genclip.db"
    env["GENCLIP_RECORDS_DIR"] = f"{folder}/records"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def assert_error(response, status: int, code: str | None = None) -> dict:
    """The answer is the JSON error body of ``status`` (and ``code`` when given)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["status"] == status and body["message"]
    if code is not None:
        assert body["error"] == code, body
    return body
