"""The guarded HTTP protocol (service.http_server) on a real uvicorn, spoken to with raw sockets:
malformed HTTP, slow headers and bodies, oversized announcements, load shedding, arrival time."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from live_server import connect, live_server, multipart, post_head, raw_exchange, read_response
from svc_fakes import EchoDetector
from svc_helpers import files, image_bytes, metric_value, noise, settings_for

FAST = {"header_timeout_s": 0.6, "body_timeout_s": 1.5, "body_idle_timeout_s": 0.6}


def assert_json_error(r, status: int, code: str) -> dict:
    assert r.status == status, (r.status, r.body)
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["status"] == status and body["error"] == code and body["message"], body
    return body


@pytest.fixture(scope="module")
def server():
    settings = settings_for(max_upload_bytes=100_000, http_max_loop_lag_ms=0, **FAST)
    with live_server(settings, detector=EchoDetector()) as (base, app, srv):
        yield base, app


def test_malformed_http_is_answered_json_400(server):
    base, _app = server
    for junk in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
                 b"POST /inspect HTTP/1.1\r\nContent-Length: abc\r\n\r\n"):
        r = raw_exchange(base, junk)
        body = assert_json_error(r, 400, "bad_request")
        assert "malformed HTTP request" in body["message"]
        assert r.closed


def test_broken_multipart_is_json_400(server):
    base, _app = server
    body = b"--b0\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\nxx--wrong"
    r = raw_exchange(base, post_head("/inspect", "multipart/form-data; boundary=zz", len(body)) + body)
    assert_json_error(r, 400, "bad_request")


def test_oversize_announcement_answered_at_once(server):
    base, _app = server
    with connect(base) as sock:
        started = time.monotonic()
        sock.sendall(post_head("/inspect", "multipart/form-data; boundary=x", 10 * 1024**3))  # and nothing else
        r = read_response(sock, started)
    body = assert_json_error(r, 413, "payload_too_large")
    assert str(10 * 1024**3) in body["message"]
    assert r.elapsed < 2.0 and r.closed
    # the same on a route that never reads a body
    r = raw_exchange(base, b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 10737418240\r\n\r\n")
    assert_json_error(r, 413, "payload_too_large")


def test_slow_headers_get_408_and_silent_connections_are_closed(server):
    base, _app = server
    with connect(base) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /inspect HTTP/1.1\r\nHost: x\r\n")  # headers never finish
        r = read_response(sock, started)
    body = assert_json_error(r, 408, "request_timeout")
    assert "headers" in body["message"] and 0.5 <= r.elapsed < 3.0 and r.closed
    with connect(base) as sock:  # connects, sends nothing: closed without an answer
        started = time.monotonic()
        assert sock.recv(100) == b""
        assert 0.5 <= time.monotonic() - started < 3.0


def test_headers_too_large_get_431(server):
    base, _app = server
    r = raw_exchange(base, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    assert_json_error(r, 431, "headers_too_large")


def test_body_that_never_starts_gets_408(server):
    base, _app = server
    data, ctype = multipart([("image", "a.png", image_bytes(noise(8, 8)), "image/png")])
    with connect(base) as sock:
        started = time.monotonic()
        sock.sendall(post_head("/inspect", ctype, len(data)))  # headers, then silence
        r = read_response(sock, started)
    body = assert_json_error(r, 408, "request_timeout")
    assert "no request body bytes" in body["message"] and 0.5 <= r.elapsed < 3.0 and r.closed


def test_slowloris_body_gets_408_within_the_body_timeout(server):
    base, _app = server
    data, ctype = multipart([("image", "a.png", image_bytes(noise(16, 16)), "image/png")])
    with connect(base) as sock:
        started = time.monotonic()
        sock.sendall(post_head("/inspect", ctype, len(data)))
        sock.settimeout(0.2)
        sent = 0
        response = b""
        while time.monotonic() - started < 5 and not response:
            try:
                sock.sendall(data[sent:sent + 2])  # 2 bytes every 0.2 s: never idle, never done
                sent += 2
            except OSError:
                break
            try:
                response = sock.recv(65536)
            except TimeoutError:
                pass
        sock.settimeout(5)
        # what remains of the answer
        while b"\r\n\r\n" not in response:
            more = sock.recv(65536)
            if not more:
                break
            response += more
        elapsed = time.monotonic() - started
    assert response.startswith(b"HTTP/1.1 408"), response[:200]
    assert b'"error":"request_timeout"' in response and b"within 1.5 s" in response
    assert 1.4 <= elapsed < 4.0


def test_shedding_answers_json_503_and_spares_probes():
    echo = EchoDetector()
    echo.release = threading.Event()
    settings = settings_for(http_max_requests=2, http_max_loop_lag_ms=0, max_batch=1, retry_after_s=2)
    with live_server(settings, detector=echo) as (base, _app, _srv):
        async def scenario():
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                held = [asyncio.create_task(client.post("/inspect", files=files(image_bytes(noise(8, 8, i)))))
                        for i in range(2)]
                while echo.calls == 0 or len(_srv.server_state.tasks) < 2:
                    await asyncio.sleep(0.01)
                t0 = time.monotonic()
                shed = await client.post("/inspect", files=files(image_bytes(noise(8, 8))))
                shed_s = time.monotonic() - t0
                health = await client.get("/health")
                ready = await client.get("/ready")
                echo.release.set()
                done = await asyncio.gather(*held)
                metrics = (await client.get("/metrics")).text
                return shed, shed_s, health, ready, done, metrics

        shed, shed_s, health, ready, done, metrics = asyncio.run(scenario())
    assert shed.status_code == 503 and shed.json()["error"] == "overloaded"
    assert "limit is 2" in shed.json()["message"] and shed_s < 2.0
    assert shed.headers["retry-after"] == "2" and shed.headers["retry-after-ms"] == "2000"
    assert shed.json()["retry_after_ms"] == 2000
    assert health.status_code == 200 and ready.status_code == 200
    assert [r.status_code for r in done] == [200, 200]
    assert metric_value(metrics, "genclip_http_requests_total", {"endpoint": "/inspect", "status": "503"}) == 1
    assert metric_value(metrics, "genclip_rejections_total", {"reason": "overloaded"}) == 1


def _block_loop(server, seconds: float) -> None:
    """Make the server's event loop busy for ``seconds`` (as a CPU-bound stretch would)."""
    loop = next(iter(server.server_state.connections)).loop if server.server_state.connections else None
    assert loop is not None
    loop.call_soon_threadsafe(time.sleep, seconds)


