"""The runtime and precision that produced a result reach /ready and every /inspect answer."""

from __future__ import annotations

import pytest
from svc_helpers import app_client, files, image_bytes, noise, settings_for


@pytest.fixture(scope="module")
def openvino_detector(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from model.factory import BackboneSpec, DetectorConfig, build_detector

    return build_detector(DetectorConfig(
        detector="baseline", backbone=BackboneSpec("tiny-clip-random", "random"), device="cpu",
        runtime="openvino", runtime_cache_dir=tmp_path_factory.mktemp("ir"), threads=1,
    ))


async def test_inspect_and_ready_name_the_runtime(openvino_detector) -> None:  # type: ignore[no-untyped-def]
    async with app_client(settings_for(), detector=openvino_detector) as (_app, client):
        ready = (await client.get("/ready")).json()
        assert (ready["detector"]["runtime"], ready["detector"]["precision"]) == ("openvino", "fp32")
        data = image_bytes(noise(80, 60, seed=1))
        body = (await client.post("/inspect", files=files(data), params={"heatmap": "none"})).json()
        assert (body["detector"], body["runtime"], body["precision"]) == ("baseline", "openvino", "fp32")
        png = await client.post("/inspect", files=files(data), headers={"Accept": "image/png"})
        assert png.status_code == 200
        assert (png.headers["X-Anomaly-Runtime"], png.headers["X-Anomaly-Precision"]) == ("openvino", "fp32")


async def test_torch_detector_says_torch_fp32(tiny_detector) -> None:  # type: ignore[no-untyped-def]
    async with app_client(settings_for(), detector=tiny_detector) as (_app, client):
        body = (await client.post("/inspect", files=files(image_bytes(noise(40, 40))))).json()
    assert (body["runtime"], body["precision"]) == ("torch", "fp32")
