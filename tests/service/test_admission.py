"""Admission from the measured service rate and the deadline; progress, not heartbeats, makes
a service ready (real ASGI app, in-process transport)."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future

from svc_fakes import EchoDetector
from svc_helpers import app_client, files, image_bytes, metric_value, noise, settings_for

from service.admission import Admission
from service.metrics import Metrics
from service.queue.progress import QueueLoad, WorkerLoad, WorkerProgress


HELD_HEADERS = {"Content-Type": "multipart/form-data; boundary=bb"}


async def body_held_until(gate: asyncio.Event):
    """A multipart upload whose file part stops half-way until ``gate`` is set."""
    yield b'--bb\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    await gate.wait()
    yield image_bytes(noise(8, 8)) + b"\r\n--bb--\r\n"


def _load(depth: int, *workers: WorkerProgress | None) -> QueueLoad:
    return QueueLoad(depth, [WorkerLoad(f"w{i}", {}, p) for i, p in enumerate(workers)])


def test_admission_policy_units():
    settings = settings_for(queue_max_depth=64, job_timeout_s=10, admission_headroom=0.8, retry_after_s=3,
                            heartbeat_ttl_s=2.0)
    adm = Admission(settings, lambda: None, Metrics())
    idle = WorkerProgress(progress_age_s=0.1, busy_s=None, rate=None, batch_s=None)
    fast = WorkerProgress(progress_age_s=0.1, busy_s=None, rate=20.0, batch_s=0.4)
    slow = WorkerProgress(progress_age_s=0.1, busy_s=0.2, rate=5.0, batch_s=0.4)
    # no measurement yet: the configured depth
    assert adm.limit(_load(0, idle), 10) == 64
    # rate x (remaining x headroom - batch): 25 x (10 x 0.8 - 0.4) = 190, capped at 64; 25 x (2 x 0.8 - 0.4) = 30
    assert adm.limit(_load(0, fast, slow), 10) == 64
    assert adm.limit(_load(0, fast, slow), 2) == 30
    assert adm.limit(_load(0, fast), 0.1) == 1  # an empty queue always takes one job
    refusal = adm.decide(_load(40, fast, slow), 2)
    assert refusal.code == "queue_full" and refusal.retry_after_ms == int(1000 * 11 / 25)
    assert adm.decide(_load(29, fast, slow), 2) is None
    assert adm.decide(_load(0), 10).code == "no_worker"
    stuck = WorkerProgress(progress_age_s=5.0, busy_s=5.0, rate=20.0, batch_s=0.4)
    assert adm.decide(_load(3, stuck), 10).code == "stalled"
    assert adm.decide(_load(0, stuck), 10) is None  # nothing waits: nothing is stalled
    long_batch = WorkerProgress(progress_age_s=5.0, busy_s=5.0, rate=1.0, batch_s=4.0)
    assert adm.decide(_load(3, long_batch), 30) is None  # within 3 x its usual batch time
    assert adm.decide(_load(3, stuck, idle), 10) is None  # another worker progresses
    warming = WorkerProgress(progress_age_s=5.0, busy_s=5.0, rate=None, batch_s=None)
    assert adm.decide(_load(3, warming), 10) is None  # a first batch may take up to the deadline
    cold = WorkerProgress(progress_age_s=11.0, busy_s=11.0, rate=None, batch_s=None)
    assert adm.decide(_load(3, cold), 10).code == "stalled"


def test_early_gate_counts_the_uploads_it_let_through_since_the_load_was_read():
    """peek() decides from a cached load; the uploads it passed meanwhile are on their way to
    the queue, so it lets through only what fits, not every request of the cache's lifetime."""
    settings = settings_for(queue_max_depth=10, job_timeout_s=10, admission_headroom=0.8, heartbeat_ttl_s=2.0)
    adm = Admission(settings, lambda: None, Metrics())
    idle = WorkerProgress(progress_age_s=0.1, busy_s=None, rate=None, batch_s=None)
    assert adm.peek() is None  # nothing known yet: the full precheck decides
    done: Future = Future()
    done.set_result(_load(7, idle))
    adm._refreshed(done)  # a fresh load: 7 queued, limit 10
    verdicts = [adm.peek() for _ in range(5)]
    assert [v is None for v in verdicts] == [True, True, True, False, False]
    assert verdicts[3].code == "queue_full" and "on their way" in verdicts[3].message
    fresh: Future = Future()
    fresh.set_result(_load(8, idle))
    adm._refreshed(fresh)  # the next load includes what arrived: the count starts again
    assert adm.peek() is None and adm.peek() is None and adm.peek().code == "queue_full"