def test_loop_lag_sheds_and_counts_against_the_deadline():
    img = image_bytes(noise(8, 8))
    # 1) lag shedding on: a request that waited behind a 0.8 s stall is shed with 503
    settings = settings_for(http_max_loop_lag_ms=200, job_timeout_s=5)
    with live_server(settings, detector=EchoDetector()) as (base, _app, srv):
        with httpx.Client(base_url=base, timeout=10) as client:
            assert client.post("/inspect", files=files(img)).status_code == 200  # connection open
            _block_loop(srv, 0.8)
            time.sleep(0.1)
            shed = client.post("/inspect", files=files(img))
            health = client.get("/health")
            time.sleep(0.3)
            after = client.post("/inspect", files=files(img))
    assert shed.status_code == 503 and shed.json()["error"] == "overloaded", shed.text
    assert "ms behind" in shed.json()["message"]
    assert health.status_code == 200 and after.status_code == 200
    # 2) shedding off, deadline 0.5 s: the 0.8 s spent waiting for the loop uses the deadline up
    settings = settings_for(http_max_loop_lag_ms=0, job_timeout_s=0.5)
    with live_server(settings, detector=EchoDetector()) as (base, _app, srv):
        with httpx.Client(base_url=base, timeout=10) as client:
            ok = client.post("/inspect", files=files(img))
            _block_loop(srv, 0.8)
            time.sleep(0.1)
            late = client.post("/inspect", files=files(img))
    assert ok.status_code == 200 and ok.json()["timing_ms"]["total"] < 500
    assert late.status_code == 504 and late.json()["error"] == "deadline_exceeded", late.text
    assert "passed before it was admitted" in late.json()["message"]


