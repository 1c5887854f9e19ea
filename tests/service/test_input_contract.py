"""Inputs that used to pass silently: EXIF orientation, repeated fields, multi-frame files,
decoded-size bombs, malformed worker results (real ASGI app, real Pillow, real Redis)."""

from __future__ import annotations

import asyncio
import io
import json
import struct
import threading
import zlib

import numpy as np
import pytest
import redis.asyncio as aioredis
from PIL import Image, ImageOps
from svc_fakes import EchoDetector, expected_score
from svc_helpers import app_client, assert_error, decode_png_b64, files, image_bytes, noise, png_header_only, settings_for

from service.heatmap import JET_LUT
from service.image_input import ImageRejected, decode_image
from service.queue.jobs import RESULT_MAGIC, PayloadError, decode_result, encode_result
from service.queue.base import JobResult
from service.queue.redis_streams import RedisKeys, RedisWorkSource


def oriented(img: Image.Image, orientation: int, fmt: str = "PNG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format=fmt, exif=exif.tobytes())
    return buf.getvalue()


def gradient(width: int, height: int) -> Image.Image:
    """Grey ramp left to right plus a bright top row: every orientation looks different."""
    arr = np.tile(np.linspace(0, 200, width, dtype=np.uint8), (height, 1))
    arr[0, :] = 255
    return Image.fromarray(arr, mode="L").convert("RGB")


# ====================================================================== EXIF orientation
@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_decode_applies_exif_orientation(orientation):
    raw = gradient(40, 20)
    data = oriented(raw, orientation)
    want = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    decoded = decode_image(data, max_bytes=10**6, max_pixels=10**6)
    assert decoded.orientation == orientation
    assert decoded.image.size == want.size == ((20, 40) if orientation in (6, 8) else (40, 20))
    assert np.array_equal(np.asarray(decoded.image), np.asarray(want.convert("RGB")))


@pytest.mark.parametrize("transport", ["inprocess", "redis"])
async def test_heatmap_comes_back_in_displayed_orientation(transport, request, prefix):
    raw = gradient(40, 20)
    data = oriented(raw, 6)  # stored landscape, displayed portrait (phone held upright)
    displayed = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("L")
    extra = {}
    if transport == "redis":  # raw_transfer_max_bytes=0: the worker decodes the file itself
        extra = {"redis_url": request.getfixturevalue("redis_url"), "redis_prefix": prefix,
                 "workers_inline": True, "raw_transfer_max_bytes": 0}
    async with app_client(settings_for(**extra), detector=EchoDetector()) as (_app, client):
        r = await client.post("/inspect", files=files(data))
    assert r.status_code == 200, r.text
    assert r.json()["score"] == pytest.approx(expected_score(displayed), abs=1e-6)
    heat = np.asarray(decode_png_b64(r.json()["heatmap_png"]).convert("RGB"))
    assert heat.shape[:2] == (40, 20)  # (H, W) of the displayed image
    assert np.array_equal(heat, JET_LUT[np.asarray(displayed)])  # pixel for pixel: not rotated back


# ====================================================================== form fields, frames
async def test_two_image_fields_are_refused():
    echo = EchoDetector()
    a, b = image_bytes(noise(8, 8, 1)), image_bytes(noise(9, 9, 2))
    async with app_client(settings_for(), detector=echo) as (_app, client):
        two = await client.post("/inspect", files=[("image", ("a.png", a, "image/png")),
                                                   ("image", ("b.png", b, "image/png"))])
        names = await client.post("/inspect", files=files(a), data={"class_name": ["x", "y"]})
        one = await client.post("/inspect", files=files(a))
    body = assert_error(two, 422, "validation_error")
    assert "image" in body["message"] and "more than once" in body["message"]
    assert "class_name" in assert_error(names, 422, "validation_error")["message"]
    assert one.status_code == 200 and echo.calls == 1


def _multi_frame(fmt: str) -> bytes:
    a, b = noise(12, 10, 1), noise(12, 10, 2)
    buf = io.BytesIO()
    a.save(buf, format=fmt, save_all=True, append_images=[b])
    return buf.getvalue()


async def test_multi_frame_files_are_refused_and_mpo_uses_its_primary_image():
    echo = EchoDetector()
    mpo = _multi_frame("MPO")
    primary = Image.open(io.BytesIO(mpo))
    primary.seek(0)
    async with app_client(settings_for(), detector=echo) as (_app, client):
        tiff = await client.post("/inspect", files=files(_multi_frame("TIFF"), "a.tif", "image/tiff"))
        apng = await client.post("/inspect", files=files(_multi_frame("PNG")))
        jpeg = await client.post("/inspect", files=files(mpo, "a.jpg", "image/jpeg"))
    for r in (tiff, apng):
        assert "several frames" in assert_error(r, 422, "multi_frame")["message"]
    assert jpeg.status_code == 200, jpeg.text
    assert jpeg.json()["score"] == pytest.approx(expected_score(primary.convert("RGB")), abs=1e-6)
    assert echo.calls == 1


# ====================================================================== decoded-size budget
def test_decoded_size_is_checked_from_the_header_before_decoding():
    bomb = png_header_only(7000, 7000)  # ~150 bytes, 147 MB decoded, under the pixel limit
    assert len(bomb) < 400
    with pytest.raises(ImageRejected) as info:
        decode_image(bomb, max_bytes=10**6, max_pixels=50_000_000, max_decoded_bytes=64 * 2**20)
    assert info.value.status == 413 and "decodes to 147000000 bytes" in info.value.message
    reserved = []
    grey16 = image_bytes(Image.fromarray(np.zeros((10, 20), np.uint16)))  # mode I;16
    decode_image(grey16, max_bytes=10**6, max_pixels=10**6, reserve=reserved.append)
    assert reserved == [10 * 20 * 1 * 2]  # width x height x bands x bytes per sample


async def test_decoded_bytes_budget_is_shared_by_requests_in_flight():
    echo = EchoDetector()
    echo.release = threading.Event()
    img = image_bytes(noise(40, 40))  # 4800 decoded bytes
    settings = settings_for(decoded_bytes_budget=6000, max_batch=1, retry_after_s=2)
    async with app_client(settings, detector=echo) as (app, client):
        budget = app.state.service.decoded_budget
        first = asyncio.create_task(client.post("/inspect", files=files(img)))
        await asyncio.to_thread(echo.started.wait, 10)
        assert budget.used == 4800  # held while the job runs
        second = await client.post("/inspect", files=files(img))
        small = asyncio.create_task(client.post("/inspect?heatmap=none", files=files(image_bytes(noise(10, 10)))))
        while budget.used < 4800 + 300:  # 300 bytes still fit next to the first: admitted, queued
            await asyncio.sleep(0.01)
        echo.release.set()
        assert (await first).status_code == 200
        small = await small
        third = await client.post("/inspect", files=files(img))
        left = budget.used
    body = assert_error(second, 503, "overloaded")
    assert "budget" in body["message"] and body["retry_after_ms"] == 2000
    assert second.headers["retry-after"] == "2" and second.headers["retry-after-ms"] == "2000"
    assert small.status_code == 200
    assert third.status_code == 200 and left == 0  # released when each request ended


# ====================================================================== malformed worker results
def test_decode_result_rejects_malformed_and_bounds_decompression():
    good = encode_result(JobResult(job_id="j", ok=True, score=0.5, anomaly_map=np.zeros((600, 600), np.uint8)))
    assert decode_result(good).anomaly_map.shape == (600, 600)
    bomb_body = zlib.compress(b"\0" * 200_000_000, 9)  # 200 MB of zeros in ~200 KB
    header = json.dumps({"job_id": "j", "ok": True, "map_shape": [10, 10], "map_zlib": True}).encode()
    bomb = RESULT_MAGIC + struct.pack(">I", len(header)) + header + bomb_body
    cases = {
        "bomb": bomb,
        "magic": b"XXXX" + good[4:],
        "header length": RESULT_MAGIC + struct.pack(">I", 10**6) + b"{}",
        "json": RESULT_MAGIC + struct.pack(">I", 3) + b"{{{",
        "no job id": RESULT_MAGIC + struct.pack(">I", 2) + b"{}",
        "shape": RESULT_MAGIC + struct.pack(">I", 60) + json.dumps(
            {"job_id": "j", "ok": True, "map_shape": [-1, 5]}).encode().ljust(60),
        "huge shape": RESULT_MAGIC + struct.pack(">I", 70) + json.dumps(
            {"job_id": "j", "ok": True, "map_shape": [100000, 100000]}).encode().ljust(70),
        "nan": RESULT_MAGIC + struct.pack(">I", 40) + json.dumps(
            {"job_id": "j", "ok": True, "score": "nan"}).encode().ljust(40),
    }
    for name, payload in cases.items():
        with pytest.raises(PayloadError):
            decode_result(payload, max_pixels=50_000_000)
            pytest.fail(name)


async def test_malformed_worker_result_answers_502(redis_url, prefix):
    settings = settings_for(redis_url=redis_url, redis_prefix=prefix, workers_inline=False)
    keys = RedisKeys(prefix)
    source = RedisWorkSource(settings, consumer="liar")
    check = aioredis.Redis.from_url(redis_url)
    try:
        async with app_client(settings, start_worker=False) as (_app, client):
            await source.register("liar", {"name": "fake"})
            request = asyncio.create_task(client.post("/inspect", files=files(image_bytes(noise(8, 8)))))
            jobs = []
            while not jobs:
                jobs = await source.receive(1, 0.1)
            header = json.dumps({"job_id": jobs[0].id, "ok": True, "map_shape": [8, 8], "map_zlib": True}).encode()
            payload = RESULT_MAGIC + struct.pack(">I", len(header)) + header + zlib.compress(b"\0" * 10**7)
            async with check.pipeline(transaction=True) as pipe:
                pipe.lpush(keys.reply(jobs[0].id), payload)
                pipe.xack(keys.stream, keys.group, jobs[0].transport_ref)
                pipe.xdel(keys.stream, jobs[0].transport_ref)
                await pipe.execute()
            r = await request
    finally:
        await source.close()
        await check.aclose()
    body = assert_error(r, 502, "bad_result")
    assert "malformed result" in body["message"] and body["id"] == jobs[0].id
