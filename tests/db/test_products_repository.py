"""Product storage on both backends: versions, photo dedupe, conditional calibration writes,
cascading deletes, and concurrent uploads that lose no photo."""

from __future__ import annotations

import threading

import pytest

from service.db.database import open_database
from service.db.products import CALIBRATION_FAILED, CALIBRATION_PENDING, CALIBRATION_READY, ProductImage
from service.products import repository
from service.products.repository import GoodImage, ProductNotFound


def photo(index: int, size: int = 100) -> GoodImage:
    data = bytes([index % 256]) * size + index.to_bytes(4, "big")
    return GoodImage(f"good_{index}.png", "PNG", 8, 8, data)


@pytest.fixture
def database(database_url):
    db = open_database(database_url, migrate=True)
    yield db
    db.close()


def test_create_update_and_versions(database) -> None:
    product, created, recalibrate = database.transaction(lambda s: repository.upsert_product(s, "bottle", {}))
    assert created and not recalibrate
    assert (product.class_name, product.false_reject_rate, product.few_shot, product.fusion_weight) == ("bottle", 0.01, True, 0.5)
    assert product.version == 1 and product.images_version == 0
    same, created, _ = database.transaction(lambda s: repository.upsert_product(s, "bottle", {"fusion_weight": 0.5}))
    assert not created and same.version == 1, "no change: no new version"
    changed, _, recalibrate = database.transaction(lambda s: repository.upsert_product(s, "bottle", {"class_name": "glass bottle"}))
    assert changed.version == 2 and changed.class_name == "glass bottle"
    assert not recalibrate, "nothing to recalibrate without photos"
    with pytest.raises(ValueError, match="unknown product settings"):
        database.transaction(lambda s: repository.upsert_product(s, "bottle", {"threshold": 0.3}))


def test_photos_are_deduplicated_and_bump_the_image_version(database) -> None:
    database.transaction(lambda s: repository.upsert_product(s, "screw", {}))
    product, added, duplicates = database.transaction(lambda s: repository.add_images(s, "screw", [photo(1), photo(2), photo(1)]))
    assert (added, duplicates) == (2, 1)
    assert product.images_version == 1 and product.calibration_status == CALIBRATION_PENDING
    product, added, duplicates = database.transaction(lambda s: repository.add_images(s, "screw", [photo(2)]))
    assert (added, duplicates) == (0, 1) and product.images_version == 1, "nothing new: same image set"
    photos = database.transaction(lambda s: repository.load_images(s, product.id))
    assert [name for name, _ in photos] == ["good_1.png", "good_2.png"]
    assert photos[0][1] == photo(1).data
    with pytest.raises(ProductNotFound):
        database.transaction(lambda s: repository.add_images(s, "nope", [photo(3)]))


def test_calibration_is_stored_only_for_the_state_it_was_computed_from(database) -> None:
    database.transaction(lambda s: repository.upsert_product(s, "cable", {}))
    product, _, _ = database.transaction(lambda s: repository.add_images(s, "cable", [photo(1)]))
    stale = repository.calibration_target(product)
    product, _, _ = database.transaction(lambda s: repository.add_images(s, "cable", [photo(2)]))
    current = repository.calibration_target(product)
    store = lambda target, bank: database.transaction(lambda s: repository.store_calibration(  # noqa: E731
        s, target, bank=bank, identity={"name": "baseline", "backbone": "tiny", "image_size": 64},
        report={"image_count": 2}, image_threshold=0.7, pixel_threshold=0.8))
    assert store(stale, b"old bank") is False, "a build overtaken by a newer upload is discarded"
    assert store(current, b"bank v1") is True
    assert store(current, b"bank v2") is True
    product = database.transaction(lambda s: repository.get_product(s, "cable"))
    reference = database.transaction(lambda s: repository.reference_of(s, product.id))
    assert product.calibration_status == CALIBRATION_READY and product.image_threshold == 0.7
    assert reference.version == 2 and bytes(reference.bank) == b"bank v2" and reference.images_version == current.images_version
    # a settings change that calibration depends on invalidates the target as well
    changed, _, recalibrate = database.transaction(lambda s: repository.upsert_product(s, "cable", {"fusion_weight": 0.3}))
    assert recalibrate and changed.calibration_status == CALIBRATION_PENDING
    assert store(current, b"bank v3") is False
    assert database.transaction(lambda s: repository.mark_calibration(s, current, CALIBRATION_FAILED, "x")) is False
    newest = repository.calibration_target(changed)
    assert database.transaction(lambda s: repository.mark_calibration(s, newest, CALIBRATION_FAILED, "boom")) is True
    assert database.transaction(lambda s: repository.get_product(s, "cable")).calibration_error == "boom"


def test_delete_cascades_to_photos_and_reference(database) -> None:
    from sqlalchemy import func, select

    database.transaction(lambda s: repository.upsert_product(s, "gear", {}))
    product, _, _ = database.transaction(lambda s: repository.add_images(s, "gear", [photo(1), photo(2)]))
    database.transaction(lambda s: repository.store_calibration(
        s, repository.calibration_target(product), bank=b"b", identity={}, report={"image_count": 2},
        image_threshold=0.5, pixel_threshold=0.5))
    database.transaction(lambda s: repository.delete_product(s, "gear"))
    assert database.transaction(lambda s: s.scalar(select(func.count()).select_from(ProductImage))) == 0
    assert database.transaction(lambda s: repository.reference_of(s, product.id)) is None
    with pytest.raises(ProductNotFound):
        database.transaction(lambda s: repository.delete_product(s, "gear"))


def test_concurrent_uploads_lose_no_photo(database) -> None:
    database.transaction(lambda s: repository.upsert_product(s, "nut", {}))
    errors: list[BaseException] = []

    def upload(start: int) -> None:
        try:
            for index in range(start, start + 5):
                database.transaction(lambda s, i=index: repository.add_images(s, "nut", [photo(i)]))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(start,)) for start in (0, 100, 200, 300)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    product = database.transaction(lambda s: repository.get_product(s, "nut"))
    assert database.transaction(lambda s: repository.image_counts(s, [product.id]))[product.id] == 20
    assert product.images_version == 20, "every upload bumped the version exactly once"
