"""The OpenVINO vision runtime: fp32 equal to torch, int8 close to fp32, the IR cache, clear errors.

Numbers here come from random backbones and synthetic textures: they check that the runtime
reproduces torch (fp32) and that int8 keeps the maps and the ranking, never model quality.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import pearsonr, spearmanr

from model.backbone import ClipBackbone, TorchVisionRuntime, load_backbone
from model.data.synthetic import DEFECT_TYPES, synthesize_sample
from model.errors import CalibrationDataError, RuntimeExportError, RuntimeNotInstalledError, VisionRuntimeError
from model.factory import DetectorConfig, build_detector, check_runtime
from model.runtime.calibration import read_calibration_folder, synthetic_calibration_images
from model.runtime.ir_cache import META_NAME, IrKey, weights_digest
from model.runtime.openvino_runtime import OpenVinoVisionRuntime, load_openvino_runtime
from model.scorer_detector import ScorerDetector
from model.scorer_registry import create_scorer
from model.weights_source import BackboneSpec

TINY = BackboneSpec("tiny-clip-random", "random")
TINY_LAYERS = (1, 2, 3, 4)
MAP_TOLERANCE = 1e-4
MIN_MAP_PEARSON = 0.99
MIN_SCORE_SPEARMAN = 0.98
CATEGORIES = ("carpet_like", "grid_like", "wood_like", "leather_like")


def synthetic_set(image_size: int, good_per_category: int = 2) -> list[Image.Image]:
    """Good and defective synthetic textures: per category ``good_per_category`` good + one per defect."""
    images = []
    for category in CATEGORIES:
        for index in range(good_per_category):
            images.append(Image.fromarray(synthesize_sample(category, "test/good", index, image_size)[1]))
        for defect in DEFECT_TYPES:
            images.append(Image.fromarray(synthesize_sample(category, defect, 0, image_size)[1]))
    return images


def maps_and_scores(detector: ScorerDetector, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """(n, H, W) maps and (n,) scores of ``images``, in batches of 8."""
    results = []
    for start in range(0, len(images), 8):
        results += detector.inspect(images[start : start + 8])
    return np.stack([result.anomaly_map for result in results]), np.array([result.score for result in results])


def assert_int8_close(fp32: tuple[np.ndarray, np.ndarray], int8: tuple[np.ndarray, np.ndarray]) -> None:
    """The targets: Pearson of the set's maps >= 0.99, Spearman of the image scores >= 0.98."""
    map_pearson = pearsonr(fp32[0].ravel(), int8[0].ravel())[0]
    score_spearman = spearmanr(fp32[1], int8[1])[0]
    assert map_pearson >= MIN_MAP_PEARSON, f"int8 map Pearson {map_pearson:.4f}"
    assert score_spearman >= MIN_SCORE_SPEARMAN, f"int8 score Spearman {score_spearman:.4f}"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("openvino_cache")


@pytest.fixture
def seeded_cache(backbone: ClipBackbone, cache_dir: Path, tmp_path: Path) -> Path:
    """A fresh cache folder holding a copy of the module's fp32 IR (64 px, all four layers)."""
    entry = load_openvino_runtime(backbone, 64, TINY_LAYERS, "fp32", cache_dir, threads=1).cache_entry
    seeded = tmp_path / "cache"
    shutil.copytree(entry, seeded / entry.name)
    return seeded


@pytest.fixture(scope="module")
def backbone() -> ClipBackbone:
    """A tiny backbone of this module's own (tests here swap its runtime)."""
    return load_backbone(TINY)


@pytest.fixture
def torch_runtime(backbone: ClipBackbone):  # type: ignore[no-untyped-def]
    """Puts the torch runtime back after a test that attached another one."""
    original = backbone.vision_runtime
    yield original
    backbone.set_vision_runtime(original)


