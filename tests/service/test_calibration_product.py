"""int8 calibration on a registered product's good photos (GENCLIP_CALIBRATION_PRODUCT)."""

from __future__ import annotations

import json

import pytest
from product_helpers import good_photo
from svc_helpers import image_bytes, settings_for

from model.errors import CalibrationDataError
from service.db.database import open_database
from service.products import repository
from service.products.repository import GoodImage
from service.worker import load_detector, product_calibration_photos

TINY = {"backbone": "tiny-clip-random", "backbone_weights": "random", "detector": "baseline", "device": "cpu",
        "torch_threads": 1}


def register(database_url: str, name: str, count: int) -> None:
    database = open_database(database_url, migrate=True)
    try:
        photos = [GoodImage(f"g{i}.png", "PNG", 64, 64, image_bytes(good_photo(i))) for i in range(count)]
        database.transaction(lambda s: repository.upsert_product(s, name, {}))
        if photos:
            database.transaction(lambda s: repository.add_images(s, name, photos))
    finally:
        database.close()


def test_int8_calibrates_on_the_products_good_photos(sqlite_url, tmp_path) -> None:
    register(sqlite_url, "carpet", 5)
    cache = tmp_path / "ir"
    photos = product_calibration_photos(settings_for(database_url=sqlite_url, calibration_product="carpet", **TINY))
    assert [photo.size for photo in photos] == [(64, 64)] * 5
    on_product = load_detector(settings_for(database_url=sqlite_url, runtime="openvino", precision="int8",
                                            openvino_cache_dir=cache, calibration_product="carpet", **TINY))
    on_textures = load_detector(settings_for(database_url=sqlite_url, runtime="openvino", precision="int8",
                                             openvino_cache_dir=cache, **TINY))
    assert on_product.identity.precision == on_textures.identity.precision == "int8"
    int8_entries = [json.loads(meta.read_text()) for meta in cache.rglob("meta.json")]
    int8_entries = [meta for meta in int8_entries if "int8" in json.dumps(meta)]
    assert len(int8_entries) == 2, "the product's photos and the textures are two calibration sets"
    result = on_product.inspect([good_photo(9)], ["carpet"])[0]
    assert 0.0 <= result.score <= 1.0


def test_calibration_product_errors_are_clear(sqlite_url) -> None:
    register(sqlite_url, "empty", 0)
    with pytest.raises(CalibrationDataError, match="no good photos"):
        product_calibration_photos(settings_for(database_url=sqlite_url, calibration_product="empty", **TINY))
    with pytest.raises(CalibrationDataError, match="no such product"):
        product_calibration_photos(settings_for(database_url=sqlite_url, calibration_product="ghost", **TINY))
