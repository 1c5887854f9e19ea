"""The products API through the real ASGI app (in-process queue, tiny real detector), on
SQLite and PostgreSQL: register, teach from good photos, inspect against the product."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image
from product_helpers import defective_photo, good_files, good_photo
from svc_helpers import app_client, assert_error, files, image_bytes, settings_for


@pytest.fixture
def make_settings(database_url):
    def make(**overrides):
        return settings_for(database_url=database_url, calibration_wait_s=60.0, **overrides)

    return make


async def test_product_lifecycle(make_settings, tiny_detector) -> None:
    async with app_client(make_settings(), detector=tiny_detector) as (_app, client):
        created = await client.put("/products/bottle", json={"false_reject_rate": 0.02})
        assert created.status_code == 201, created.text
        body = created.json()
        assert (body["name"], body["class_name"], body["false_reject_rate"], body["few_shot"]) == ("bottle", "bottle", 0.02, True)
        assert body["calibration_status"] == "none" and body["image_count"] == 0 and body["reference"] is None
        updated = await client.put("/products/bottle", json={"class_name": "glass  bottle"})
        assert updated.status_code == 200 and updated.json()["class_name"] == "glass bottle"
        assert updated.json()["version"] == body["version"] + 1
        listed = (await client.get("/products")).json()["products"]
        assert [p["name"] for p in listed] == ["bottle"]
        assert (await client.get("/products/bottle")).json()["class_name"] == "glass bottle"
        assert (await client.delete("/products/bottle")).status_code == 204
        gone = assert_error(await client.get("/products/bottle"), 404, "product_not_found")
        assert "bottle" in gone["message"]
        assert_error(await client.delete("/products/bottle"), 404)
        # invalid names and settings are 422, not stored
        assert_error(await client.put("/products/Bottle", json={}), 422)
        assert_error(await client.put("/products/-x", json={}), 422)
        assert_error(await client.put("/products/" + "a" * 65, json={}), 422)
        assert_error(await client.put("/products/ok", json={"fusion_weight": 2}), 422)
        assert_error(await client.put("/products/ok", json={"threshold": 0.5}), 422)
        assert_error(await client.put("/products/ok", json={"class_name": "a\x07b"}), 422)
        assert (await client.get("/products")).json()["products"] == []


async def test_good_photos_calibrate_the_product_and_drive_inspections(make_settings, tiny_detector) -> None:
    async with app_client(make_settings(), detector=tiny_detector) as (_app, client):
        assert (await client.put("/products/carpet", json={"class_name": "carpet"})).status_code == 201
        upload = await client.post("/products/carpet/good", files=good_files(8))
        assert upload.status_code == 200, upload.text
        result = upload.json()
        assert result["added"] == 8 and result["duplicates"] == 0 and result["calibrated"] is True
        product = result["product"]
        assert product["calibration_status"] == "ready" and product["image_count"] == 8
        report = product["calibration"]
        assert report["image_count"] == 8 and 0.0 <= report["image_threshold"] <= 1.0
        assert report["image_threshold"] == product["image_threshold"]
        assert {"min", "p50", "max"} <= set(report["score_quantiles"]) and report["rule"]
        assert product["reference"]["version"] == 1 and product["reference"]["image_count"] == 8
        assert product["reference"]["identity"]["name"] == "baseline"

        again = await client.post("/products/carpet/good", files=good_files(2))  # already stored
        assert again.status_code == 200 and (again.json()["added"], again.json()["duplicates"]) == (0, 2)

        good = await client.post("/inspect?mask=true", files=files(image_bytes(good_photo(50))), data={"product": "carpet"})
        assert good.status_code == 200, good.text
        body = good.json()
        assert body["product"] == "carpet" and body["threshold_source"] == "product"
        assert body["threshold"] == pytest.approx(product["image_threshold"])
        assert body["pixel_threshold"] == pytest.approx(product["pixel_threshold"])
        assert body["reference_version"] == 1 and body["class_name"] == "carpet"
        assert set(body["component_scores"]) >= {"zero_shot", "few_shot"}
        assert body["is_anomalous"] == (body["score"] >= body["threshold"])
        mask = Image.open(io.BytesIO(base64.b64decode(body["mask_png"])))
        assert mask.format == "PNG" and mask.mode == "1" and mask.size == (64, 64)
        for region in body["defects"]:
            assert region["area"] >= 1 and 0 <= region["x"] < 64 and region["peak"] >= body["pixel_threshold"] - 1 / 255

        bad = await client.post("/inspect", files=files(image_bytes(defective_photo(1))), data={"product": "carpet"})
        assert bad.status_code == 200 and bad.json()["threshold_source"] == "product"

        # a class name that is not the product's is refused; the same one is accepted
        assert_error(await client.post("/inspect", files=files(image_bytes(good_photo(51))),
                                       data={"product": "carpet", "class_name": "bottle"}), 422)
        same = await client.post("/inspect", files=files(image_bytes(good_photo(51))),
                                 data={"product": "carpet", "class_name": "Carpet"})
        assert same.status_code == 200


async def test_bad_photo_keeps_nothing_and_names_the_file(make_settings, tiny_detector) -> None:
    async with app_client(make_settings(), detector=tiny_detector) as (_app, client):
        await client.put("/products/gear", json={})
        upload = good_files(3) + [("images", ("broken.png", b"this is not a png", "image/png"))]
        body = assert_error(await client.post("/products/gear/good", files=upload), 415)
        assert "broken.png" in body["message"] and "nothing" in body["message"]
        product = (await client.get("/products/gear")).json()
        assert product["image_count"] == 0 and product["calibration_status"] == "none"
        assert_error(await client.post("/products/gear/good", files=good_files(1) + [
            ("images", ("a.txt", b"hello", "text/plain"))]), 415)
        assert_error(await client.post("/products/nothere/good", files=good_files(1)), 404, "product_not_found")
        assert_error(await client.post("/products/gear/good"), 415)  # not multipart: refused by the upload guard
        assert_error(await client.post("/products/gear/good", files={"other": ("a.png", b"x", "image/png")}), 422)
        assert (await client.get("/products/gear")).json()["image_count"] == 0


async def test_concurrent_uploads_to_one_product_lose_no_photo(make_settings, tiny_detector) -> None:
    async with app_client(make_settings(), detector=tiny_detector) as (_app, client):
        await client.put("/products/tile", json={})
        answers = await asyncio.gather(*(client.post("/products/tile/good", files=good_files(3, start=10 * k))
                                         for k in range(3)))
        assert all(a.status_code in (200, 202) for a in answers), [a.text for a in answers]
        assert sum(a.json()["added"] for a in answers) == 9
        for _ in range(100):
            product = (await client.get("/products/tile")).json()
            if product["calibration_status"] == "ready":
                break
            await asyncio.sleep(0.1)
        assert product["image_count"] == 9
        assert product["calibration_status"] == "ready"
        assert product["calibration"]["image_count"] == 9, "the stored calibration covers every photo"


async def test_unknown_product_and_threshold_sources(make_settings, tiny_detector, tmp_path) -> None:
    thresholds = tmp_path / "thresholds.yaml"
    thresholds.write_text("default: 0.6\nclasses:\n  screw: 0.3\n")
    async with app_client(make_settings(thresholds_file=thresholds), detector=tiny_detector) as (_app, client):
        png = image_bytes(good_photo(1))
        body = assert_error(await client.post("/inspect", files=files(png), data={"product": "ghost"}), 404, "product_not_found")
        assert "ghost" in body["message"]
        assert_error(await client.post("/inspect", files=files(png), data={"product": "Bad Name"}), 422)
        plain = (await client.post("/inspect", files=files(png))).json()
        assert (plain["threshold_source"], plain["threshold"], plain["product"]) == ("default", 0.6, None)
        assert plain["reference_version"] is None and plain["pixel_threshold"] == 0.5
        assert "mask_png" not in plain
        by_class = (await client.post("/inspect", files=files(png), data={"class_name": "screw"})).json()
        assert (by_class["threshold_source"], by_class["threshold"]) == ("class", 0.3)
        # a product without photos decides by its class name like anyone else
        await client.put("/products/screw-m4", json={"class_name": "screw"})
        fresh = (await client.post("/inspect", files=files(png), data={"product": "screw-m4"})).json()
        assert (fresh["threshold_source"], fresh["product"], fresh["reference_version"]) == ("class", "screw-m4", None)


async def test_settings_change_recalibrates_and_few_shot_can_be_turned_off(make_settings, tiny_detector) -> None:
    async with app_client(make_settings(), detector=tiny_detector) as (_app, client):
        await client.put("/products/wood", json={})
        assert (await client.post("/products/wood/good", files=good_files(6))).status_code == 200
        changed = await client.put("/products/wood", json={"fusion_weight": 0.25})
        assert changed.status_code == 200 and changed.json()["calibration_status"] in ("pending", "ready")
        for _ in range(100):
            product = (await client.get("/products/wood")).json()
            if product["calibration_status"] == "ready" and product["calibration"]["fusion_weight"] == 0.25:
                break
            await asyncio.sleep(0.1)
        assert product["calibration"]["fusion_weight"] == 0.25 and product["reference"]["version"] == 2
        await client.put("/products/wood", json={"few_shot": False})
        for _ in range(100):
            product = (await client.get("/products/wood")).json()
            if product["calibration_status"] == "ready" and product["calibration"]["few_shot"] is False:
                break
            await asyncio.sleep(0.1)
        answer = (await client.post("/inspect", files=files(image_bytes(good_photo(70))), data={"product": "wood"})).json()
        assert answer["reference_version"] is None and "few_shot" not in (answer.get("component_scores") or {})
        assert answer["threshold_source"] == "product", "thresholds calibrated on zero-shot scores"


async def test_reference_built_for_another_detector_is_refused_until_rebuilt(database_url, tiny_detector) -> None:
    """A bank built at one input size is never fused by a detector running another one."""
    from model.factory import BackboneSpec, DetectorConfig, build_detector

    other = build_detector(DetectorConfig(detector="baseline", backbone=BackboneSpec("tiny-clip-random", "random"),
                                          image_size=96, device="cpu"))
    settings = settings_for(database_url=database_url, calibration_wait_s=60.0)
    async with app_client(settings, detector=tiny_detector) as (_app, client):
        await client.put("/products/cable", json={})
        assert (await client.post("/products/cable/good", files=good_files(4))).status_code == 200
    async with app_client(settings, detector=other) as (_app, client):
        png = image_bytes(good_photo(9))
        body = assert_error(await client.post("/inspect", files=files(png), data={"product": "cable"}), 409, "reference_mismatch")
        assert "image_size" in body["message"] and "calibrate" in body["message"]
        rebuilt = await client.post("/products/cable/calibrate")
        assert rebuilt.status_code == 200, rebuilt.text
        assert rebuilt.json()["product"]["reference"]["image_size"] == 96
        fixed = await client.post("/inspect", files=files(png), data={"product": "cable"})
        assert fixed.status_code == 200 and fixed.json()["reference_version"] == 2


async def test_one_photo_waits_for_a_second_before_calibrating(make_settings, tiny_detector) -> None:
    async with app_client(make_settings(), detector=tiny_detector) as (_app, client):
        await client.put("/products/nut", json={})
        one = await client.post("/products/nut/good", files=good_files(1))
        assert one.status_code == 200, one.text
        product = one.json()["product"]
        assert product["calibration_status"] == "none" and product["reference"] is None
        assert product["image_threshold"] is None and "at least 2" in product["calibration"]["rule"]
        inspected = (await client.post("/inspect", files=files(image_bytes(good_photo(5))), data={"product": "nut"})).json()
        assert inspected["threshold_source"] == "default" and inspected["reference_version"] is None
        two = await client.post("/products/nut/good", files=good_files(1, start=1))
        assert two.json()["product"]["calibration_status"] == "ready" and two.json()["product"]["reference"]["version"] == 1
