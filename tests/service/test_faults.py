"""Fault injection against real processes: a redis-server killed and restarted under load,
workers SIGKILLed, slowloris clients, oversize announcements, a burst of 200.

Every test runs ``genclip serve`` / ``genclip worker`` subprocesses (echo detector, so the
seconds go to the faults, not to a model) and a redis-server of its own when it kills one.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time
from dataclasses import dataclass

import httpx
import pytest
import redis
from live_server import connect, multipart, post_head, read_response
from svc_fakes import EchoDetector, expected_score, wait_for_file
from svc_helpers import app_client, files, image_bytes, noise, settings_for, solid
from svc_procs import RedisServer, genclip, serve, stop, wait_ready

pytestmark = pytest.mark.timeout(120)


@dataclass
class Shot:
    sent: float  # seconds since the load started
    latency: float
    status: int  # -1: no HTTP answer
    code: str = ""


async def _post(client: httpx.AsyncClient, body: bytes, t0: float) -> Shot:
    sent = time.monotonic() - t0
    try:
        r = await client.post("/inspect?heatmap=none", files={"image": ("p.png", body, "image/png")})
    except httpx.HTTPError as exc:
        return Shot(sent, time.monotonic() - t0 - sent, -1, type(exc).__name__)
    code = r.json().get("error", "") if r.status_code != 200 else ""
    return Shot(sent, time.monotonic() - t0 - sent, r.status_code, code)


async def _steady_load(base: str, rate: float, seconds: float, events: dict[float, callable]) -> list[Shot]:
    """Open-loop load at ``rate`` req/s for ``seconds``; ``events`` run (in a thread) at their times."""
    bodies = [image_bytes(noise(16, 16, i)) for i in range(8)]
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
        t0 = time.monotonic()
        tasks, pending_events = [], sorted(events.items())
        i = 0
        while time.monotonic() - t0 < seconds:
            now = time.monotonic() - t0
            while pending_events and pending_events[0][0] <= now:
                _, action = pending_events.pop(0)
                tasks.append(asyncio.create_task(asyncio.to_thread(action)))
            tasks.append(asyncio.create_task(_post(client, bodies[i % len(bodies)], t0)))
            i += 1
            await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        results = await asyncio.gather(*tasks)
    return [r for r in results if isinstance(r, Shot)]


# ====================================================================== Redis restart
@pytest.mark.slow
def test_redis_killed_and_restarted_under_load(tmp_path):
    rds = RedisServer(tmp_path).start()
    env = {"GENCLIP_REDIS_URL": rds.url, "GENCLIP_JOB_TIMEOUT_S": "10", "GENCLIP_MAX_BATCH": "4",
           "GENCLIP_MAX_WAIT_MS": "5"}
    worker = genclip("worker", tmp_path / "worker.log", GENCLIP_WORKER_ID="w1", FAKE_DELAY_S="0.05", **env)
    api, base = serve(tmp_path / "api.log", **env)
    kill_at, restart_at = 2.0, 3.0
    try:
        wait_ready(base, api)
        shots = asyncio.run(_steady_load(base, rate=25, seconds=10.0, events={
            kill_at: rds.kill,
            restart_at: rds.start,
        }))
        ready = httpx.get(base + "/ready", timeout=5)
        alive = worker.poll() is None and api.poll() is None
    finally:
        stop(api, worker)
        rds.kill()
    worker_log = (tmp_path / "worker.log").read_text()
    statuses = {s.status for s in shots}
    assert statuses <= {200, 503}, [(s.sent, s.status, s.code) for s in shots if s.status not in (200, 503)]
    assert max(s.latency for s in shots) < 6.0, "answered well before the 10 s deadline (no waiting it out)"
    during = [s for s in shots if kill_at - 0.3 <= s.sent + s.latency and s.sent <= restart_at]
    assert any(s.status == 503 for s in during)
    assert {s.code for s in shots if s.status == 503} <= {"job_lost", "queue_unavailable", "no_worker", "stalled"}
    before = [s for s in shots if s.sent + s.latency < kill_at - 0.1]
    assert before and all(s.status == 200 for s in before)
    recovered = [s for s in shots if s.sent >= restart_at and s.status == 200]
    assert recovered and recovered[0].sent - restart_at < 5.0, "throughput back within 5 s of the restart"
    late = [s for s in shots if s.sent >= restart_at + 5.0]
    assert late and all(s.status == 200 for s in late), [(s.sent, s.code) for s in late if s.status != 200]
    assert alive and ready.status_code == 200, ready.text
    # The group came back by itself: whichever saw NOGROUP first (the API's admission recreates it
    # before every XADD, the worker on its next read; see test_worker_recreates_a_lost_consumer_group).
    assert worker_log.count("NOGROUP") <= 3, worker_log[-3000:]


async def test_jobs_lost_with_redis_state_answer_503_and_service_recovers(tmp_path):
    """FLUSHALL = what a restart without persistence leaves: no stream, no group, no heartbeats.
    Requests waiting for lost jobs learn it at once; the next requests are served again."""
    rds = RedisServer(tmp_path).start()
    echo = EchoDetector()
    echo.release = threading.Event()
    settings = settings_for(redis_url=rds.url, workers_inline=True, max_batch=1, job_timeout_s=20)
    try:
        async with app_client(settings, detector=echo) as (_app, client):
            held = asyncio.create_task(client.post("/inspect", files=files(image_bytes(noise(8, 8, 1)))))
            await asyncio.to_thread(echo.started.wait, 10)
            queued = asyncio.create_task(client.post("/inspect", files=files(image_bytes(noise(8, 8, 2)))))
            await asyncio.sleep(0.2)
            redis.Redis.from_url(rds.url).flushall()
            flushed = time.monotonic()
            lost = await asyncio.gather(held, queued)
            lost_after = time.monotonic() - flushed
            echo.release.set()  # the worker finishes the lost job: its reply goes nowhere, no harm
            recovered = None
            while time.monotonic() - flushed < 10:
                r = await client.post("/inspect", files=files(image_bytes(noise(8, 8, 3))))
                if r.status_code == 200:
                    recovered = time.monotonic() - flushed
                    break
                assert r.json()["error"] in ("no_worker", "stalled", "queue_unavailable"), r.text
                await asyncio.sleep(0.05)
            ready = await client.get("/ready")
    finally:
        rds.kill()
    for r in lost:
        assert r.status_code == 503 and r.json()["error"] == "job_lost", r.text
    assert lost_after < 3.0  # the deadline is 20 s
    assert recovered is not None and recovered < 3.0
    assert ready.status_code == 200


# ====================================================================== dead workers
def test_sigkilled_single_worker_answers_503_fast(tmp_path):
    rds = RedisServer(tmp_path).start()
    marker = tmp_path / "started"
    env = {"GENCLIP_REDIS_URL": rds.url, "GENCLIP_JOB_TIMEOUT_S": "30", "GENCLIP_MAX_WAIT_MS": "200",
           "GENCLIP_RECLAIM_IDLE_MS": "60000"}
    worker = genclip("worker", tmp_path / "worker.log", GENCLIP_WORKER_ID="only", FAKE_DELAY_S="60",
                     FAKE_MARKER=str(marker), **env)
    api, base = serve(tmp_path / "api.log", **env)
    try:
        wait_ready(base, api)

        async def scenario():
            async with httpx.AsyncClient(base_url=base, timeout=40) as client:
                requests = [asyncio.create_task(client.post("/inspect", files={
                    "image": ("a.png", image_bytes(solid(8, 8, 30 * i)), "image/png")})) for i in range(3)]
                await asyncio.to_thread(wait_for_file, marker)
                worker.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                responses = await asyncio.gather(*requests)
                return responses, time.monotonic() - killed, await client.get("/ready")

        responses, waited, ready = asyncio.run(scenario())
        depth = redis.Redis.from_url(rds.url).xlen("genclip:jobs")
    finally:
        stop(api, worker)
        rds.kill()
    for r in responses:
        assert r.status_code == 503, r.text
        assert r.json()["error"] == "no_worker" and "died" in r.json()["message"]
        assert int(r.headers["retry-after-ms"]) >= 0
    assert waited < 4.0, f"answered {waited:.1f} s after the kill (heartbeat TTL 1 s), not at the 30 s deadline"
    assert depth == 0, "the dead worker's entries left the stream"
    assert ready.status_code == 503 and "no live detector worker" in ready.json()["reason"]


@pytest.mark.slow
def test_dead_workers_jobs_are_taken_over_at_once(tmp_path):
    rds = RedisServer(tmp_path).start()
    marker = tmp_path / "a.started"
    env = {"GENCLIP_REDIS_URL": rds.url, "GENCLIP_JOB_TIMEOUT_S": "30", "GENCLIP_MAX_WAIT_MS": "200",
           "GENCLIP_RECLAIM_IDLE_MS": "60000"}  # XAUTOCLAIM would wait a minute: the takeover must not
    worker_a = genclip("worker", tmp_path / "a.log", GENCLIP_WORKER_ID="worker-a", FAKE_DELAY_S="60",
                       FAKE_MARKER=str(marker), **env)
    api, base = serve(tmp_path / "api.log", **env)
    worker_b = None
    images = [solid(10 + i, 7, 40 * i + 10) for i in range(4)]
    try:
        wait_ready(base, api)

        async def scenario():
            nonlocal worker_b
            async with httpx.AsyncClient(base_url=base, timeout=40) as client:
                requests = [asyncio.create_task(client.post("/inspect?heatmap=none", files={
                    "image": ("a.png", image_bytes(im), "image/png")})) for im in images]
                await asyncio.to_thread(wait_for_file, marker)  # A holds the batch
                worker_b = genclip("worker", tmp_path / "b.log", GENCLIP_WORKER_ID="worker-b", **env)
                await asyncio.to_thread(wait_ready, base, api, 60, 2)
                worker_a.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                responses = await asyncio.gather(*requests)
                return responses, time.monotonic() - killed

        responses, waited = asyncio.run(scenario())
    finally:
        stop(api, worker_a, *([worker_b] if worker_b else []))
        rds.kill()
    for im, r in zip(images, responses, strict=True):
        assert r.status_code == 200, r.text
        assert r.headers["x-worker-id"] == "worker-b"
        assert r.json()["score"] == pytest.approx(expected_score(im), abs=1e-6)
    assert waited < 4.0, f"taken over {waited:.1f} s after the kill (heartbeat TTL 1 s, reclaim idle 60 s)"
    assert "took over" in (tmp_path / "b.log").read_text()


# ====================================================================== hostile clients
@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """`genclip serve` with the in-process queue and short body timeouts."""
    tmp = tmp_path_factory.mktemp("embedded")
    api, base = serve(tmp / "api.log", GENCLIP_BODY_TIMEOUT_S="3", GENCLIP_BODY_IDLE_TIMEOUT_S="2",
                      GENCLIP_HEADER_TIMEOUT_S="2", GENCLIP_MAX_INFLIGHT_REQUESTS="16",
                      FAKE_DELAY_S="0.01")
    try:
        wait_ready(base, api)
        yield base
    finally:
        stop(api)


@pytest.mark.slow
def test_slowloris_uploads_are_cut_and_do_not_starve_others(embedded):
    base = embedded
    data, ctype = multipart([("image", "a.png", image_bytes(noise(16, 16)), "image/png")])
    n_slow = 40
    results: list[tuple[bytes, float]] = []

    def slow_client() -> None:
        with connect(base, timeout=10) as sock:
            started = time.monotonic()
            sock.sendall(post_head("/inspect", ctype, len(data)))
            sock.settimeout(0.5)
            answer, sent = b"", 0
            while not answer and time.monotonic() - started < 8:
                try:
                    sock.sendall(data[sent:sent + 1])  # 2 bytes/s
                    sent += 1
                    answer = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
            results.append((answer, time.monotonic() - started))

    threads = [threading.Thread(target=slow_client) for _ in range(n_slow)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    normal = []
    with httpx.Client(base_url=base, timeout=10) as client:
        for i in range(20):
            normal.append(client.post("/inspect?heatmap=none", files={
                "image": ("p.png", image_bytes(noise(12, 12, i)), "image/png")}))
            time.sleep(0.1)
    for t in threads:
        t.join(15)
    assert [r.status_code for r in normal] == [200] * 20  # more slow clients than in-flight slots
    assert len(results) == n_slow
    for answer, elapsed in results:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert b'"request_timeout"' in answer
        assert 2.9 <= elapsed < 7.0


def test_oversize_announcement_gets_413_at_once(embedded):
    with connect(embedded) as sock:
        started = time.monotonic()
        sock.sendall(post_head("/inspect", "multipart/form-data; boundary=x", 10 * 1024**3))
        r = read_response(sock, started)
    assert r.status == 413 and r.json()["error"] == "payload_too_large"
    assert r.elapsed < 2.0 and r.closed
    with socket.create_connection(("127.0.0.1", int(embedded.rsplit(":", 1)[1])), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64)  # TLS to a plain port
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 400") and b'"bad_request"' in answer


@pytest.mark.slow
def test_burst_of_200_gets_answers_not_pool_errors(tmp_path, redis_url):
    env = {"GENCLIP_REDIS_URL": redis_url, "GENCLIP_REDIS_PREFIX": f"burst{time.time_ns()}",
           "GENCLIP_QUEUE_MAX_DEPTH": "16", "GENCLIP_JOB_TIMEOUT_S": "10", "GENCLIP_MAX_BATCH": "8"}
    worker = genclip("worker", tmp_path / "worker.log", FAKE_DELAY_S="0.02", **env)
    api, base = serve(tmp_path / "api.log", **env)
    try:
        wait_ready(base, api)

        async def burst():
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
            body = image_bytes(noise(16, 16))
            async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as client:
                t0 = time.monotonic()
                return await asyncio.gather(*(_post(client, body, t0) for _ in range(200)))

        shots = asyncio.run(burst())
        after = httpx.post(base + "/inspect?heatmap=none", timeout=10,
                           files={"image": ("p.png", image_bytes(noise(8, 8)), "image/png")})
    finally:
        stop(api, worker)
    assert len(shots) == 200
    assert {s.status for s in shots} <= {200, 503}, {(s.status, s.code) for s in shots}
    assert {s.code for s in shots if s.status == 503} <= {"queue_full", "overloaded"}
    assert sum(s.status == 200 for s in shots) >= 16
    assert sum(s.status == 503 for s in shots) >= 100
    assert max(s.latency for s in shots) < 10.0
    assert after.status_code == 200
    assert "Too many connections" not in (tmp_path / "api.log").read_text()


async def test_worker_recreates_a_lost_consumer_group(redis_url, prefix, caplog):
    """Stream and group gone (what a restarted Redis without persistence looks like): the
    worker's next read recreates the group and goes on receiving jobs."""
    import logging

    import redis.asyncio as aioredis
    from PIL import Image

    from service.queue.base import Job
    from service.queue.jobs import encode_job
    from service.queue.redis_streams import RedisKeys, RedisWorkSource
    from service.settings import Settings

    settings = Settings(_env_file=None, redis_url=redis_url, redis_prefix=prefix)
    source = RedisWorkSource(settings, consumer="w-nogroup")
    client = aioredis.Redis.from_url(redis_url)
    keys = RedisKeys(prefix)
    try:
        await source.register("w-nogroup", {"name": "echo"})
        assert await source.receive(4, 0.05) == []
        await client.delete(keys.stream)  # the group lived in the stream key: both gone
        with caplog.at_level(logging.WARNING, logger="service.queue.redis_streams"):
            assert await source.receive(4, 0.05) == []
        assert "recreating" in caplog.text
        job = Job(id="j1", class_name=None, deadline=time.time() + 30, image=Image.new("RGB", (8, 8)))
        await client.xadd(keys.stream, encode_job(job, raw_max_bytes=1 << 20))
        received = await source.receive(4, 1.0)
        assert [j.id for j in received] == ["j1"]
    finally:
        await source.close()
        await client.aclose()
