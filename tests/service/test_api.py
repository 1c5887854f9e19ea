"""The real ASGI app over both transports (in-process queue, Redis Streams on a real redis-server)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time

import httpx
import numpy as np
import pytest
import redis.asyncio as aioredis
from PIL import Image
from svc_fakes import POISON_PIXEL, EchoDetector, expected_score
from svc_helpers import (
    app_client,
    assert_error,
    decode_png_b64,
    files,
    image_bytes,
    metric_value,
    noise,
    png_header_only,
    settings_for,
    solid,
)

from service.heatmap import JET_LUT, heatmap_png
from service.queue.redis_streams import RedisKeys, RedisWorkSource
from service.worker import map_to_uint8

TRANSPORTS = ["inprocess", "redis"]


@pytest.fixture
def make_settings(request, prefix):
    """Settings for a transport; Redis ones get the test server and a private key prefix."""

    def make(transport: str, **overrides):
        if transport == "redis":
            url = request.getfixturevalue("redis_url")
            overrides = {"redis_url": url, "redis_prefix": prefix, "workers_inline": True, **overrides}
        return settings_for(**overrides)

    return make


# ====================================================================== happy paths
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_happy_path_tiny_backbone(transport, make_settings, tiny_detector):
    img = noise(97, 61, seed=3)
    direct = (await asyncio.to_thread(tiny_detector.inspect, [img], ["bottle"]))[0]
    async with app_client(make_settings(transport), detector=tiny_detector) as (_app, client):
        ready = await client.get("/ready")
        assert ready.status_code == 200
        assert ready.json()["detector"]["name"] == "baseline" and ready.json()["transport"] == transport
        assert ready.json()["detector"]["checkpoint"] is None and ready.json()["detector"]["device"] == "cpu"
        r = await client.post("/inspect", files=files(image_bytes(img)), data={"class_name": "bottle"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert 0.0 <= body["score"] <= 1.0
    assert body["score"] == pytest.approx(direct.score, abs=1e-5)
    assert body["threshold"] == 0.5 and body["is_anomalous"] == (body["score"] >= 0.5)
    assert body["class_name"] == "bottle" and body["class_label"] == direct.class_label
    assert (body["detector"], body["backbone"], body["checkpoint"]) == ("baseline", "tiny-clip-random", None)
    assert "component_scores" not in body  # only ensembles report them
    assert set(body["timing_ms"]) == {"queue", "model", "total"}
    assert body["timing_ms"]["total"] >= body["timing_ms"]["model"] > 0
    png = decode_png_b64(body["heatmap_png"])
    assert png.size == (97, 61)
    # the heatmap is the detector's own map through the jet colour map
    want = Image.open(io.BytesIO(heatmap_png(map_to_uint8(direct.anomaly_map, img.size))))
    diff = np.abs(np.asarray(png.convert("RGB"), np.int16) - np.asarray(want.convert("RGB"), np.int16))
    assert diff.mean() < 2.0


@pytest.mark.parametrize("fmt,ctype", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("BMP", "image/bmp"),
                                       ("TIFF", "image/tiff"), ("PNG", "application/octet-stream")])
async def test_formats_and_heatmap_modes(fmt, ctype, make_settings):
    img = noise(45, 30, seed=1)
    data = image_bytes(img, fmt)
    want = expected_score(Image.open(io.BytesIO(data)))
    async with app_client(make_settings("inprocess"), detector=EchoDetector()) as (_app, client):
        out = {}
        for mode in ("png", "overlay", "none"):
            r = await client.post(f"/inspect?heatmap={mode}", files=files(data, f"x.{fmt.lower()}", ctype))
            assert r.status_code == 200, r.text
            assert r.json()["score"] == pytest.approx(want, abs=1e-6)
            out[mode] = r.json()["heatmap_png"]
    assert out["none"] is None
    plain, overlay = decode_png_b64(out["png"]).convert("RGB"), decode_png_b64(out["overlay"])
    assert plain.size == overlay.size == (45, 30)
    assert not np.array_equal(np.asarray(plain), np.asarray(overlay))


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_accept_image_png(transport, make_settings):
    img = noise(33, 21, seed=5)
    async with app_client(make_settings(transport), detector=EchoDetector()) as (_app, client):
        r = await client.post("/inspect", files=files(image_bytes(img)), data={"class_name": "metal nut"},
                              headers={"Accept": "image/png"})
        j = await client.post("/inspect", files=files(image_bytes(img)))
        none = await client.post("/inspect?heatmap=none", files=files(image_bytes(img)),
                                 headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    png = Image.open(io.BytesIO(r.content))
    assert png.format == "PNG" and png.size == (33, 21)
    h = r.headers
    assert float(h["x-anomaly-score"]) == pytest.approx(j.json()["score"])
    assert h["x-anomaly-is-anomalous"] in ("true", "false")
    assert float(h["x-anomaly-threshold"]) == 0.5
    assert h["x-anomaly-class-name"] == "metal nut" and h["x-anomaly-class-label"] == "metal nut"
    assert h["x-anomaly-detector"] == "echo" and h["x-anomaly-backbone"] == "fake-backbone"
    assert len(h["x-anomaly-id"]) == 32 and float(h["x-anomaly-timing-total-ms"]) > 0
    assert "echo=" in h["x-anomaly-component-scores"]
    assert j.json()["component_scores"]["echo"] == pytest.approx(j.json()["score"])
    assert_error(none, 406, "not_acceptable")


# ====================================================================== request errors
async def test_request_errors_are_json_and_never_reach_the_detector(make_settings):
    echo = EchoDetector()
    settings = make_settings("inprocess", max_upload_bytes=100_000)
    jpeg = image_bytes(noise(120, 120), "JPEG", quality=95)
    good = image_bytes(noise(20, 20))
    big = image_bytes(noise(400, 400))  # ~480 KB PNG, over the 100 KB limit

    async def chunked_body():
        boundary = b"b0undary"
        yield b"--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        yield b"Content-Type: image/png\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 10_000
        yield b"\r\n--" + boundary + b"--\r\n"

    async with app_client(settings, detector=echo) as (_app, client):
        post = client.post
        assert_error(await post("/inspect", files=files(b"\x00garbage bytes, not an image")), 415)
        assert_error(await post("/inspect", files=files(jpeg[: len(jpeg) // 2], "t.jpg", "image/jpeg")), 415)
        body = assert_error(await post("/inspect", files=files(png_header_only(30000, 30000))), 413)
        assert "pixels" in body["message"]
        assert_error(await post("/inspect", files=files(png_header_only(8000, 8000))), 413, "image_too_large")
        assert_error(await post("/inspect", json={"image": "aGVsbG8="}), 415, "unsupported_media_type")
        assert_error(await post("/inspect", content=good, headers={"Content-Type": "image/png"}), 415)
        assert_error(await post("/inspect", files=files(good, "a.txt", "text/plain")), 415)
        assert_error(await post("/inspect", files=files(image_bytes(noise(8, 8), "GIF"), "a.gif", "image/gif")), 415)
        assert_error(await post("/inspect", files=files(image_bytes(noise(8, 8), "GIF"), "a.gif", "")), 415)
        body = assert_error(await post("/inspect", files=files(big)), 413, "payload_too_large")
        assert "limit" in body["message"]
        assert_error(await post("/inspect", content=chunked_body(),
                                headers={"Content-Type": "multipart/form-data; boundary=b0undary"}),
                     413, "payload_too_large")
        body = assert_error(await post("/inspect", data={"class_name": "x"},
                                       files={"other": ("a.png", good, "image/png")}), 422, "validation_error")
        assert "image" in body["message"]
        assert_error(await post("/inspect", files=files(good), data={"class_name": "x" * 500}), 422)
        assert_error(await post("/inspect", files=files(good), data={"class_name": "a\x07b"}), 422)
        assert_error(await post("/inspect?heatmap=jpeg", files=files(good)), 422)
        assert_error(await post("/inspect", data={"image": "not a file"}, files={"x": ("a", b"1")}), 422)
        assert echo.calls == 0
        ok = await post("/inspect", files=files(good))
        assert ok.status_code == 200 and echo.calls == 1
        metrics = (await client.get("/metrics")).text
    assert metric_value(metrics, "genclip_http_requests_total", {"endpoint": "/inspect", "status": "415"}) == 7
    assert metric_value(metrics, "genclip_http_requests_total", {"endpoint": "/inspect", "status": "413"}) == 4
    assert metric_value(metrics, "genclip_http_requests_total", {"endpoint": "/inspect", "status": "200"}) == 1


async def test_api_keys(make_settings):
    good = image_bytes(noise(16, 16))
    async with app_client(make_settings("inprocess", api_keys=["s3cret", "other"]), detector=EchoDetector()) as (
        _app, client,
    ):
        r = await client.post("/inspect", files=files(good))
        assert_error(r, 401, "unauthorized")
        assert "Bearer" in r.headers["www-authenticate"]
        assert_error(await client.post("/inspect", files=files(good), headers={"X-API-Key": "wrong"}), 401)
        assert_error(await client.post("/inspect", files=files(good), headers={"Authorization": "Bearer nope"}), 401)
        assert (await client.post("/inspect", files=files(good), headers={"X-API-Key": "s3cret"})).status_code == 200
        assert (await client.post("/inspect", files=files(good),
                                  headers={"Authorization": "Bearer other"})).status_code == 200
        assert (await client.get("/health")).status_code == 200
        spec = (await client.get("/openapi.json")).json()
    assert {"APIKeyHeader", "HTTPBearer"} <= set(spec["components"]["securitySchemes"])


async def test_bad_requests_do_not_disturb_requests_in_flight(make_settings):
    echo = EchoDetector(delay_s=0.05)
    images = [solid(10 + i, 10, 20 * i) for i in range(8)]
    jpeg = image_bytes(noise(64, 64), "JPEG")
    async with app_client(make_settings("inprocess", max_upload_bytes=50_000), detector=echo) as (_app, client):
        goods = [client.post("/inspect", files=files(image_bytes(im))) for im in images]
        bads = [
            client.post("/inspect", files=files(b"garbage")),
            client.post("/inspect", files=files(jpeg[:300], "a.jpg", "image/jpeg")),
            client.post("/inspect", files=files(b"\0" * 200_000)),
            client.post("/inspect", files=files(png_header_only(30000, 30000))),
        ]
        responses = await asyncio.gather(*goods, *bads)
    for im, r in zip(images, responses[:8], strict=True):
        assert r.status_code == 200 and r.json()["score"] == pytest.approx(expected_score(im), abs=1e-6)
    assert [r.status_code for r in responses[8:]] == [415, 415, 413, 413]


# ====================================================================== backpressure, deadlines, failures
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_queue_full_answers_503_with_retry_after(transport, make_settings):
    echo = EchoDetector()
    echo.release = threading.Event()
    settings = make_settings(transport, max_batch=1, queue_max_depth=2, retry_after_s=3)
    async with app_client(settings, detector=echo) as (_app, client):
        tasks = [asyncio.create_task(client.post("/inspect", files=files(image_bytes(solid(8, 8, i * 30)))))
                 for i in range(6)]
        done_early = []
        for _ in range(500):
            done_early = [t for t in tasks if t.done()]
            if len(done_early) >= 4:
                break
            await asyncio.sleep(0.02)
        early = [t.result() for t in done_early]
        echo.release.set()
        responses = await asyncio.gather(*tasks)
        metrics = (await client.get("/metrics")).text
    assert len(early) == 4 and all(r.status_code == 503 for r in early)  # refused at once, not queued
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 503, 503, 503, 503]
    for r in responses:
        if r.status_code == 503:
            assert_error(r, 503, "queue_full")
            assert r.headers["retry-after"] == "3"
    assert metric_value(metrics, "genclip_rejections_total", {"reason": "queue_full"}) == 4


async def test_inflight_cap_sheds_load_before_reading_bodies(make_settings):
    echo = EchoDetector()
    echo.release = threading.Event()
    settings = make_settings("inprocess", max_batch=1, queue_max_depth=50, max_inflight_requests=3)
    async with app_client(settings, detector=echo) as (_app, client):
        tasks = [asyncio.create_task(client.post("/inspect", files=files(image_bytes(solid(8, 8, i)))))
                 for i in range(5)]
        for _ in range(500):
            if sum(t.done() for t in tasks) >= 2:
                break
            await asyncio.sleep(0.02)
        echo.release.set()
        responses = await asyncio.gather(*tasks)
        metrics = (await client.get("/metrics")).text
    assert sorted(r.status_code for r in responses) == [200, 200, 200, 503, 503]
    for r in responses:
        if r.status_code == 503:
            assert_error(r, 503, "overloaded")
            assert r.headers["retry-after"]
    assert metric_value(metrics, "genclip_rejections_total", {"reason": "overloaded"}) == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_no_worker_answers_503(transport, make_settings):
    settings = make_settings(transport, workers_inline=False) if transport == "redis" else make_settings(transport)
    async with app_client(settings, start_worker=False) as (_app, client):
        r = await client.post("/inspect", files=files(image_bytes(noise(8, 8))))
        ready = await client.get("/ready")
        health = await client.get("/health")
    assert_error(r, 503, "no_worker")
    assert int(r.headers["retry-after"]) >= 0
    assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
    assert "worker" in ready.json()["reason"]
    assert health.status_code == 200


async def test_ready_when_redis_unreachable(make_settings):
    settings = settings_for(redis_url="redis://127.0.0.1:1/0", redis_prefix="x")
    async with app_client(settings, start_worker=False) as (_app, client):
        ready = await client.get("/ready")
        r = await client.post("/inspect", files=files(image_bytes(noise(8, 8))))
    assert ready.status_code == 503 and "unreachable" in ready.json()["reason"]
    assert_error(r, 503, "queue_unavailable")


async def wait_depth(client: httpx.AsyncClient, depth: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await client.get("/ready")).json().get("queue_depth") == depth:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"queue depth never reached {depth}")


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_deadline_answers_504_and_worker_skips_expired_jobs(transport, make_settings):
    echo = EchoDetector()
    echo.release = threading.Event()  # the detector is stuck until released
    # 1.5 s: long enough that a loaded CI machine still hands the first job to the detector
    # before its deadline, short enough to keep the test quick.
    settings = make_settings(transport, job_timeout_s=1.5, max_batch=1)
    async with app_client(settings, detector=echo) as (_app, client):
        first, second = await asyncio.gather(
            client.post("/inspect", files=files(image_bytes(solid(8, 8, 10)))),
            client.post("/inspect", files=files(image_bytes(solid(8, 8, 20)))),
        )
        answered_while_stuck = not echo.release.is_set()
        calls_while_stuck = echo.calls
        echo.release.set()
        await wait_depth(client, 0)  # first job finished, the expired one dropped
        await asyncio.sleep(0.1)
        metrics = (await client.get("/metrics")).text
    for r in (first, second):
        body = assert_error(r, 504, "deadline_exceeded")
        assert len(body["id"]) == 32
    assert answered_while_stuck, "504 is answered at the deadline, not when the detector finishes"
    assert calls_while_stuck == 1, "the first job reached the detector before its deadline"
    assert echo.calls == 1, "the expired job was never sent to the detector"
    assert metric_value(metrics, "genclip_batch_size_count") == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_poisonous_image_fails_alone(transport, make_settings):
    echo = EchoDetector()
    echo.release = threading.Event()
    goods = [solid(12, 9 + i, 40 + 25 * i) for i in range(5)]
    poison = solid(12, 12, POISON_PIXEL)
    settings = make_settings(transport, max_batch=8, max_wait_ms=1)
    async with app_client(settings, detector=echo) as (_app, client):
        blocker = asyncio.create_task(client.post("/inspect", files=files(image_bytes(solid(5, 5, 1)))))
        await asyncio.to_thread(echo.started.wait, 10)  # worker stuck on the first job
        requests = [asyncio.create_task(client.post("/inspect", files=files(image_bytes(im))))
                    for im in goods[:3] + [poison] + goods[3:]]
        await wait_depth(client, 7)  # all six queued behind the stuck one
        echo.release.set()
        responses = await asyncio.gather(*requests)
        assert (await blocker).status_code == 200
    bad = responses[3]
    body = assert_error(bad, 500, "inference_failed")
    assert "poisonous" in body["message"]
    for im, r in zip(goods, responses[:3] + responses[4:], strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["score"] == pytest.approx(expected_score(im), abs=1e-6)
    assert echo.batch_sizes == [1, 6, 1, 1, 1, 1, 1, 1]  # the batch failed, then one by one


# ====================================================================== concurrency, batching, metrics
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_concurrent_requests_get_their_own_results(transport, make_settings):
    echo = EchoDetector(delay_s=0.02)
    images = [solid(20 + i, 10 + (i % 7), 6 * i) for i in range(40)]
    settings = make_settings(transport, max_batch=8, max_wait_ms=20, queue_max_depth=64)
    async with app_client(settings, detector=echo) as (_app, client):
        responses = await asyncio.gather(
            *(client.post("/inspect", files=files(image_bytes(im)), data={"class_name": f"part-{i}"})
              for i, im in enumerate(images))
        )
        metrics = (await client.get("/metrics")).text
    for i, (im, r) in enumerate(zip(images, responses, strict=True)):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["score"] == pytest.approx(expected_score(im), abs=1e-6)
        assert body["class_name"] == body["class_label"] == f"part-{i}"
        png = decode_png_b64(body["heatmap_png"])
        assert png.size == im.size
        assert tuple(np.asarray(png.convert("RGB"))[0, 0]) == tuple(JET_LUT[6 * i])
    assert len({r.json()["id"] for r in responses}) == 40
    assert sum(echo.batch_sizes) == 40 and max(echo.batch_sizes) > 1
    assert metric_value(metrics, "genclip_batch_size_count") == len(echo.batch_sizes)
    assert metric_value(metrics, "genclip_batch_size_sum") == 40
    batches_of_one = metric_value(metrics, "genclip_batch_size_bucket", {"le": "1.0"})
    assert batches_of_one < metric_value(metrics, "genclip_batch_size_count"), "some batches > 1"
    assert metric_value(metrics, "genclip_model_latency_seconds_count") == len(echo.batch_sizes)
    assert metric_value(metrics, "genclip_request_latency_seconds_count", {"endpoint": "/inspect"}) == 40
    assert metric_value(metrics, "genclip_http_requests_total", {"endpoint": "/inspect", "status": "200"}) == 40
    assert "genclip_queue_depth 0.0" in metrics


async def test_concurrent_tiny_backbone_matches_direct_inference(make_settings, tiny_detector):
    images = [noise(64, 48, seed=100 + i) for i in range(12)]
    names = [None if i % 3 == 0 else f"item{i % 4}" for i in range(12)]
    direct = await asyncio.to_thread(  # one worker thread, as the service runs it
        lambda: [tiny_detector.inspect([im], [n])[0] for im, n in zip(images, names, strict=True)])
    settings = make_settings("inprocess", max_batch=8, max_wait_ms=30)
    async with app_client(settings, detector=tiny_detector) as (_app, client):
        responses = await asyncio.gather(*(
            client.post("/inspect?heatmap=none", files=files(image_bytes(im)),
                        data={} if n is None else {"class_name": n})
            for im, n in zip(images, names, strict=True)
        ))
        metrics = (await client.get("/metrics")).text
    for want, r in zip(direct, responses, strict=True):
        assert r.status_code == 200
        assert r.json()["score"] == pytest.approx(want.score, abs=1e-4)
        assert r.json()["class_label"] == want.class_label
    assert metric_value(metrics, "genclip_batch_size_bucket", {"le": "1.0"}) < metric_value(
        metrics, "genclip_batch_size_count")


async def test_per_class_thresholds(make_settings, tmp_path):
    path = tmp_path / "thresholds.json"
    path.write_text('{"default": 0.9, "classes": {"bottle": 0.0, "screw": 1.0}}')
    img = image_bytes(solid(8, 8, 128))  # echo score ~0.5
    async with app_client(make_settings("inprocess", thresholds_file=path), detector=EchoDetector()) as (_a, client):
        out = {}
        for name in ("bottle", "screw", "cable"):
            out[name] = (await client.post("/inspect", files=files(img), data={"class_name": name})).json()
    assert (out["bottle"]["threshold"], out["bottle"]["is_anomalous"]) == (0.0, True)
    assert (out["screw"]["threshold"], out["screw"]["is_anomalous"]) == (1.0, False)
    assert (out["cable"]["threshold"], out["cable"]["is_anomalous"]) == (0.9, False)


async def test_openapi_documents_the_contract(make_settings):
    async with app_client(make_settings("inprocess"), detector=EchoDetector()) as (_app, client):
        spec = (await client.get("/openapi.json")).json()
        docs = (await client.get("/docs")).text
        js = await client.get("/static-offline-docs/swagger-ui-bundle.js")
    op = spec["paths"]["/inspect"]["post"]
    assert {"200", "401", "413", "415", "422", "503", "504"} <= set(op["responses"])
    assert "image/png" in op["responses"]["200"]["content"]
    form = spec["components"]["schemas"][op["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
                                         .rsplit("/", 1)[1]]
    assert {"image", "class_name"} <= set(form["properties"]) and form["required"] == ["image"]
    assert "/static-offline-docs/swagger-ui-bundle.js" in docs and "cdn" not in docs.lower()
    assert js.status_code == 200 and len(js.content) > 100_000


# ====================================================================== Redis specifics
async def test_redis_large_images_travel_as_file_bytes(make_settings, redis_url, prefix):
    """Over raw_transfer_max_bytes the worker gets the validated file and decodes it itself."""
    img = noise(90, 70, seed=11)
    data = image_bytes(img, "JPEG", quality=85)
    seen: list[str] = []
    check = aioredis.Redis.from_url(redis_url)

    async def spy() -> None:  # read the job entry off the stream as the API wrote it
        while not seen:
            for _eid, fields in await check.xrange(RedisKeys(prefix).stream):
                seen.append(json.loads(fields[b"meta"])["enc"])
            await asyncio.sleep(0.005)

    echo = EchoDetector()
    echo.release = threading.Event()
    async with app_client(make_settings("redis", raw_transfer_max_bytes=1000), detector=echo) as (_a, client):
        request = asyncio.create_task(client.post("/inspect", files=files(data, "a.jpg", "image/jpeg")))
        await asyncio.wait_for(spy(), 10)
        echo.release.set()
        r = await request
    await check.aclose()
    assert seen == ["file"]
    assert r.status_code == 200
    assert r.json()["score"] == pytest.approx(expected_score(Image.open(io.BytesIO(data))), abs=1e-6)
    assert decode_png_b64(r.json()["heatmap_png"]).size == (90, 70)


async def test_redis_dead_letter_after_max_deliveries(make_settings, redis_url, prefix):
    """A job whose workers keep dying is answered with an error after max_deliveries."""
    settings = make_settings("redis", workers_inline=False, reclaim_idle_ms=150, max_deliveries=2)
    keys = RedisKeys(prefix)
    sources = [RedisWorkSource(settings, consumer=f"w{i}") for i in range(3)]
    async with app_client(settings, start_worker=False) as (_app, client):
        await sources[0].register("w0", {"name": "fake"})  # a live heartbeat: admission passes
        request = asyncio.create_task(client.post("/inspect", files=files(image_bytes(noise(8, 8)))))
        got = []
        for _ in range(100):
            got = await sources[0].receive(4, 0.1)
            if got:
                break
        assert len(got) == 1 and got[0].attempt == 1  # worker 0 takes it... and dies
        await asyncio.sleep(0.2)
        sources[1]._next_reclaim = 0
        again = await sources[1].receive(4, 0.05)
        assert [j.id for j in again] == [got[0].id] and again[0].attempt == 2  # reclaimed, dies too
        await asyncio.sleep(0.2)
        sources[2]._next_reclaim = 0
        assert await sources[2].receive(4, 0.05) == []  # third delivery would exceed 2: dead letter
        r = await request
        client_redis = aioredis.Redis.from_url(redis_url)
        dead = await client_redis.xrange(keys.dead)
        stream_len = await client_redis.xlen(keys.stream)
        await client_redis.aclose()
    for s in sources:
        await s.close()
    body = assert_error(r, 500, "dead_lettered")
    assert body["id"] == got[0].id
    assert len(dead) == 1 and dead[0][1][b"job_id"].decode() == got[0].id
    assert stream_len == 0


async def test_redis_results_go_to_each_jobs_own_key(make_settings, redis_url, prefix):
    """Two API instances sharing the queue and one worker: each gets only its own results."""
    echo = EchoDetector(delay_s=0.02)
    s_worker = make_settings("redis", max_batch=8, max_wait_ms=20)
    s_api = make_settings("redis", workers_inline=False)
    images = [solid(9, 9, 10 * i) for i in range(20)]
    async with app_client(s_worker, detector=echo) as (_a, c1), app_client(s_api, start_worker=False) as (_b, c2):
        responses = await asyncio.gather(*(
            (c1 if i % 2 else c2).post("/inspect", files=files(image_bytes(im))) for i, im in enumerate(images)
        ))
    for im, r in zip(images, responses, strict=True):
        assert r.status_code == 200 and r.json()["score"] == pytest.approx(expected_score(im), abs=1e-6)
    assert max(echo.batch_sizes) > 1
    check = aioredis.Redis.from_url(redis_url)
    leftovers = [k async for k in check.scan_iter(f"{prefix}:reply:*")]
    await check.aclose()
    assert leftovers == []  # every reply key was consumed


async def test_redis_slow_batch_is_not_stolen_by_idle_workers(make_settings, prefix):
    """A worker refreshes the entries of its long batch: a live peer must not reclaim them."""
    from service.worker import BatchWorker

    settings = make_settings("redis", workers_inline=False, reclaim_idle_ms=600, job_timeout_s=30)
    slow, fast = EchoDetector(delay_s=2.0), EchoDetector()
    workers = []
    try:
        async with app_client(settings, start_worker=False) as (_app, client):
            for wid, det in (("slow", slow),):
                w = BatchWorker(RedisWorkSource(settings, wid), det, max_batch=8, max_wait_s=0.1,
                                worker_id=wid, heartbeat_interval_s=0.1)
                workers.append((w, asyncio.create_task(w.run())))
            await asyncio.sleep(0.2)
            images = [solid(8, 8, 30 * i) for i in range(3)]
            requests = [asyncio.create_task(client.post("/inspect", files=files(image_bytes(im)))) for im in images]
            await asyncio.to_thread(slow.started.wait, 10)
            w = BatchWorker(RedisWorkSource(settings, "fast"), fast, max_batch=8, max_wait_s=0.01,
                            worker_id="fast", heartbeat_interval_s=0.1)
            workers.append((w, asyncio.create_task(w.run())))
            responses = await asyncio.gather(*requests)
    finally:
        for w, task in workers:
            w.stop()
            await asyncio.wait_for(task, 10)
            await w.source.close()
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert {r.headers["x-worker-id"] for r in responses} == {"slow"}
    assert fast.calls == 0


def test_png_b64_helper_roundtrip():
    data = heatmap_png(np.zeros((3, 4), np.uint8))
    assert decode_png_b64(base64.b64encode(data).decode()).size == (4, 3)
