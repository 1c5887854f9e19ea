"""Unit tests of the service building blocks (no server)."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from PIL import Image
from svc_helpers import image_bytes, noise, png_header_only, solid

from service import heatmap
from service.routers.inspection import prefers_png
from service.image_input import ImageRejected, check_part_content_type, decode_image
from service.queue.base import Job, JobResult
from service.queue.jobs import decode_job, decode_result, encode_job, encode_result
from service.settings import Settings, env_table
from service.thresholds import Thresholds, ThresholdsError

LIMITS = {"max_bytes": 1_000_000, "max_pixels": 5_000_000}


# ------------------------------------------------------------------ settings
def test_settings_read_env(monkeypatch):
    monkeypatch.setenv("GENCLIP_API_KEYS", "k1, k2")
    monkeypatch.setenv("GENCLIP_MAX_BATCH", "4")
    monkeypatch.setenv("GENCLIP_REDIS_URL", "redis://x:1/0")
    monkeypatch.setenv("GENCLIP_BACKBONE", "ViT-B-16")
    monkeypatch.setenv("GENCLIP_BACKBONE_WEIGHTS", "random")
    s = Settings()
    assert s.api_keys == ["k1", "k2"]
    assert s.max_batch == 4
    assert s.transport == "redis" and not s.run_inline_worker
    monkeypatch.setenv("GENCLIP_API_KEYS", '["a"]')
    monkeypatch.setenv("GENCLIP_REDIS_URL", "")
    s = Settings()
    assert s.api_keys == ["a"] and s.redis_url is None and s.run_inline_worker
    cfg = s.detector_config()
    assert cfg.backbone.model_name == "ViT-B-16" and cfg.backbone.weights == "random"
    assert cfg.detector == "auto" and cfg.backbone.allow_download is False


def test_settings_defaults_and_docs():
    s = Settings(_env_file=None)
    assert (s.backbone, s.backbone_weights, s.detector, s.device) == ("ViT-L-14-336", "openai", "auto", "auto")
    assert s.max_upload_bytes == 20 * 1024 * 1024 and s.default_threshold == 0.5 and s.api_keys == []
    assert all(f.description for f in Settings.model_fields.values()), "every setting is documented"
    assert "GENCLIP_QUEUE_MAX_DEPTH" in env_table()
    with pytest.raises(ValueError):
        Settings(max_batch=0)


# ------------------------------------------------------------------ thresholds
def test_thresholds_file(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("default: 0.3\nclasses:\n  Metal Nut: 0.9\n  bottle: 0.1\n")
    t = Thresholds.load(path, 0.5)
    assert t.default == 0.3
    assert t.for_class("metal  nut") == 0.9
    assert t.for_class(None, "bottle") == 0.1  # falls back to the CNF label
    assert t.for_class("unknown", "object") == 0.3
    jpath = tmp_path / "t.json"
    jpath.write_text(json.dumps({"classes": {"a": 0.7}}))
    assert Thresholds.load(jpath, 0.45).for_class("a") == 0.7
    assert Thresholds.load(jpath, 0.45).default == 0.45
    jpath.write_text(json.dumps({"classes": {"a": 1.7}}))
    with pytest.raises(ThresholdsError):
        Thresholds.load(jpath)
    jpath.write_text(json.dumps({"threshold": 0.2}))
    with pytest.raises(ThresholdsError):
        Thresholds.load(jpath)


# ------------------------------------------------------------------ heatmap
def test_jet_colormap_and_png_sizes():
    assert tuple(heatmap.JET_LUT[0]) == (0, 0, 128)  # dark blue
    assert tuple(heatmap.JET_LUT[255]) == (128, 0, 0)  # dark red
    r, g, b = heatmap.JET_LUT[128]
    assert g > 200 and abs(int(r) - int(b)) < 40  # green-ish middle
    amap = np.tile(np.linspace(0, 255, 70).astype(np.uint8), (30, 1))
    png = Image.open(io.BytesIO(heatmap.heatmap_png(amap)))
    assert png.format == "PNG" and png.size == (70, 30)
    base = solid(70, 30, (0, 0, 0))
    over = np.asarray(Image.open(io.BytesIO(heatmap.overlay_png(amap, base))))
    full = np.asarray(png.convert("RGB"))
    assert over.shape == (30, 70, 3)
    assert np.allclose(over, full * 0.4, atol=2)  # 40 % heatmap over black


def test_heatmap_png_encode_is_fast_at_518():
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (37, 37), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((518, 518), Image.BILINEAR))
    heatmap.heatmap_png(smooth)
    t0 = time.perf_counter()
    for _ in range(5):
        heatmap.heatmap_png(smooth)
    per = (time.perf_counter() - t0) / 5
    assert per < 0.040, f"518 px heatmap PNG took {per * 1000:.1f} ms"


# ------------------------------------------------------------------ image input
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "TIFF"])
def test_decode_formats(fmt):
    img = noise(41, 23)
    out = decode_image(image_bytes(img, fmt), **LIMITS)
    assert out.image.mode == "RGB" and out.image.size == (41, 23) and out.format == fmt


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_decode_modes_to_rgb(mode):
    img = Image.new(mode, (9, 7))
    fmt = "TIFF" if mode in ("I;16", "CMYK") else "PNG"
    out = decode_image(image_bytes(img, fmt), **LIMITS)
    assert out.image.mode == "RGB" and out.image.size == (9, 7)


def test_decode_rejections():
    with pytest.raises(ImageRejected) as e:
        decode_image(b"definitely not an image", **LIMITS)
    assert e.value.status == 415
    jpeg = image_bytes(noise(200, 200), "JPEG", quality=90)
    with pytest.raises(ImageRejected) as e:
        decode_image(jpeg[: len(jpeg) // 2], **LIMITS)
    assert e.value.status == 415 and "truncated" in e.value.message
    with pytest.raises(ImageRejected) as e:  # GIF is an image, but not one we take
        decode_image(image_bytes(noise(8, 8), "GIF"), **LIMITS)
    assert e.value.status == 415
    with pytest.raises(ImageRejected) as e:
        decode_image(b"x" * 2_000_000, **LIMITS)
    assert e.value.status == 413
    # header-only bombs: refused from the header, in well under a second, nothing decoded
    for w, h in [(30000, 30000), (3000, 2000)]:
        t0 = time.perf_counter()
        with pytest.raises(ImageRejected) as e:
            decode_image(png_header_only(w, h), **LIMITS)
        assert e.value.status == 413 and time.perf_counter() - t0 < 0.5


def test_part_content_type():
    check_part_content_type("image/png")
    check_part_content_type("application/octet-stream")
    check_part_content_type(None)
    for bad in ("text/plain", "image/gif", "application/json"):
        with pytest.raises(ImageRejected) as e:
            check_part_content_type(bad)
        assert e.value.status == 415


def test_accept_negotiation():
    assert prefers_png("image/png")
    assert prefers_png("application/json;q=0.5, image/png")
    assert not prefers_png(None) and not prefers_png("*/*") and not prefers_png("application/json")
    assert not prefers_png("image/png;q=0.2, application/json")


# ------------------------------------------------------------------ job (de)serialisation
@pytest.mark.parametrize("raw_max", [10**9, 0])
def test_job_roundtrip(raw_max):
    img = noise(13, 11)
    job = Job(id="abc", class_name="screw", deadline=123.5, image=img)
    fields = encode_job(job, raw_max_bytes=raw_max, file_bytes=image_bytes(img))
    assert json.loads(fields["meta"])["enc"] == ("raw" if raw_max else "file")
    back = decode_job({k.encode(): v for k, v in fields.items()}, max_pixels=10**6)
    assert (back.id, back.class_name, back.deadline) == ("abc", "screw", 123.5)
    assert np.array_equal(np.asarray(back.load_image()), np.asarray(img))


def test_result_roundtrip_large_map_compressed():
    amap = np.zeros((700, 900), np.uint8)
    amap[100:200, 300:400] = 255
    res = JobResult(job_id="j", ok=True, score=0.25, class_label="object", anomaly_map=amap,
                    component_scores={"a": 0.5}, identity={"name": "x"}, batch_size=3)
    payload = encode_result(res)
    assert len(payload) < amap.nbytes / 10  # zlib on large maps
    back = decode_result(payload)
    assert np.array_equal(back.anomaly_map, amap) and back.score == 0.25 and back.batch_size == 3
    assert back.component_scores == {"a": 0.5} and back.identity == {"name": "x"}