def tiny_config(cache_dir: Path, **kwargs: object) -> DetectorConfig:
    return DetectorConfig(detector="baseline", backbone=TINY, device="cpu", runtime_cache_dir=cache_dir, threads=1,
                          **kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- accuracy


@pytest.fixture(scope="module")
def tiny_outputs(cache_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Maps and scores of the synthetic set from the factory's three settings, with their identities."""
    images = synthetic_set(64)
    outputs = {}
    for runtime, precision in (("torch", "fp32"), ("openvino", "fp32"), ("openvino", "int8")):
        detector = build_detector(tiny_config(cache_dir, runtime=runtime, precision=precision))
        assert (detector.identity.runtime, detector.identity.precision) == (runtime, precision)
        outputs[f"{runtime}-{precision}"] = maps_and_scores(detector, images)
    return outputs


def test_tiny_openvino_fp32_maps_equal_torch(tiny_outputs: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    torch_maps, torch_scores = tiny_outputs["torch-fp32"]
    ov_maps, ov_scores = tiny_outputs["openvino-fp32"]
    np.testing.assert_allclose(ov_maps, torch_maps, rtol=0, atol=MAP_TOLERANCE)
    np.testing.assert_allclose(ov_scores, torch_scores, rtol=0, atol=MAP_TOLERANCE)


def test_tiny_int8_keeps_maps_and_score_ranking(tiny_outputs: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    assert_int8_close(tiny_outputs["openvino-fp32"], tiny_outputs["openvino-int8"])
    assert not np.array_equal(tiny_outputs["openvino-fp32"][0], tiny_outputs["openvino-int8"][0])  # really int8


def test_serving_detector_frees_the_torch_vision_blocks(cache_dir: Path) -> None:
    """The factory's OpenVINO detector holds no torch copy of the vision blocks (they would only
    cost memory), keeps ln_post / proj for the post-processing, and still inspects."""
    detector = build_detector(tiny_config(cache_dir, runtime="openvino"))
    backbone = detector.scorer.backbone
    visual = backbone.clip.visual
    freed = [visual.conv1.weight, visual.class_embedding, visual.positional_embedding,
             *visual.ln_pre.parameters(), *visual.transformer.parameters()]
    assert freed and all(p.is_meta for p in freed)
    assert not visual.proj.is_meta and not any(p.is_meta for p in visual.ln_post.parameters())
    assert not any(p.is_meta for p in backbone.clip.transformer.parameters())  # the text tower stays
    assert (backbone.vision_width, backbone.num_blocks, backbone.patch_size) == (
        visual.conv1.out_channels, len(visual.transformer.resblocks), visual.patch_size[0])
    result = detector.inspect(synthetic_set(64, good_per_category=1)[:2])
    assert len(result) == 2 and all(np.isfinite(r.score) for r in result)
    with pytest.raises(RuntimeError, match="set another runtime first"):
        backbone.set_vision_runtime(TorchVisionRuntime(visual))
        backbone.release_torch_vision_blocks()


@pytest.mark.slow
def test_random_vit_b16_openvino_fp32_and_int8(tmp_path: Path) -> None:
    """A real architecture (ViT-B-16, random weights), baseline detector; 112 px (7x7 grid) keeps it cheap."""
    vit = load_backbone(BackboneSpec("ViT-B-16", "random", quick_gelu=True))
    scorer = create_scorer("baseline", vit, (3, 6, 9, 12), 112)
    images = synthetic_set(112, good_per_category=1)
    reference = maps_and_scores(ScorerDetector(scorer), images)  # torch fp32; also caches the prompt texts
    outputs = {}
    for precision in ("fp32", "int8"):
        # default calibration (16 synthetic textures); 8 measured too few here (Spearman 0.976)
        runtime = load_openvino_runtime(vit, 112, scorer.layers, precision, tmp_path, threads=2)
        vit.set_vision_runtime(runtime)
        detector = ScorerDetector(scorer)
        assert (detector.identity.runtime, detector.identity.precision) == ("openvino", precision)
        outputs[precision] = maps_and_scores(detector, images)
    np.testing.assert_allclose(outputs["fp32"][0], reference[0], rtol=0, atol=MAP_TOLERANCE)
    np.testing.assert_allclose(outputs["fp32"][1], reference[1], rtol=0, atol=MAP_TOLERANCE)
    assert_int8_close(outputs["fp32"], outputs["int8"])


def test_features_and_final_class_token_match_torch(backbone: ClipBackbone, torch_runtime: TorchVisionRuntime,
                                                    cache_dir: Path) -> None:
    pixels = backbone.preprocess(synthetic_set(64)[:3], 64)
    expected = backbone.encode_image(pixels, [2, 4])
    backbone.set_vision_runtime(load_openvino_runtime(backbone, 64, TINY_LAYERS, "fp32", cache_dir, threads=1))
    got = backbone.encode_image(pixels, [2, 4])
    assert got.layers == expected.layers == (2, 4) and got.grid == expected.grid
    for a, b in zip(got.patch_tokens + got.layer_class_tokens, expected.patch_tokens + expected.layer_class_tokens):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.final_class_token, expected.final_class_token, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.global_embedding, expected.global_embedding, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- the IR cache


def test_second_load_comes_from_the_cache(backbone: ClipBackbone, cache_dir: Path) -> None:
    first = load_openvino_runtime(backbone, 64, TINY_LAYERS, "fp32", cache_dir, threads=1)
    second = load_openvino_runtime(backbone, 64, TINY_LAYERS, "fp32", cache_dir, threads=1)
    assert not second.built and first.cache_entry == second.cache_entry
    meta = json.loads((second.cache_entry / META_NAME).read_text())
    assert meta["key"]["image_size"] == 64 and meta["key"]["layers"] == list(TINY_LAYERS)
    assert meta["key"]["weights_digest"] == weights_digest(backbone.clip.visual)
    pixels = torch.randn(2, 3, 64, 64)
    for a, b in zip(first.hidden_states(pixels, TINY_LAYERS)[0], second.hidden_states(pixels, TINY_LAYERS)[0]):
        assert torch.equal(a, b)


def test_changing_resolution_layers_or_precision_builds_a_new_ir(backbone: ClipBackbone, seeded_cache: Path) -> None:
    base = load_openvino_runtime(backbone, 64, TINY_LAYERS, "fp32", seeded_cache, threads=1)
    other_size = load_openvino_runtime(backbone, 96, TINY_LAYERS, "fp32", seeded_cache, threads=1)
    other_layers = load_openvino_runtime(backbone, 64, (2, 4), "fp32", seeded_cache, threads=1)
    int8 = load_openvino_runtime(backbone, 64, TINY_LAYERS, "int8", seeded_cache, calibration_size=4, threads=1)
    assert not base.built and other_size.built and other_layers.built and int8.built
    entries = {base.cache_entry, other_size.cache_entry, other_layers.cache_entry, int8.cache_entry}
    assert len(entries) == 4
    assert other_size.hidden_states(torch.zeros(1, 3, 96, 96), TINY_LAYERS)[0][0].shape == (1, 1 + 12 * 12, 128)
    # the runtime only serves what it was exported for
    with pytest.raises(ValueError, match="runs at 64 px"):
        other_layers.hidden_states(torch.zeros(1, 3, 96, 96), (2, 4))
    with pytest.raises(ValueError, match=r"taps layers \[2, 4\], not \[3\]"):
        other_layers.hidden_states(torch.zeros(1, 3, 64, 64), (3,))
    # int8 reused the cached fp32 IR (no second fp32 entry) and recorded its calibration
    assert sorted(path.name.split("-")[-2] for path in seeded_cache.iterdir() if path.is_dir()) == [
        "fp32", "fp32", "fp32", "int8"
    ]
    meta = json.loads((int8.cache_entry / META_NAME).read_text())
    assert meta["calibration_images"] == 4 and meta["calibration_source"] == "synthetic"


def test_new_weights_give_a_new_key(backbone: ClipBackbone) -> None:
    other = load_backbone(TINY)
    assert weights_digest(other.clip.visual) == weights_digest(backbone.clip.visual)  # same seed, same weights
    with torch.no_grad():
        other.clip.visual.transformer.resblocks[2].mlp.c_fc.weight[0, 0] += 1e-3
    assert weights_digest(other.clip.visual) != weights_digest(backbone.clip.visual)
    key = IrKey("tiny-clip-random", weights_digest(backbone.clip.visual), True, 64, TINY_LAYERS, "fp32")
    changed = IrKey("tiny-clip-random", weights_digest(other.clip.visual), True, 64, TINY_LAYERS, "fp32")
    assert key.entry_name != changed.entry_name


def _edit_meta_size(entry: Path) -> None:
    meta = json.loads((entry / META_NAME).read_text())
    meta["key"]["image_size"] = 96
    (entry / META_NAME).write_text(json.dumps(meta))


def _flip_bin_byte(entry: Path) -> None:
    data = bytearray((entry / "vision.bin").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (entry / "vision.bin").write_bytes(bytes(data))


@pytest.mark.parametrize(
    "tamper,reason",
    [
        (_edit_meta_size, "key differs in image_size (cached 96, wanted 64)"),
        (_flip_bin_byte, "vision.bin changed since it was written"),
        (lambda entry: (entry / META_NAME).write_text("{"), "meta.json unreadable"),
    ],
    ids=["meta-key", "weights-file", "corrupt-meta"],
)
def test_a_cached_ir_that_does_not_match_is_rebuilt(
    backbone: ClipBackbone, seeded_cache: Path, caplog: pytest.LogCaptureFixture, tamper, reason: str  # type: ignore[no-untyped-def]
) -> None:
    first = load_openvino_runtime(backbone, 64, TINY_LAYERS, "fp32", seeded_cache, threads=1)
    assert not first.built
    pixels = torch.randn(1, 3, 64, 64)
    expected = first.hidden_states(pixels, TINY_LAYERS)[0]
    tamper(first.cache_entry)
    with caplog.at_level(logging.WARNING, logger="model.runtime.ir_cache"):
        rebuilt = load_openvino_runtime(backbone, 64, TINY_LAYERS, "fp32", seeded_cache, threads=1)
    assert rebuilt.built, "the mismatching entry should have been rebuilt"
    assert any("does not match" in record.message and reason in record.message for record in caplog.records), caplog.text
    for a, b in zip(rebuilt.hidden_states(pixels, TINY_LAYERS)[0], expected):
        assert torch.equal(a, b)
    assert not load_openvino_runtime(backbone, 64, TINY_LAYERS, "fp32", seeded_cache, threads=1).built


def test_unwritable_cache_folder_is_a_clear_error(backbone: ClipBackbone, tmp_path: Path) -> None:
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder should be")
    with pytest.raises(RuntimeExportError, match="GENCLIP_OPENVINO_CACHE_DIR"):
        load_openvino_runtime(backbone, 64, TINY_LAYERS, "fp32", not_a_folder, threads=1)


# ----------------------------------------------------------------------------- calibration


def test_calibration_hook_takes_pil_images(backbone: ClipBackbone, cache_dir: Path) -> None:
    photos = [Image.fromarray(synthesize_sample("wood_like", "train/good", index, 80)[1]) for index in range(3)]
    given = load_openvino_runtime(backbone, 64, TINY_LAYERS, "int8", cache_dir, calibration_images=photos, threads=1)
    synthetic = load_openvino_runtime(backbone, 64, TINY_LAYERS, "int8", cache_dir, calibration_size=3, threads=1)
    assert given.cache_entry != synthetic.cache_entry  # the calibration set is part of the key
    meta = json.loads((given.cache_entry / META_NAME).read_text())
    assert meta["calibration_images"] == 3 and meta["calibration_source"] == "given"
    again = load_openvino_runtime(backbone, 64, TINY_LAYERS, "int8", cache_dir, calibration_images=photos, threads=1)
    assert not again.built and again.cache_entry == given.cache_entry


def test_calibration_folder_is_read_recursively_and_spread(tmp_path: Path) -> None:
    for index in range(10):
        folder = tmp_path / ("good" if index < 6 else "more")
        folder.mkdir(exist_ok=True)
        Image.new("RGB", (20, 10), (index * 20, 0, 0)).save(folder / f"{index:02d}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    images = read_calibration_folder(tmp_path, limit=5)
    assert [image.getpixel((0, 0))[0] for image in images] == [0, 40, 80, 120, 160]
    assert len(read_calibration_folder(tmp_path, limit=50)) == 10


def test_calibration_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(CalibrationDataError, match="not found"):
        read_calibration_folder(tmp_path / "missing")
    with pytest.raises(CalibrationDataError, match="no image"):
        read_calibration_folder(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(CalibrationDataError, match="broken.png"):
        read_calibration_folder(tmp_path)


def test_factory_calibrates_on_the_configured_folder(tmp_path: Path, cache_dir: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for index in range(3):
        Image.fromarray(synthesize_sample("grid_like", "train/good", index, 64)[1]).save(folder / f"{index}.png")
    detector = build_detector(
        tiny_config(cache_dir, runtime="openvino", precision="int8", calibration_images=folder)
    )
    runtime = detector.scorer.backbone.vision_runtime
    assert isinstance(runtime, OpenVinoVisionRuntime) and runtime.precision == "int8"
    meta = json.loads((runtime.cache_entry / META_NAME).read_text())
    assert meta["calibration_images"] == 3 and meta["calibration_source"] == "given"


def test_synthetic_calibration_mixes_good_and_defective_textures() -> None:
    images = synthetic_calibration_images(8, 48)
    assert len(images) == 8 and all(image.size == (48, 48) for image in images)
    assert len({image.tobytes() for image in images}) == 8
    assert [image.tobytes() for image in synthetic_calibration_images(8, 48)] == [image.tobytes() for image in images]


# ----------------------------------------------------------------------------- configuration errors


def test_missing_openvino_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    with pytest.raises(RuntimeNotInstalledError, match=r"pip install 'genclip-inspect\[openvino\]'"):
        build_detector(tiny_config(tmp_path, runtime="openvino"))


def test_missing_nncf_is_named_for_int8(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(RuntimeNotInstalledError, match=r"needs nncf.*genclip-inspect\[openvino\]"):
        build_detector(tiny_config(tmp_path, runtime="openvino", precision="int8"))


def test_a_cached_int8_ir_serves_without_nncf(
    backbone: ClipBackbone, cache_dir: Path, tiny_outputs: dict, monkeypatch: pytest.MonkeyPatch  # type: ignore[type-arg]
) -> None:
    monkeypatch.setitem(sys.modules, "nncf", None)  # built by tiny_outputs; NNCF only quantizes
    runtime = load_openvino_runtime(backbone, 64, TINY_LAYERS, "int8", cache_dir, threads=1)
    assert not runtime.built and runtime.precision == "int8"


def test_export_failure_is_a_clear_error(backbone: ClipBackbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_export(*args: object, **kwargs: object) -> None:
        raise RuntimeError("data-dependent control flow is not supported")

    monkeypatch.setattr(torch.export, "export", failing_export)
    with pytest.raises(RuntimeExportError, match="Exporting the tiny-clip-random vision tower .* failed.*GENCLIP_RUNTIME=torch"):
        load_openvino_runtime(backbone, 64, TINY_LAYERS, "fp32", tmp_path, threads=1)
    assert not any(path.is_dir() for path in tmp_path.iterdir())  # nothing half-written in the cache


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"precision": "int8"}, "GENCLIP_PRECISION=int8 needs GENCLIP_RUNTIME=openvino"),
        ({"runtime": "openvino", "device": "cuda"}, "runs on the CPU"),
        ({"runtime": "tensorrt"}, "Unknown runtime"),
        ({"runtime": "openvino", "precision": "int4"}, "Unknown precision"),
    ],
)
def test_impossible_runtime_settings_are_refused(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(VisionRuntimeError, match=message):
        check_runtime(DetectorConfig(**kwargs))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- commands


@pytest.mark.parametrize("command", [["predict", "x.png"], ["evaluate", "--data", "synthetic", "--root", "r"],
                                     ["worker"], ["serve"]])
def test_model_commands_take_runtime_flags(command: list[str], tmp_path: Path) -> None:
    from service.cli import build_parser
    from service.cli_settings import settings_from_args

    args = build_parser().parse_args([
        *command, "--runtime", "openvino", "--precision", "int8", "--openvino-cache-dir", str(tmp_path / "ir"),
        "--calibration-images", str(tmp_path / "good"), "--calibration-size", "5", "--torch-threads", "1",
    ])
    config = settings_from_args(args).detector_config()
    assert (config.runtime, config.precision, config.calibration_size, config.threads) == ("openvino", "int8", 5, 1)
    assert config.runtime_cache_dir == tmp_path / "ir" and config.calibration_images == tmp_path / "good"


def test_predict_reports_the_openvino_int8_runtime(cache_dir: Path, tmp_path: Path) -> None:
    from service.cli import main

    image_path = tmp_path / "part.png"
    Image.fromarray(synthesize_sample("wood_like", "scratch", 0, 90)[1]).save(image_path)
    code = main(["predict", str(image_path), "--out", str(tmp_path / "out"), "--backbone", "tiny-clip-random",
                 "--backbone-weights", "random", "--detector", "baseline", "--runtime", "openvino",
                 "--precision", "int8", "--openvino-cache-dir", str(cache_dir), "--torch-threads", "1"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert (report["detector"]["runtime"], report["detector"]["precision"]) == ("openvino", "int8")
    assert 0.0 <= report["predictions"][0]["score"] <= 1.0


def test_predict_without_openvino_stops_with_the_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from service.cli import main

    monkeypatch.setitem(sys.modules, "openvino", None)
    image_path = tmp_path / "part.png"
    Image.new("RGB", (32, 32)).save(image_path)
    code = main(["predict", str(image_path), "--out", str(tmp_path / "out"), "--backbone", "tiny-clip-random",
                 "--backbone-weights", "random", "--runtime", "openvino"])
    assert code == 2
    assert "pip install 'genclip-inspect[openvino]'" in capsys.readouterr().err


def test_bench_model_runs_the_runtime_comparison(tmp_path: Path) -> None:
    """``python bench/bench_model.py --runtime openvino`` (the issue's command) runs end to end."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "bench/bench_model.py", "--runtime", "openvino", "--precision", "int8",
         "--backbone", TINY.model_name, "--image-size", "64", "--batches", "1", "--repeats", "1",
         "--no-serving-rss", "--cache-dir", str(tmp_path / "ir"), "--json", str(tmp_path / "r.json")],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "openvino-int8" in result.stdout and "Pearson" in result.stdout
    assert (tmp_path / "r.json").exists()
