"""Real processes: worker subprocesses on Redis (SIGKILL / SIGTERM), a real `serve` under
uvicorn hit over loopback HTTP, and the offline /docs page rendered by headless Chromium."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import pytest
from svc_fakes import expected_score, wait_for_file
from svc_helpers import (
    ROOT,
    app_client,
    decode_png_b64,
    files,
    free_port,
    image_bytes,
    noise,
    settings_for,
    solid,
    subprocess_env,
)


def start_worker(redis_url: str, prefix: str, worker_id: str, **env: str) -> subprocess.Popen:
    environment = subprocess_env(
        GENCLIP_REDIS_URL=redis_url,
        GENCLIP_REDIS_PREFIX=prefix,
        GENCLIP_WORKER_ID=worker_id,
        GENCLIP_DETECTOR_FACTORY="svc_fakes:echo_factory",
        GENCLIP_MAX_BATCH="8",
        GENCLIP_MAX_WAIT_MS="300",
        GENCLIP_HEARTBEAT_INTERVAL_S="0.2",
        GENCLIP_HEARTBEAT_TTL_S="1.0",
        GENCLIP_RECLAIM_IDLE_MS="800",
        GENCLIP_LOG_LEVEL="warning",
        **env,
    )
    return subprocess.Popen([sys.executable, "-m", "service.cli_serve", "worker"], cwd=ROOT, env=environment)


async def wait_ready(client: httpx.AsyncClient, worker_id: str | None = None, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await client.get("/ready")
        if r.status_code == 200 and (worker_id is None or
                                     any(w["worker_id"] == worker_id for w in r.json()["workers"])):
            return r.json()
        await asyncio.sleep(0.1)
    raise TimeoutError("service never became ready")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


async def test_sigkilled_worker_jobs_are_finished_by_another_worker(redis_url, prefix, tmp_path):
    marker = tmp_path / "a.started"
    settings = settings_for(redis_url=redis_url, redis_prefix=prefix, job_timeout_s=60)
    worker_a = start_worker(redis_url, prefix, "worker-a", FAKE_DELAY_S="120", FAKE_MARKER=str(marker))
    worker_b = None
    try:
        async with app_client(settings, start_worker=False) as (_app, client):
            await wait_ready(client, "worker-a")
            images = [solid(11 + i, 7, 40 * i + 10) for i in range(5)]
            requests = [asyncio.create_task(client.post("/inspect", files=files(image_bytes(im))))
                        for im in images]
            # worker A is inside detector.inspect with the whole batch
            started = await asyncio.to_thread(wait_for_file, marker)
            assert started.split()[1] == "5", started
            # a second worker is alive when A dies (with none alive, the requests would get a fast
            # 503 no_worker instead: tests/service/test_faults.py)
            worker_b = start_worker(redis_url, prefix, "worker-b")
            await wait_ready(client, "worker-b")
            worker_a.send_signal(signal.SIGKILL)
            assert worker_a.wait(10) == -signal.SIGKILL
            assert not any(t.done() for t in requests)
            responses = await asyncio.wait_for(asyncio.gather(*requests), 45)
            live = set()
            for _ in range(100):  # A's heartbeat expires (TTL 1 s), B's stays
                live = {w["worker_id"] for w in (await wait_ready(client, "worker-b"))["workers"]}
                if live == {"worker-b"}:
                    break
                await asyncio.sleep(0.1)
    finally:
        stop(worker_a)
        if worker_b is not None:
            worker_b.send_signal(signal.SIGTERM)
            try:
                worker_b.wait(15)
            finally:
                stop(worker_b)
    for im, r in zip(images, responses, strict=True):
        assert r.status_code == 200, r.text
        assert r.headers["x-worker-id"] == "worker-b"
        assert r.json()["score"] == pytest.approx(expected_score(im), abs=1e-6)
        assert decode_png_b64(r.json()["heatmap_png"]).size == im.size
    assert live == {"worker-b"}  # the dead worker dropped out of /ready
    assert worker_b.returncode == 0


async def test_sigterm_worker_finishes_its_batch_then_leaves(redis_url, prefix, tmp_path):
    marker = tmp_path / "c.started"
    settings = settings_for(redis_url=redis_url, redis_prefix=prefix, job_timeout_s=60)
    worker = start_worker(redis_url, prefix, "worker-c", FAKE_DELAY_S="1.5", FAKE_MARKER=str(marker))
    try:
        async with app_client(settings, start_worker=False) as (_app, client):
            await wait_ready(client, "worker-c")
            images = [solid(9, 9, 50 * i) for i in range(3)]
            requests = [asyncio.create_task(client.post("/inspect", files=files(image_bytes(im))))
                        for im in images]
            await asyncio.to_thread(wait_for_file, marker)
            worker.send_signal(signal.SIGTERM)  # mid-batch
            responses = await asyncio.wait_for(asyncio.gather(*requests), 30)
            code = await asyncio.to_thread(worker.wait, 15)
            after = await client.get("/ready")
            late = await client.post("/inspect", files=files(image_bytes(noise(8, 8))))
    finally:
        stop(worker)
    assert code == 0
    for im, r in zip(images, responses, strict=True):
        assert r.status_code == 200 and r.json()["score"] == pytest.approx(expected_score(im), abs=1e-6)
    assert after.status_code == 503  # unregistered at once, not after the heartbeat TTL
    assert late.status_code == 503 and late.json()["error"] == "no_worker"


# ====================================================================== genclip serve under uvicorn
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`genclip serve` (in-process queue, tiny real backbone) on a free loopback port."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    log_file = open(log_path, "w")  # noqa: SIM115
    env = subprocess_env(GENCLIP_MAX_UPLOAD_BYTES="200000", GENCLIP_LOG_LEVEL="info")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli_serve", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--detector", "baseline", "--backbone", "tiny-clip-random", "--backbone-weights", "random",
         "--device", "cpu"],
        cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(base + "/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            pytest.fail("genclip serve did not become ready")
        time.sleep(0.2)
    yield base, proc, log_path
    stop(proc)
    log_file.close()


def test_serve_over_real_http(served):
    base, _proc, _log = served
    img = noise(150, 100, seed=7)
    with httpx.Client(base_url=base, timeout=30) as client:
        r = client.post("/inspect", files=files(image_bytes(img, "JPEG"), "p.jpg", "image/jpeg"),
                        data={"class_name": "bottle"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["detector"], body["backbone"]) == ("baseline", "tiny-clip-random")
        assert 0 <= body["score"] <= 1 and decode_png_b64(body["heatmap_png"]).size == (150, 100)
        # a body over the limit, sent for real: the client reads the 413 (no reset mid-upload)
        big = client.post("/inspect", files=files(b"\0" * 3_000_000))
        assert big.status_code == 413 and big.json()["error"] == "payload_too_large"
        metrics = client.get("/metrics").text
        assert 'genclip_http_requests_total{endpoint="/inspect",method="POST",status="413"} 1.0' in metrics
        # the start-up heap (model included) is frozen: no full GC pass over it while serving
        frozen = float(next(line.split()[1] for line in metrics.splitlines()
                            if line.startswith("genclip_gc_frozen_objects ")))
        assert frozen > 10_000, frozen
        # and the server is still fine
        assert client.post("/inspect?heatmap=none", files=files(image_bytes(img))).status_code == 200


def test_docs_page_renders_offline_in_headless_chromium(served):
    base, _proc, _log = served
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
             "--dump-dom", base + "/docs"],
            capture_output=True, text=True, timeout=120,
        )
    dom = out.stdout
    assert out.returncode == 0, out.stderr[-2000:]
    # these nodes only exist once swagger-ui-bundle.js (served by us) ran and fetched /openapi.json
    assert 'class="swagger-ui' in dom
    assert "opblock" in dom and "/inspect" in dom, dom[-3000:]
    assert "GenCLIP inspection service" in dom


def test_serve_exits_cleanly_on_sigterm(served):
    _base, proc, log_path = served
    proc.send_signal(signal.SIGTERM)
    # uvicorn re-raises the signal after its graceful shutdown: -SIGTERM is a clean exit here
    assert proc.wait(30) in (0, -signal.SIGTERM)
    log = log_path.read_text()
    assert "Application shutdown complete" in log, log[-2000:]
    assert "Traceback" not in log, log[-4000:]


def test_serve_reports_missing_weights_clearly(tmp_path):
    env = subprocess_env(GENCLIP_CLIP_CACHE_DIR=str(tmp_path), HF_HUB_OFFLINE="1")
    env.pop("GENCLIP_BACKBONE_WEIGHTS", None)
    out = subprocess.run(
        [sys.executable, "-m", "service.cli_serve", "serve", "--port", str(free_port()),
         "--backbone", "ViT-B-16", "--backbone-weights", str(tmp_path / "missing.safetensors")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2
    assert "cannot load the detector" in out.stderr and "missing.safetensors" in out.stderr


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_python_m_service_worker_needs_redis():
    out = subprocess.run([sys.executable, "-m", "service.cli_serve", "worker"], cwd=ROOT,
                         env=subprocess_env(GENCLIP_REDIS_URL=""), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "REDIS_URL" in out.stderr