def test_kept_alive_connection_serves_after_a_refusal(server):
    """A request refused before its body was read: the answer comes at once, the rest of the
    body is read and discarded, and the connection serves the next request."""
    base, _app = server
    img = image_bytes(noise(8, 8))
    data, ctype = multipart([("image", "a.png", img, "image/png")])
    with connect(base) as sock:
        sock.sendall(post_head("/inspect", "text/plain", len(data)) + data)  # 415 from the guard
        first = read_response(sock)
        sock.sendall(post_head("/inspect", ctype, len(data)) + data)
        second = read_response(sock)
    assert_json_error(first, 415, "unsupported_media_type")
    assert not first.closed and second.status == 200, second.body


def test_protocol_answers_are_counted_in_metrics(server):
    base, _app = server
    raw_exchange(base, post_head("/inspect", "multipart/form-data; boundary=x", 10**12))
    metrics = httpx.get(base + "/metrics").text
    assert metric_value(metrics, "genclip_http_requests_total", {"endpoint": "/inspect", "status": "413"}) >= 1
    assert "genclip_event_loop_lag_seconds " in metrics


def test_full_queue_refuses_uploads_from_their_headers():
    """While the queue is known full, an upload is refused by the protocol itself (no app, no
    multipart parsing: the cheapest 503 there is), its body dropped as it arrives, and the
    connection serves the next request."""
    echo = EchoDetector()
    echo.release = threading.Event()
    settings = settings_for(max_batch=1, queue_max_depth=2, http_max_loop_lag_ms=0, retry_after_s=1)
    data, ctype = multipart([("image", "a.png", image_bytes(noise(8, 8)), "image/png")])
    upload = post_head("/inspect", ctype, len(data)) + data
    with live_server(settings, detector=echo) as (base, _app, _srv):
        async def scenario():
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                held = [asyncio.create_task(client.post("/inspect", files=files(image_bytes(noise(8, 8, i)))))
                        for i in range(2)]
                while (await client.get("/ready")).json().get("queue_depth") != 2:
                    await asyncio.sleep(0.01)
                by_app = await client.post("/inspect", files=files(image_bytes(noise(8, 8, 3))))
                sock = await asyncio.to_thread(connect, base)
                refused = []
                for _ in range(3):  # the app's refusal left a fresh verdict: the protocol uses it
                    await asyncio.to_thread(sock.sendall, upload)
                    refused.append(await asyncio.to_thread(read_response, sock))
                echo.release.set()
                done = await asyncio.gather(*held)
                await asyncio.sleep(0.1)  # the verdict is stale now: the app decides again
                await asyncio.to_thread(sock.sendall, upload)
                served = await asyncio.to_thread(read_response, sock)
                sock.close()
                metrics = (await client.get("/metrics")).text
                return by_app, refused, done, served, metrics

        by_app, refused, done, served, metrics = asyncio.run(scenario())
    assert by_app.status_code == 503 and by_app.json()["error"] == "queue_full"
    for r in refused:
        body = assert_json_error(r, 503, "queue_full")
        assert not r.closed and r.headers.get("connection") != "close"
        assert body["retry_after_ms"] >= 50 and r.headers["retry-after-ms"] == str(body["retry_after_ms"])
    assert [r.status_code for r in done] == [200, 200]
    assert served.status == 200, served.body  # same connection, after three refusals
    assert metric_value(metrics, "genclip_rejections_total", {"reason": "queue_full"}) == 4
    assert metric_value(metrics, "genclip_http_requests_total", {"endpoint": "/inspect", "status": "503"}) == 4
    handled_by_app = metric_value(metrics, "genclip_request_latency_seconds_count", {"endpoint": "/inspect"})
    assert handled_by_app <= 2 + 1 + 2 + 1, "at least one refusal never reached the app"


