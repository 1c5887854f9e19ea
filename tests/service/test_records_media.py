"""Kept images of inspection records: files written, found, expired by age and by size cap."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
from PIL import Image

from service.records.media import MediaStore, sniff_extension, thumbnail_size

DAY0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def store(tmp_path, **kw) -> MediaStore:
    options = {"keep": "all", "originals": False, "thumbnail_px": 64, "max_bytes": 0, "retention_days": 0}
    options.update(kw)
    return MediaStore(tmp_path / "records", **options)


def picture(seed: int, size=(120, 80)) -> tuple[Image.Image, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    return img, rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)


def test_save_and_find(tmp_path) -> None:
    media = store(tmp_path, originals=True)
    img, amap = picture(0)
    original = b"\x89PNG\r\n\x1a\n" + b"0" * 100
    kept = media.save("abc123", DAY0, img, amap, original)
    assert kept == {"thumb": "2026-05-01/abc123.thumb.jpg", "heatmap": "2026-05-01/abc123.heatmap.png",
                    "image": "2026-05-01/abc123.image.png", "heatmap-full": "2026-05-01/abc123.heatmap-full.png"}
    assert Image.open(media.path(kept["thumb"])).size == thumbnail_size(120, 80, 64) == (64, 43)
    assert Image.open(media.path(kept["heatmap-full"])).size == (120, 80)
    assert media.path(kept["image"]).read_bytes() == original
    assert media.total_bytes == sum(media.path(k).stat().st_size for k in kept.values())
    for hostile in ("../../etc/passwd", "/etc/passwd", "2026-05-01/../../x", "", None, "2026-05-01/none.jpg"):
        assert media.path(hostile) is None
    assert not list((tmp_path / "records").rglob("*.tmp"))
    assert [sniff_extension(b) for b in (b"\xff\xd8\xff", b"BM..", b"II*\x00", b"MM\x00*", b"??")] == \
        [".jpg", ".bmp", ".tif", ".tif", ".bin"]


def test_policy() -> None:
    assert MediaStore("/tmp/x", keep="anomalous", originals=False, thumbnail_px=8, max_bytes=0,
                      retention_days=0).wants(True)
    assert not MediaStore("/tmp/x", keep="anomalous", originals=False, thumbnail_px=8, max_bytes=0,
                          retention_days=0).wants(False)


def test_age_limit_deletes_old_days(tmp_path) -> None:
    media = store(tmp_path, retention_days=7)
    old = media.save("old", DAY0, *picture(1), None)
    new = media.save("new", DAY0 + timedelta(days=10), *picture(2), None)
    media.sweep(now=DAY0 + timedelta(days=10, hours=1))
    assert media.path(old["thumb"]) is None and media.path(new["thumb"]) is not None
    assert media.total_bytes == sum(media.path(k).stat().st_size for k in new.values())


def test_size_cap_deletes_the_oldest_first(tmp_path) -> None:
    probe = store(tmp_path / "probe").save("p", DAY0, *picture(0), None)
    one = sum((tmp_path / "probe" / "records" / k).stat().st_size for k in probe.values())
    media = store(tmp_path, max_bytes=int(one * 4.5))
    kept = [media.save(f"r{i}", DAY0 + timedelta(hours=i), *picture(i), None) for i in range(8)]
    assert media.total_bytes <= media.max_bytes
    present = [all(media.path(k) is not None for k in rec.values()) for rec in kept]
    assert present[-1] and present[-2] and not present[0], present
    first_kept = present.index(True)
    assert all(present[first_kept:]), "only the oldest are deleted"


def test_size_cap_orders_oldest_first_across_sort_runs(tmp_path, monkeypatch) -> None:
    """The cap sorts a day's files in short runs (no single GIL-holding sort of a whole day)
    merged lazily: the order, and so what is deleted, is the same as one sort."""
    import random

    import service.records.media as media_module

    rng = random.Random(0)
    files = [(rng.randrange(50), f"n{rng.randrange(10**6)}", f"/p/{i}", i) for i in range(1000)]
    monkeypatch.setattr(media_module, "SORT_RUN", 7)
    assert list(media_module._oldest_first(files)) == sorted(files)
    test_size_cap_deletes_the_oldest_first(tmp_path)  # 16 files, runs of 7: merged across runs
