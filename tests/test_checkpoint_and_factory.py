"""Prompt checkpoints: round trip through the factory, refusal of malformed or mismatched files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.backbone import ClipBackbone
from model.checkpoint import backbone_metadata, read_checkpoint, save_checkpoint
from model.errors import CheckpointError, UnknownDetectorError
from model.factory import DetectorConfig, build_detector
from model.genclip import GenCLIP
from model.scorer_detector import ScorerDetector
from model.weights_source import BackboneSpec

TINY = BackboneSpec("tiny-clip-random", "random")


def _tiny_config(**kwargs: object) -> DetectorConfig:
    return DetectorConfig(backbone=TINY, device="cpu", **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def genclip_checkpoint(tmp_path: Path, tiny_backbone: ClipBackbone) -> tuple[Path, GenCLIP]:
    torch.manual_seed(3)
    model = GenCLIP(tiny_backbone, (1, 2, 3, 4), 64)
    metadata = {**model.checkpoint_metadata(), **backbone_metadata(tiny_backbone)}
    path = tmp_path / "genclip_test.safetensors"
    save_checkpoint(path, model.prompt_state_dict(), metadata)
    return path, model


def test_checkpoint_round_trip_gives_identical_results(
    genclip_checkpoint: tuple[Path, GenCLIP], random_images: list[Image.Image]
) -> None:
    path, model = genclip_checkpoint
    torch.manual_seed(0)  # the factory rebuilds the same random tiny backbone as the fixture
    detector = build_detector(_tiny_config(checkpoint=path))
    assert detector.identity.name == "genclip"
    assert detector.identity.checkpoint == read_checkpoint(path).digest
    original = ScorerDetector(model).inspect(random_images, ["bottle", None, "x"])
    loaded = detector.inspect(random_images, ["bottle", None, "x"])
    for a, b in zip(original, loaded):
        assert a.score == pytest.approx(b.score, abs=1e-6)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-6)


def test_auto_detector_is_baseline_without_checkpoint() -> None:
    detector = build_detector(_tiny_config())
    assert detector.identity.name == "baseline" and detector.identity.checkpoint is None


def test_auto_detector_is_genclip_with_checkpoint(genclip_checkpoint: tuple[Path, GenCLIP]) -> None:
    assert build_detector(_tiny_config(checkpoint=genclip_checkpoint[0])).identity.name == "genclip"


def test_genclip_without_checkpoint_is_refused() -> None:
    with pytest.raises(CheckpointError, match="GENCLIP_CHECKPOINT"):
        build_detector(_tiny_config(detector="genclip"))


def test_unknown_detector_is_refused() -> None:
    with pytest.raises(UnknownDetectorError, match="winclip"):
        build_detector(_tiny_config(detector="winclip"))


def test_missing_sidecar(genclip_checkpoint: tuple[Path, GenCLIP]) -> None:
    path, _ = genclip_checkpoint
    path.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match="sidecar"):
        build_detector(_tiny_config(checkpoint=path))


def test_garbage_tensor_file(genclip_checkpoint: tuple[Path, GenCLIP]) -> None:
    path, _ = genclip_checkpoint
    path.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        build_detector(_tiny_config(checkpoint=path))


def test_sidecar_not_json(genclip_checkpoint: tuple[Path, GenCLIP]) -> None:
    path, _ = genclip_checkpoint
    path.with_suffix(".json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        build_detector(_tiny_config(checkpoint=path))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("backbone", "ViT-L-14-336", "trained on backbone 'ViT-L-14-336'"),
        ("backbone_weights", "openai", "trained with backbone weights 'openai'"),
        ("pos_embed_resize", "bicubic-load-time", "pos_embed_resize"),
        ("detector", "vip2clip", "holds 'vip2clip' prompts"),
        ("layers", [6, 12, 18, 24], "do not exist"),
    ],
)
def test_sidecar_mismatch_is_refused(
    genclip_checkpoint: tuple[Path, GenCLIP], field: str, value: object, message: str
) -> None:
    path, _ = genclip_checkpoint
    sidecar = path.with_suffix(".json")
    data = json.loads(sidecar.read_text())
    data[field] = value
    sidecar.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=message):
        build_detector(_tiny_config(checkpoint=path))


def test_wrong_prompt_shapes_are_refused(genclip_checkpoint: tuple[Path, GenCLIP]) -> None:
    path, _ = genclip_checkpoint
    sidecar = path.with_suffix(".json")
    data = json.loads(sidecar.read_text())
    data["detector_config"]["query_tokens"] = 3  # the tensors hold 8
    sidecar.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="wrong shapes"):
        build_detector(_tiny_config(checkpoint=path))


def test_baseline_reports_the_name_it_used(random_images: list[Image.Image]) -> None:
    detector = build_detector(_tiny_config(detector="baseline"))
    results = detector.inspect(random_images, ["metal_nut", None, ""])
    assert [r.class_label for r in results] == ["metal nut", "object", "object"]
    assert all(r.anomaly_map.shape == (i.height, i.width) for r, i in zip(results, random_images))
    scorer = detector.scorer
    assert set(scorer._text_cache) == {"metal nut", "object"}  # text encoded once per name


def test_ensemble_reports_each_detector(tmp_path: Path, tiny_backbone: ClipBackbone, genclip_checkpoint: tuple[Path, GenCLIP], random_images: list[Image.Image]) -> None:
    from model.vip2clip import VIP2CLIP

    torch.manual_seed(4)
    vip = VIP2CLIP(tiny_backbone, (1, 2, 3, 4), 64)
    vip_path = tmp_path / "vip.safetensors"
    save_checkpoint(vip_path, vip.prompt_state_dict(), {**vip.checkpoint_metadata(), **backbone_metadata(tiny_backbone)})
    torch.manual_seed(0)
    detector = build_detector(_tiny_config(detector="ensemble", checkpoint=genclip_checkpoint[0], vip2clip_checkpoint=vip_path))
    results = detector.inspect(random_images[:2], ["bottle", None])
    for result in results:
        assert set(result.component_scores) == {"genclip", "vip2clip"}
        assert result.score == pytest.approx(np.mean(list(result.component_scores.values())), abs=1e-5)
    assert "+" in detector.identity.checkpoint


# ---------------------------------------------------------------------- sidecar format 2: whole config, strict


def _edit_sidecar(path: Path, edit) -> None:  # type: ignore[no-untyped-def]
    sidecar = path.with_suffix(".json")
    data = json.loads(sidecar.read_text())
    edit(data)
    sidecar.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["detector_config"].__setitem__("query_tokenz", 8), r"unknown keys \['query_tokenz'\]"),
        (lambda d: d["detector_config"].pop("enhanced_weight"), r"missing keys \['enhanced_weight'\]"),
        (lambda d: d["detector_config"].__setitem__("state_tokens", "4"), r"wrong types \[\"state_tokens='4'"),
        (lambda d: d["detector_config"].__setitem__("enhanced_weight", 2.0), r"enhanced_weight must be in \[0, 1\]"),
        (lambda d: d.__setitem__("profile", "vip2clip-official"), "sidecar says profile 'vip2clip-official'"),
        (lambda d: d.pop("detector_config"), r"lacks fields \['detector_config'\]"),
    ],
)
def test_sidecar_config_is_rebuilt_strictly(genclip_checkpoint: tuple[Path, GenCLIP], edit, message: str) -> None:
    path, _ = genclip_checkpoint
    _edit_sidecar(path, edit)
    with pytest.raises(CheckpointError, match=message):
        build_detector(_tiny_config(checkpoint=path))


def test_format_1_sidecar_is_refused_with_the_fix(genclip_checkpoint: tuple[Path, GenCLIP]) -> None:
    path, _ = genclip_checkpoint

    def to_format_1(data: dict) -> None:
        data["format_version"] = 1
        data["prompt_sizes"] = {"state_tokens": 4, "query_tokens": 8, "vision_tokens": 1}
        del data["detector_config"], data["profile"]

    _edit_sidecar(path, to_format_1)
    with pytest.raises(CheckpointError, match="format 1 .*Retrain it with `genclip train`"):
        build_detector(_tiny_config(checkpoint=path))


def test_checkpoint_holding_nan_is_refused(genclip_checkpoint: tuple[Path, GenCLIP]) -> None:
    from safetensors.torch import load_file, save_file

    path, _ = genclip_checkpoint
    tensors = load_file(str(path))
    tensors["query"][1, 2] = float("inf")
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"NaN or Inf in \['query'\]"):
        build_detector(_tiny_config(checkpoint=path))


def test_sidecar_records_the_whole_config_and_our_reading(genclip_checkpoint: tuple[Path, GenCLIP]) -> None:
    path, model = genclip_checkpoint
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["format_version"] == 2 and sidecar["profile"] == "genclip"
    assert sidecar["detector_config"] == dataclasses.asdict(model.config)
    assert set(sidecar["our_reading"]) >= {"token_counts", "fusion", "image_score"}