def test_full_upload_slots_refuse_uploads_from_their_headers():
    """While every upload slot is held, the protocol refuses an upload from its headers
    (``overloaded``, kept-alive, the app never runs); once the slots free, the same connection is
    served, and no slot or ticket is left counted."""
    echo = EchoDetector()
    echo.release = threading.Event()
    settings = settings_for(max_batch=1, queue_max_depth=50, max_inflight_requests=2, http_max_loop_lag_ms=0,
                            retry_after_s=1)
    data, ctype = multipart([("image", "a.png", image_bytes(noise(8, 8)), "image/png")])
    upload = post_head("/inspect", ctype, len(data)) + data
    with live_server(settings, detector=echo) as (base, app, _srv):
        slots = app.state.upload_slots

        async def scenario():
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                held = [asyncio.create_task(client.post("/inspect", files=files(image_bytes(noise(8, 8, i)))))
                        for i in range(2)]
                while slots.held < 2:
                    await asyncio.sleep(0.01)
                sock = await asyncio.to_thread(connect, base)
                refused = []
                for _ in range(3):
                    await asyncio.to_thread(sock.sendall, upload)
                    refused.append(await asyncio.to_thread(read_response, sock))
                echo.release.set()
                done = await asyncio.gather(*held)
                await asyncio.to_thread(sock.sendall, upload)
                served = await asyncio.to_thread(read_response, sock)
                sock.close()
                return refused, done, served, (await client.get("/metrics")).text

        refused, done, served, metrics = asyncio.run(scenario())
        counted = (slots.held, slots.arrived)
    for r in refused:
        body = assert_json_error(r, 503, "overloaded")
        assert "limit is 2" in body["message"] and r.headers["retry-after-ms"] == "1000"
        assert not r.closed and r.headers.get("connection") != "close"
    assert metric_value(metrics, "genclip_rejections_total", {"reason": "overloaded"}) == 3
    # the app saw the two held uploads and the last one, never the three refusals
    assert metric_value(metrics, "genclip_request_latency_seconds_count", {"endpoint": "/inspect"}) == 3
    assert [r.status_code for r in done] == [200, 200]
    assert served.status == 200, served.body
    assert counted == (0, 0), counted


def test_uploads_let_through_count_against_the_slots_once_their_body_is_in():
    """The early gate's tickets: an upload let through counts from the moment its body has
    arrived (a burst that arrives before the app runs cannot overfill the slots) until the guard
    takes its slot or the request ends; an upload still arriving counts nothing."""
    from service.app import create_app
    from service.upload_guard import Refusal, UploadTicket

    app = create_app(settings_for(max_inflight_requests=2), detector=EchoDetector())
    gate, slots = app.state.early_admission, app.state.upload_slots
    assert gate("GET", "/inspections") is None  # not an upload route: no opinion
    first, second, slow = (gate("POST", "/inspect") for _ in range(3))
    assert all(isinstance(t, UploadTicket) for t in (first, second, slow))
    first.arrived()
    second.arrived()
    second.arrived()  # idempotent
    refused = gate("POST", "/inspect")
    assert isinstance(refused, Refusal) and refused.code == "overloaded" and "2 arrived" in refused.message
    assert slots.arrived == 2
    first.done()  # its request was refused or answered before taking a slot
    first.done()
    assert slots.arrived == 1 and isinstance(gate("POST", "/inspect"), UploadTicket)
    slow.done()  # never arrived: never counted
    assert slots.arrived == 1
    second.done()
    assert (slots.held, slots.arrived) == (0, 0)


def test_pipelined_uploads_cut_off_by_a_closed_connection_leave_no_slot_counted():
    """Uploads pipelined on one connection count against the slots as their bodies arrive; when
    the client goes away before the queued ones ever run, none of them stays counted (a leaked
    count would refuse uploads forever)."""
    echo = EchoDetector()
    echo.release = threading.Event()
    settings = settings_for(max_batch=1, queue_max_depth=50, max_inflight_requests=8, http_max_loop_lag_ms=0)
    data, ctype = multipart([("image", "a.png", image_bytes(noise(8, 8)), "image/png")])
    upload = post_head("/inspect", ctype, len(data)) + data
    with live_server(settings, detector=echo) as (base, app, _srv):
        slots = app.state.upload_slots
        sock = connect(base)
        sock.sendall(upload * 4)  # the first runs (held by the detector), three wait in the pipeline
        deadline = time.monotonic() + 10
        while (slots.held, slots.arrived) != (1, 3) and time.monotonic() < deadline:
            time.sleep(0.01)
        counted_while_open = (slots.held, slots.arrived)
        sock.close()
        echo.release.set()
        deadline = time.monotonic() + 10
        while (slots.held, slots.arrived) != (0, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        counted_after = (slots.held, slots.arrived)
        after = httpx.post(base + "/inspect", files=files(image_bytes(noise(8, 8, 9))), timeout=30)
    assert counted_while_open == (1, 3), counted_while_open
    assert counted_after == (0, 0), counted_after
    assert after.status_code == 200, after.text