async def test_admits_only_what_the_workers_answer_within_the_deadline():
    """1.5 s deadline, one job at a time at ~0.1 s each: ~11 of 40 concurrent requests fit."""
    echo = EchoDetector(delay_s=0.1)
    settings = settings_for(max_batch=1, max_wait_ms=0, job_timeout_s=1.5, queue_max_depth=64)
    async with app_client(settings, detector=echo) as (app, client):
        for i in range(3):  # the service rate gets measured
            assert (await client.post("/inspect?heatmap=none", files=files(image_bytes(noise(8, 8, i))))).status_code == 200
        rate = (await app.state.service.queue.load()).rate
        started = time.monotonic()

        async def one(i: int):
            t0 = time.monotonic()
            r = await client.post("/inspect?heatmap=none", files=files(image_bytes(noise(8, 8, 100 + i))))
            return r, time.monotonic() - t0

        results = await asyncio.gather(*(one(i) for i in range(40)))
        total = time.monotonic() - started
        metrics = (await client.get("/metrics")).text
    assert 5 < rate < 12, rate
    codes = [r.status_code for r, _ in results]
    ok = [(r, s) for r, s in results if r.status_code == 200]
    refused = [(r, s) for r, s in results if r.status_code == 503]
    assert set(codes) <= {200, 503}, codes  # nothing admitted that then missed its deadline (504)
    assert 6 <= len(ok) <= 16, codes
    assert all(s < 2.0 for _, s in ok)  # deadline 1.5 s (+ the guard's 0.5 s backstop)
    for r, s in refused:
        assert r.json()["error"] == "queue_full" and s < 1.0
        assert 50 <= r.json()["retry_after_ms"] <= 30_000
        assert int(r.headers["retry-after-ms"]) == r.json()["retry_after_ms"]
    assert total < 3.0
    assert metric_value(metrics, "genclip_rejections_total", {"reason": "queue_full"}) == len(refused)


async def test_ready_and_admission_need_progress_not_just_a_live_worker():
    echo = EchoDetector()
    echo.release = threading.Event()
    settings = settings_for(max_batch=1, heartbeat_interval_s=0.1, heartbeat_ttl_s=0.5)
    async with app_client(settings, detector=echo) as (_app, client):
        echo.release.set()  # one batch first: its length is what "usual" means
        assert (await client.post("/inspect", files=files(image_bytes(noise(8, 8, 0))))).status_code == 200
        echo.release.clear()
        echo.started.clear()
        assert (await client.get("/ready")).status_code == 200
        stuck = asyncio.create_task(client.post("/inspect", files=files(image_bytes(noise(8, 8, 1)))))
        await asyncio.to_thread(echo.started.wait, 10)
        waiting = asyncio.create_task(client.post("/inspect", files=files(image_bytes(noise(8, 8, 2)))))
        await asyncio.sleep(0.1)
        early = await client.get("/ready")  # busy for 0.1 s: still progressing
        await asyncio.sleep(0.6)
        ready = await client.get("/ready")
        refused = await client.post("/inspect", files=files(image_bytes(noise(8, 8, 3))))
        echo.release.set()
        responses = await asyncio.gather(stuck, waiting)
        await asyncio.sleep(0.05)
        again = await client.get("/ready")
    assert early.status_code == 200
    assert ready.status_code == 503 and "made progress" in ready.json()["reason"], ready.json()
    assert ready.json()["queue_depth"] == 2 and ready.json()["workers"][0]["progress_age_s"] >= 0.5
    assert int(ready.headers["retry-after-ms"]) >= 0
    assert refused.status_code == 503 and refused.json()["error"] == "stalled"
    assert [r.status_code for r in responses] == [200, 200]
    assert again.status_code == 200 and again.json()["workers"][0]["jobs_per_s"] > 0


async def test_inflight_slots_count_only_uploads_that_have_arrived():
    """Uploads still arriving hold no in-flight slot: a slow body does not starve the others."""
    echo = EchoDetector()
    settings = settings_for(max_inflight_requests=1)
    gate = asyncio.Event()
    async with app_client(settings, detector=echo) as (_app, client):
        slow = asyncio.create_task(client.post("/inspect", content=body_held_until(gate), headers=HELD_HEADERS))
        await asyncio.sleep(0.2)
        fast = await client.post("/inspect", files=files(image_bytes(noise(8, 8, 5))))
        gate.set()
        slow = await slow
    assert fast.status_code == 200, fast.text
    assert slow.status_code == 200, slow.text


async def test_answered_by_the_deadline_whatever_the_route_waits_for():
    """The thread pool that decodes uploads is stuck: the upload guard still answers 504 at the
    request deadline (plus its grace), instead of letting the request wait for the pool."""
    settings = settings_for(cpu_threads=1, job_timeout_s=0.5)
    async with app_client(settings, detector=EchoDetector()) as (app, client):
        app.state.service.pool.submit(time.sleep, 3.0)  # the decode pool is busy for 3 s
        t0 = time.monotonic()
        r = await client.post("/inspect", files=files(image_bytes(noise(8, 8))))
        waited = time.monotonic() - t0
        metrics = (await client.get("/metrics")).text
    assert r.status_code == 504 and r.json()["error"] == "deadline_exceeded", r.text
    assert "request deadline (0.5 s)" in r.json()["message"]
    assert 0.9 <= waited < 3.0
    assert metric_value(metrics, "genclip_rejections_total", {"reason": "deadline_exceeded"}) == 1


async def test_upload_slower_than_the_deadline_gets_408():
    settings = settings_for(job_timeout_s=0.5)
    gate = asyncio.Event()
    async with app_client(settings, detector=EchoDetector()) as (_app, client):
        t0 = time.monotonic()
        task = asyncio.create_task(client.post("/inspect", content=body_held_until(gate), headers=HELD_HEADERS))
        done, _ = await asyncio.wait({task}, timeout=3)
        waited = time.monotonic() - t0
        gate.set()
        r = await task
    assert done, "answered while the body was still arriving"
    assert r.status_code == 408 and r.json()["error"] == "request_timeout", r.text
    assert r.headers["connection"] == "close" and 0.9 <= waited < 3.0
