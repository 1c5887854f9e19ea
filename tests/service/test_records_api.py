"""Inspection records through the real app: every answer recorded (both transports), the
records API (list, cursor pages, CSV, one record, kept image and heatmap, reviews, stats),
image retention, drift on /metrics, API keys."""

from __future__ import annotations

import asyncio
import csv
import io
import logging
from datetime import timedelta

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text
from svc_fakes import EchoDetector, expected_score
from svc_helpers import app_client, assert_error, files, image_bytes, metric_value, noise, settings_for, solid

from service.db.base import utcnow
from service.db.products import Product
from service.heatmap import JET_LUT
from service.records.recorder import insert_rows

from record_rows import make_row  # tests/record_rows.py


@pytest.fixture
def make_settings(request, prefix):
    def make(transport: str = "inprocess", **overrides):
        overrides.setdefault("records_flush_ms", 20.0)
        if transport == "redis":
            url = request.getfixturevalue("redis_url")
            overrides = {"redis_url": url, "redis_prefix": prefix, "workers_inline": True, **overrides}
        return settings_for(**overrides)

    return make


async def inspect(client, img: Image.Image, **form) -> dict:
    response = await client.post("/inspect", files=files(image_bytes(img)), data=form)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("transport", ["inprocess", "redis"])
async def test_every_answer_is_recorded_with_its_context(make_settings, transport) -> None:
    async with app_client(make_settings(transport), detector=EchoDetector()) as (app, client):
        dark, bright = solid(64, 48, 40), solid(80, 60, 220)
        a = await inspect(client, dark, class_name="bottle", part_id=" SN-0001 ", station="line 1 / cam 2")
        b = await inspect(client, bright)
        r = await client.post("/inspect", files=files(image_bytes(noise(32, 32))), headers={"Accept": "image/png"},
                              data={"part_id": "png-client"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        c_id = r.headers["X-Anomaly-Id"]

        rec = (await client.get(f"/inspections/{a['id']}")).json()
        assert rec["score"] == a["score"] == pytest.approx(expected_score(dark))
        assert (rec["threshold"], rec["decision"], rec["is_anomalous"]) == (0.5, "good", False)
        assert (rec["class_name"], rec["class_label"]) == ("bottle", "bottle")
        assert (rec["part_id"], rec["station"]) == ("SN-0001", "line 1 / cam 2")
        assert (rec["detector"], rec["backbone"], rec["checkpoint"]) == ("echo", "fake-backbone", "f" * 64)
        assert rec["identity"]["backbone_weights"] == "none" and rec["identity"]["layers"] == [1]
        assert rec["timing_ms"] == a["timing_ms"] and rec["worker"]
        assert (rec["image_width"], rec["image_height"]) == (64, 48)
        assert rec["review"] is None and rec["reviews"] == []
        assert (await client.get(f"/inspections/{b['id']}")).json()["decision"] == "anomalous"
        assert (await client.get(f"/inspections/{c_id}")).json()["part_id"] == "png-client"

        page = (await client.get("/inspections")).json()
        assert [item["id"] for item in page["items"]] == [c_id, b["id"], a["id"]]  # newest first
        metrics = (await client.get("/metrics")).text
        assert metric_value(metrics, "genclip_records_written_total") == 3
        assert metric_value(metrics, "genclip_records_dropped_total") == 0


async def test_client_fields_are_validated_and_a_refused_request_is_not_recorded(make_settings) -> None:
    async with app_client(make_settings(), detector=EchoDetector()) as (app, client):
        body = image_bytes(solid(16, 16))
        for data in ({"part_id": "a\x00b"}, {"station": "cam\n1"}, {"part_id": "x" * 129}, {"station": "s" * 65}):
            r = await client.post("/inspect", files=files(body), data=data)
            assert_error(r, 422, "validation_error")
        ok = await inspect(client, solid(16, 16), part_id="p" * 128, station="ü" * 64)
        await app.state.service.recorder.flush()
        items = (await client.get("/inspections")).json()["items"]
        assert [i["id"] for i in items] == [ok["id"]]


async def test_list_filters_cursor_pages_and_csv(make_settings) -> None:
    async with app_client(make_settings(), detector=EchoDetector()) as (app, client):
        answers = []
        for i in range(7):
            answers.append(await inspect(client, solid(24, 24, 30 * i + 20), station=f"s{i % 2}",
                                         part_id="=HYPERLINK(1)" if i == 3 else f"P{i}"))
        await app.state.service.recorder.flush()
        pages, cursor = [], None
        while True:
            params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
            page = (await client.get("/inspections", params=params)).json()
            pages.append([item["id"] for item in page["items"]])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert [len(p) for p in pages] == [3, 3, 1]
        assert sum(pages, []) == [a["id"] for a in reversed(answers)]

        anomalous = {a["id"] for a in answers if a["is_anomalous"]}
        got = (await client.get("/inspections", params={"decision": "anomalous", "station": "s0"})).json()["items"]
        assert {i["id"] for i in got} == {a["id"] for i, a in enumerate(answers) if i % 2 == 0} & anomalous
        got = (await client.get("/inspections", params={"min_score": 0.3, "max_score": 0.6})).json()["items"]
        assert {i["id"] for i in got} == {a["id"] for a in answers if 0.3 <= a["score"] <= 0.6}

        for params in ({"cursor": "not a cursor!"}, {"limit": 0}, {"limit": 501}, {"min_score": 2},
                       {"decision": "maybe"}, {"since": "yesterday"}, {"since": "0.5"}, {"product": "a\x01"}):
            assert_error(await client.get("/inspections", params=params), 422)
        # well-formed but naming no page of ours: that page does not exist
        assert_error(await client.get("/inspections", params={"cursor": "garbage"}), 404, "cursor_not_found")

        r = await client.get("/inspections.csv", params={"station": "s1"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        assert "attachment" in r.headers["content-disposition"]
        table = list(csv.DictReader(io.StringIO(r.text)))
        assert [row["id"] for row in table] == [a["id"] for i, a in reversed(list(enumerate(answers))) if i % 2 == 1]
        assert table[1]["part_id"] == "'=HYPERLINK(1)"  # spreadsheet formula neutralised
        assert float(table[0]["score"]) == answers[5]["score"] and table[0]["detector"] == "echo"
        assert len(list(csv.DictReader(io.StringIO((await client.get("/inspections.csv?limit=2")).text)))) == 2


async def test_kept_thumbnail_and_heatmap(make_settings) -> None:
    async with app_client(make_settings(records_thumbnail_px=100), detector=EchoDetector()) as (app, client):
        img = Image.fromarray(np.tile(np.linspace(0, 255, 400, dtype=np.uint8), (200, 1))).convert("RGB")  # 400x200
        answer = await inspect(client, img)
        r = await client.get(f"/inspections/{answer['id']}/image")
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        thumb = Image.open(io.BytesIO(r.content))
        assert thumb.format == "JPEG" and thumb.size == (100, 50)
        r = await client.get(f"/inspections/{answer['id']}/heatmap")
        heat = Image.open(io.BytesIO(r.content))
        assert heat.format == "PNG" and heat.size == (100, 50)
        rgb = np.asarray(heat.convert("RGB")).astype(int)
        # the echo map rises left to right: the jet colours of its ends, blue on the left, red on the right
        assert np.abs(rgb[25, 0] - JET_LUT[0]).max() <= 20 and np.abs(rgb[25, -1] - JET_LUT[255]).max() <= 20
        assert_error(await client.get(f"/inspections/{answer['id']}/image?size=full"), 404, "not_retained")
        assert_error(await client.get("/inspections/0123abc/image"), 404, "not_found")
        assert_error(await client.get("/inspections/not..valid/image"), 422)


async def test_originals_on_request(make_settings) -> None:
    settings = make_settings(records_keep_originals=True, records_thumbnail_px=32)
    async with app_client(settings, detector=EchoDetector()) as (app, client):
        img = noise(90, 70, seed=3)
        sent = image_bytes(img, "PNG")
        r = await client.post("/inspect", files=files(sent), data={})
        record_id = r.json()["id"]
        rec = (await client.get(f"/inspections/{record_id}")).json()
        assert rec["original_kept"]
        full = await client.get(f"/inspections/{record_id}/image")  # auto: the original
        assert full.content == sent and full.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO((await client.get(f"/inspections/{record_id}/image?size=thumb")).content)).size == (32, 25)
        heat = Image.open(io.BytesIO((await client.get(f"/inspections/{record_id}/heatmap?size=full")).content))
        assert heat.size == (90, 70)


async def test_keep_anomalous_only_and_none(make_settings) -> None:
    async with app_client(make_settings(records_keep_images="anomalous"), detector=EchoDetector()) as (app, client):
        good, bad = await inspect(client, solid(20, 20, 10)), await inspect(client, solid(20, 20, 250))
        assert (await client.get(f"/inspections/{bad['id']}/image")).status_code == 200
        rec = (await client.get(f"/inspections/{good['id']}")).json()
        assert rec["image_url"] is None and rec["heatmap_url"] is None
        assert_error(await client.get(f"/inspections/{good['id']}/heatmap"), 404, "not_retained")
    settings = make_settings(records_keep_images="none")
    async with app_client(settings, detector=EchoDetector()) as (app, client):
        bad = await inspect(client, solid(20, 20, 250))
        assert_error(await client.get(f"/inspections/{bad['id']}/image"), 404, "not_retained")
        assert not settings.records_dir.exists() or not any(settings.records_dir.rglob("*.*"))


async def test_review_api(make_settings) -> None:
    # a long flush interval: the record is still buffered when the review arrives
    async with app_client(make_settings(records_flush_ms=60_000, records_batch=1000),
                          detector=EchoDetector()) as (app, client):
        answer = await inspect(client, solid(20, 20, 250))
        assert app.state.service.recorder.is_pending(answer["id"])
        r = await client.post(f"/inspections/{answer['id']}/review",
                              json={"verdict": "good", "note": "  dust on\nthe lens ", "reviewer": "ann"})
        assert r.status_code == 200, r.text
        assert r.json()["review"]["verdict"] == "good" and r.json()["review"]["note"] == "dust on the lens"
        r = await client.post(f"/inspections/{answer['id']}/review", json={"verdict": "defect"})
        body = r.json()
        assert body["review"]["verdict"] == "defect" and body["review"]["reviewer"] is None
        assert [x["verdict"] for x in body["reviews"]] == ["good", "defect"]
        listed = (await client.get("/inspections", params={"reviewed": "true"})).json()["items"]
        assert [i["id"] for i in listed] == [answer["id"]]
        assert_error(await client.post("/inspections/ffff/review", json={"verdict": "good"}), 404, "not_found")
        for bad in ({"verdict": "maybe"}, {}, {"verdict": "good", "note": "x" * 2001},
                    {"verdict": "good", "reviewer": "a\x00"}):
            assert_error(await client.post(f"/inspections/{answer['id']}/review", json=bad), 422)


def _product(name: str, p50: float | None, threshold: float = 0.5) -> Product:
    return Product(name=name, class_name=name, false_reject_rate=0.01, few_shot=True, fusion_weight=0.5, version=1,
                   images_version=1, image_threshold=threshold, calibration_status="ready",
                   calibration={"score_quantiles": {"p50": p50}} if p50 is not None else None)


async def test_product_stats_and_drift_gauges(make_settings) -> None:
    async with app_client(make_settings(drift_limit=0.1, drift_min_samples=5), detector=EchoDetector()) as (app, client):
        database = app.state.service.database
        now = utcnow()
        rows = [make_row(now - timedelta(minutes=i), 0.45, product="cap") for i in range(10)]
        rows += [make_row(now - timedelta(minutes=i), 0.2, product="lid") for i in range(10)]
        rows += [make_row(now - timedelta(days=1, minutes=i), 0.9, product="lid") for i in range(3)]
        database.transaction(lambda s: insert_rows(s, rows))
        database.transaction(lambda s: s.add_all([_product("cap", 0.2), _product("lid", 0.22)]))

        r = await client.get("/products/cap/stats")
        assert r.status_code == 200, r.text
        cap = r.json()
        assert cap["total"] == 10 and cap["drift"]["drifting"] and cap["drift"]["delta"] == pytest.approx(0.25, abs=2e-3)
        lid = (await client.get("/products/lid/stats", params={"days": 7})).json()
        assert (lid["total"], lid["anomalous"], lid["drift"]["drifting"]) == (13, 3, False)
        assert len(lid["daily"]) in (2, 3)  # UTC midnight may split the last hour
        short = (await client.get("/products/lid/stats", params={"since": (now - timedelta(hours=2)).isoformat()})).json()
        assert short["total"] == 10
        assert_error(await client.get("/products/none-such/stats"), 404, "not_found")
        assert_error(await client.get("/products/BAD NAME/stats"), 422)
        empty = await client.get("/products/cap/stats", params={"since": now.isoformat(),
                                                                "until": (now - timedelta(hours=1)).isoformat()})
        assert empty.status_code == 200 and empty.json()["total"] == 0, "until before since: an empty window"

        page = await client.get("/ui/products/cap")
        assert page.status_code == 200 and 'id="drift-alert"' in page.text and "threshold 0.500" in page.text
        assert 'id="drift-alert"' not in (await client.get("/ui/products/lid")).text

        await app.state.service.drift.refresh()
        metrics = (await client.get("/metrics")).text
        assert metric_value(metrics, "genclip_product_drifting", {"product": "cap"}) == 1
        assert metric_value(metrics, "genclip_product_drifting", {"product": "lid"}) == 0
        assert metric_value(metrics, "genclip_product_drift", {"product": "cap"}) == pytest.approx(0.25, abs=2e-3)
        database.transaction(lambda s: s.delete(s.get(Product, s.query(Product.id).filter_by(name="cap").scalar())))
        await app.state.service.drift.refresh()
        assert 'product="cap"' not in (await client.get("/metrics")).text



async def test_records_disabled(make_settings) -> None:
    settings = make_settings(records_enabled=False)
    async with app_client(settings, detector=EchoDetector()) as (app, client):
        await inspect(client, solid(16, 16))
        assert (await client.get("/inspections")).json()["items"] == []
        assert not settings.records_dir.exists()


async def test_records_api_asks_for_the_api_key(make_settings) -> None:
    async with app_client(make_settings(api_keys=["k1"]), detector=EchoDetector()) as (app, client):
        assert_error(await client.get("/inspections"), 401)
        assert_error(await client.get("/products/x/stats"), 401)
        assert (await client.get("/inspections", headers={"X-API-Key": "k1"})).status_code == 200
        assert (await client.get("/inspections", cookies={"genclip_api_key": "k1"})).status_code == 200
        assert_error(await client.get("/inspections", cookies={"genclip_api_key": "k2"}), 401)
        r = await client.get("/ui", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?next=")
        assert (await client.get("/ui", cookies={"genclip_api_key": "k1"})).status_code == 200
        assert (await client.get("/ui/static/app.js")).status_code == 200  # assets stay public


async def test_full_buffer_drops_the_oldest_counted_and_logged(make_settings, caplog) -> None:
    """The database refuses every write: /inspect still answers; what overflows is counted and logged."""
    settings = make_settings(records_buffer=3, records_batch=2, records_keep_images="none")
    async with app_client(settings, detector=EchoDetector()) as (app, client):
        database = app.state.service.database
        database.transaction(lambda s: s.execute(text("ALTER TABLE inspections RENAME TO inspections_away")))
        caplog.set_level(logging.ERROR, logger="service.records.lost")
        ids = [(await inspect(client, solid(16, 16, 10 * i), part_id=f"P{i}"))["id"] for i in range(6)]
        await asyncio.sleep(0.3)
        metrics = (await client.get("/metrics")).text
        assert metric_value(metrics, "genclip_records_dropped_total", {"reason": "buffer_full"}) == 3
        assert metric_value(metrics, "genclip_records_write_errors_total") >= 1
        assert metric_value(metrics, "genclip_records_buffered") == 3
        lost = [r.getMessage() for r in caplog.records if r.name == "service.records.lost"]
        assert len(lost) == 3 and all(any(i in m for m in lost) for i in ids[:3]) and '"part_id": "P0"' in lost[0]
        assert_error(await client.get("/inspections"), 503, "database_unavailable")
