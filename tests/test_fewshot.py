"""Few-shot reference: bank bytes, identity checks, coreset, maps, fusion, mixed batches, build.

Everything runs on the tiny random backbone at 64 px (8 x 8 patch grid): plumbing checks,
never quality claims (see tests/test_fewshot_measured.py for the measured check).
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, replace
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as save_safetensors

from model.anomaly_maps import finalize_maps
from model.backbone import ClipBackbone
from model.detector import DetectorIdentity, FewShotReference
from model.ensemble import EnsembleScorer
from model.fewshot import (
    CalibrationReport,
    ReferenceBank,
    ReferenceConfig,
    ReferenceError,
    ReferenceMismatchError,
    bank_identity,
    build_bank,
    calibrate_threshold,
    few_shot_coarse_map,
    greedy_coreset,
    quantile_summary,
)
from model.fewshot.calibration import tolerance_factor
from model.scorer_detector import ScorerDetector
from model.scorer_registry import create_scorer

SIZE = 64
LAYERS = (1, 2, 3, 4)


pytestmark = pytest.mark.usefixtures("single_thread")


def _texture(seed: int, size: int = 96) -> Image.Image:
    """Smooth random colour texture (a 'good part'); different seeds are different parts."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((6, 6, 3)).astype(np.float32)
    base = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC))
    noise = rng.integers(-12, 12, (size, size, 3))
    return Image.fromarray(np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8))


def _with_defect(image: Image.Image) -> Image.Image:
    array = np.asarray(image).copy()
    array[30:50, 20:44] = (250, 10, 200)
    return Image.fromarray(array)


@pytest.fixture(scope="module")
def baseline(tiny_backbone: ClipBackbone) -> ScorerDetector:
    return ScorerDetector(create_scorer("baseline", tiny_backbone, LAYERS, SIZE))


@pytest.fixture(scope="module")
def good_images() -> list[Image.Image]:
    return [_texture(seed) for seed in range(6)]


@pytest.fixture(scope="module")
def built(baseline: ScorerDetector, good_images: list[Image.Image]):
    return baseline.build_reference(good_images, ["tile"] * len(good_images))


def _unit_tokens(images: int, patches: int, width: int = 16, layers: int = 2, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.nn.functional.normalize(torch.randn(images, patches, width, generator=generator), dim=-1)
        for _ in range(layers)
    ]


IDENTITY = {"name": "baseline", "backbone": "tiny-clip-random", "backbone_weights": "random",
            "image_size": 64, "layers": [2, 4], "checkpoint": None}


# ---------------------------------------------------------------------- bank bytes


def test_bank_round_trip_through_bytes() -> None:
    bank = build_bank(_unit_tokens(3, 10), (2, 4), IDENTITY, max_patches_per_layer=100)
    data = bank.to_bytes()
    again = ReferenceBank.from_bytes(data)
    assert again.layers == (2, 4) and again.image_count == 3 and again.identity == IDENTITY
    for before, after in zip(bank.patches + bank.sources, again.patches + again.sources):
        assert before.dtype == after.dtype and torch.equal(before, after)
    assert again.patches[0].dtype == torch.float16 and again.sources[0].dtype == torch.int32
    assert bank.nbytes == 2 * (30 * 16 * 2 + 30 * 4)


def _tampered(bank: ReferenceBank, **tensors: torch.Tensor) -> bytes:
    """Bank bytes with some tensors replaced (metadata kept)."""
    named = {f"patches.{layer}": p for layer, p in zip(bank.layers, bank.patches)}
    named.update({f"sources.{layer}": s for layer, s in zip(bank.layers, bank.sources)})
    named.update({key.replace("_", "."): value for key, value in tensors.items()})
    named = {key: value for key, value in named.items() if value is not None}
    metadata = {"format": "genclip-reference-bank", "format_version": "1", "layers": "[2, 4]",
                "image_count": "3", "identity": json.dumps(IDENTITY)}
    return save_safetensors(named, metadata=metadata)


def test_malformed_bytes_are_refused() -> None:
    bank = build_bank(_unit_tokens(3, 10), (2, 4), IDENTITY, max_patches_per_layer=100)
    good = bank.to_bytes()
    header_length = struct.unpack("<Q", good[:8])[0]
    cases = {
        "empty": b"",
        "garbage": b"not a bank at all, just text",
        "truncated": good[: len(good) // 2],
        "header only": good[: 8 + header_length],
        "huge header length": struct.pack("<Q", 1 << 40) + good[8:],
        "no metadata": save_safetensors({"x": torch.zeros(2)}),
        "other format": save_safetensors({"x": torch.zeros(2)}, metadata={"format": "something-else"}),
        "future version": good.replace(b'"format_version":"1"', b'"format_version":"9"'),
        "float32 patches": _tampered(bank, patches_2=bank.patches[0].float()),
        "not unit norm": _tampered(bank, patches_2=bank.patches[0] * 2),
        "source out of range": _tampered(bank, sources_4=torch.full_like(bank.sources[1], 7)),
        "missing tensor": _tampered(bank, sources_4=None),
        "extra tensor": _tampered(bank, **{"patches_9": bank.patches[0].clone()}),
        "length mismatch": _tampered(bank, sources_2=bank.sources[0][:-1]),
    }
    assert cases["future version"] != good
    for name, data in cases.items():
        with pytest.raises(ReferenceError):
            ReferenceBank.from_bytes(data)
            pytest.fail(f"{name} was accepted")
    assert ReferenceBank.from_bytes(good).image_count == 3


@dataclass(frozen=True)
class _IdentityWithRuntime(DetectorIdentity):
    """An identity with the runtime / precision fields another branch adds: they must not matter."""

    runtime: str = "openvino"
    precision: str = "int8"


def test_mismatch_errors_name_each_difference() -> None:
    bank = build_bank(_unit_tokens(3, 10), (2, 4), IDENTITY, max_patches_per_layer=100)
    running = DetectorIdentity("baseline", "tiny-clip-random", "random", (2, 4), 64, None)
    bank.check_compatible(running)
    bank.check_compatible(_IdentityWithRuntime(**asdict(running)))  # runtime / precision ignored
    changes = {
        "detector": replace(running, name="genclip"),
        "backbone": replace(running, backbone="ViT-B-16"),
        "backbone_weights": replace(running, backbone_weights="openai"),
        "image_size": replace(running, image_size=96),
        "layers": replace(running, layers=(1, 2)),
        "checkpoint": replace(running, checkpoint="ab" * 32),
    }
    for word, identity in changes.items():
        with pytest.raises(ReferenceMismatchError, match=rf"(: |; ){word} ") as caught:
            bank.check_compatible(identity)
        assert str(caught.value).count("running") == 1, caught.value
    with pytest.raises(ReferenceMismatchError) as caught:
        bank.check_compatible(replace(running, backbone="ViT-L-14-336", image_size=518))
    message = str(caught.value)
    assert "backbone 'tiny-clip-random' (running 'ViT-L-14-336')" in message
    assert "image_size 64 (running 518)" in message and message.count("(running") == 2


def test_mismatched_bank_is_refused_before_any_work(baseline: ScorerDetector, built, good_images) -> None:
    other = ReferenceBank.from_bytes(built.bank.to_bytes())
    other.identity["image_size"] = 96
    encode = mock.patch.object(baseline.scorer.backbone, "encode_image", side_effect=AssertionError("vision ran"))
    with encode, pytest.raises(ReferenceMismatchError, match="image_size 96"):
        baseline.inspect(good_images[:2], None, [FewShotReference(built.bank), FewShotReference(other)])


# ---------------------------------------------------------------------- coreset


def test_coreset_cap_is_respected_and_deterministic() -> None:
    tokens = _unit_tokens(5, 40, width=32, layers=2)
    first = build_bank(tokens, (2, 4), IDENTITY, max_patches_per_layer=25, seed=3)
    second = build_bank(tokens, (2, 4), IDENTITY, max_patches_per_layer=25, seed=3)
    third = build_bank(tokens, (2, 4), IDENTITY, max_patches_per_layer=25, seed=4)
    assert first.patches_per_layer == [25, 25]
    assert all(torch.equal(a, b) for a, b in zip(first.patches + first.sources, second.patches + second.sources))
    assert not torch.equal(first.patches[0], third.patches[0])
    full = build_bank(tokens, (2, 4), IDENTITY, max_patches_per_layer=10_000)
    assert full.patches_per_layer == [200, 200]
    assert torch.equal(full.sources[0], torch.arange(5, dtype=torch.int32).repeat_interleave(40))


@pytest.mark.parametrize("half_search", [False, True], ids=["float32-search", "float16-search"])
def test_greedy_coreset_covers_better_than_random_and_never_repeats(half_search: bool, monkeypatch) -> None:
    if half_search:  # the path large CPU searches take (ViT-L banks), forced on a small input
        monkeypatch.setattr("model.fewshot.coreset._HALF_SEARCH_BYTES", 0)
    generator = torch.Generator().manual_seed(0)
    # Clustered points: greedy k-center must reach every cluster, a random pick misses small ones.
    centres = torch.nn.functional.normalize(torch.randn(20, 64, generator=generator), dim=-1)
    sizes = torch.tensor([200] + [5] * 19)
    points = torch.cat([c + 0.05 * torch.randn(int(n), 64, generator=generator) for c, n in zip(centres, sizes)])
    chosen = greedy_coreset(points, 30, seed=0)
    assert len(set(chosen.tolist())) == 30 and torch.equal(chosen, chosen.sort().values)
    random_pick = torch.randperm(points.shape[0], generator=generator)[:30]

    def covering_radius(indices: torch.Tensor) -> float:
        return float(torch.cdist(points, points[indices]).amin(dim=1).max())

    assert covering_radius(chosen) < 0.5 * covering_radius(random_pick)
    duplicates = torch.ones(50, 8)
    assert sorted(greedy_coreset(duplicates, 10).tolist()) == sorted(set(greedy_coreset(duplicates, 10).tolist()))


# ---------------------------------------------------------------------- maps and fusion


def test_few_shot_map_is_zero_where_the_image_is_in_the_bank(baseline: ScorerDetector, built, good_images) -> None:
    features = baseline.scorer.backbone.encode_image(
        baseline.scorer.backbone.preprocess(good_images[:2], SIZE), baseline.scorer.layers
    )
    few = baseline.few_shot_maps(features, built.bank)
    assert few.shape == (2, SIZE, SIZE)
    assert float(few.max()) < 2e-3  # every patch has itself (float16-rounded) in the bank
    stranger = baseline.scorer.backbone.encode_image(
        baseline.scorer.backbone.preprocess([_with_defect(good_images[0])], SIZE), baseline.scorer.layers
    )
    assert float(baseline.few_shot_maps(stranger, built.bank).max()) > 0.02


def test_few_shot_coarse_map_formula() -> None:
    bank = [torch.tensor([[1.0, 0.0], [0.0, 1.0]])]
    tokens = [torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.6, -0.8], [0.0, -1.0]]])]  # (1, 4, 2)
    coarse = few_shot_coarse_map(tokens, bank, (2, 2))
    # max cosines 1, 0, 0.6, 0  ->  (1 - c) / 2
    torch.testing.assert_close(coarse, torch.tensor([[[0.0, 0.5], [0.2, 0.5]]]))
    excluded = [torch.tensor([True, False])]
    torch.testing.assert_close(few_shot_coarse_map(tokens, bank, (2, 2), excluded), torch.tensor([[[0.5, 0.5], [0.9, 1.0]]]))
    everything = [torch.tensor([True, True])]
    torch.testing.assert_close(few_shot_coarse_map(tokens, bank, (2, 2), everything), torch.ones(1, 2, 2))


def test_fused_output_is_the_weighted_mean(baseline: ScorerDetector, built) -> None:
    image = [_with_defect(_texture(100))]
    zero = baseline.inspect(image, ["tile"])[0]
    few = baseline.inspect(image, ["tile"], [FewShotReference(built.bank, 1.0)])[0]
    fused = baseline.inspect(image, ["tile"], [FewShotReference(built.bank, 0.3)])[0]
    np.testing.assert_allclose(fused.anomaly_map, 0.7 * zero.anomaly_map + 0.3 * few.anomaly_map, atol=1e-5)
    assert fused.score == pytest.approx(0.7 * zero.score + 0.3 * few.score, abs=1e-6)
    assert fused.component_scores == {"zero_shot": pytest.approx(zero.score, abs=1e-6),
                                      "few_shot": pytest.approx(few.score, abs=1e-6)}
    # few-shot score = peak of the map at the model input size; the bilinear resize to the
    # image's own size can only lower the peak
    assert float(few.anomaly_map.max()) - 1e-6 <= few.score <= float(few.anomaly_map.max()) + 0.01
    assert zero.component_scores == {}
    with pytest.raises(ValueError):
        FewShotReference(built.bank, 1.5)


def test_mixed_batch_equals_one_by_one(baseline: ScorerDetector, built, good_images) -> None:
    second = baseline.build_reference([_texture(seed) for seed in range(20, 24)])
    images = [_with_defect(_texture(101)), _texture(102), _texture(103).resize((80, 50)), _with_defect(_texture(104))]
    names = ["tile", None, "tile", "screw"]
    refs = [FewShotReference(built.bank), None, FewShotReference(second.bank, 0.8), FewShotReference(built.bank, 0.2)]
    together = baseline.inspect(images, names, refs)
    for image, name, ref, result in zip(images, names, refs, together):
        alone = baseline.inspect([image], [name], [ref] if ref is not None else None)[0]
        assert result.anomaly_map.shape == (image.height, image.width)
        np.testing.assert_allclose(result.anomaly_map, alone.anomaly_map, atol=1e-5)
        assert result.score == pytest.approx(alone.score, abs=1e-5)
        assert result.component_scores.keys() == alone.component_scores.keys()
    assert together[1].component_scores == {}


@pytest.mark.parametrize("detector", ["baseline", "genclip", "vip2clip", "ensemble"])
def test_reference_works_on_every_detector(tiny_backbone: ClipBackbone, detector: str, good_images) -> None:
    torch.manual_seed(0)  # untrained prompts: plumbing only
    if detector == "ensemble":
        scorer = EnsembleScorer([create_scorer(name, tiny_backbone, LAYERS, SIZE) for name in ("genclip", "vip2clip")])
        expected_sigma = 6.0
    else:
        scorer = create_scorer(detector, tiny_backbone, (2, 4) if detector == "baseline" else LAYERS, SIZE)
        expected_sigma = {"baseline": 4.0, "genclip": 4.0, "vip2clip": 8.0}[detector]
    assert scorer.smoothing_sigma == expected_sigma
    wrapped = ScorerDetector(scorer, None if detector == "baseline" else "digest")
    progress: list[tuple[int, int]] = []
    build = wrapped.build_reference(good_images * 2, config=ReferenceConfig(max_patches_per_layer=300),
                                    progress=lambda done, total: progress.append((done, total)))
    assert progress == [(8, 12), (12, 12)]
    assert build.bank.layers == scorer.layers and build.bank.identity == bank_identity(wrapped.identity)
    assert build.bank.patches_per_layer == [300] * len(scorer.layers)
    result = wrapped.inspect([_with_defect(_texture(5))], ["tile"], [FewShotReference(build.bank)])[0]
    expected_keys = {"zero_shot", "few_shot"} | ({"genclip", "vip2clip"} if detector == "ensemble" else set())
    assert set(result.component_scores) == expected_keys
    assert 0.0 <= result.score <= 1.0 and 0.0 <= result.anomaly_map.min() <= result.anomaly_map.max() <= 1.0


def test_few_shot_map_is_smoothed_like_the_zero_shot_map(baseline: ScorerDetector, built) -> None:
    pixels = baseline.scorer.backbone.preprocess([_texture(7)], SIZE)
    features = baseline.scorer.backbone.encode_image(pixels, baseline.scorer.layers)
    coarse = few_shot_coarse_map(
        [t.float() for t in features.select(built.bank.layers).patch_tokens],
        built.bank.patches_on(torch.device("cpu"), torch.float32),
        features.grid,
    )
    torch.testing.assert_close(baseline.few_shot_maps(features, built.bank), finalize_maps(coarse, SIZE, 4.0))


# ---------------------------------------------------------------------- build and report


def test_build_report_is_consistent_and_json_able(built, good_images) -> None:
    report = built.report
    assert report.image_count == len(good_images) == len(report.leave_one_out_scores)
    assert report.rule == "small-sample" and report.false_reject_rate_target == 0.01
    assert report.image_threshold >= max(report.leave_one_out_scores)
    assert report.pixel_threshold >= max(report.leave_one_out_pixel_maxima)
    assert set(report.score_quantiles) == {"min", "p50", "p90", "p95", "p99", "max"}
    assert report.score_quantiles["max"] == pytest.approx(max(report.leave_one_out_scores))
    assert report.pixel_quantiles["min"] == pytest.approx(min(report.leave_one_out_pixel_maxima))
    assert report.bank_bytes == built.bank.nbytes and report.bank_patches_per_layer == built.bank.patches_per_layer
    assert 0.0 < report.estimated_false_reject_rate <= 0.01 + 1e-9 and report.estimate_method
    data = json.loads(json.dumps(report.as_dict()))
    assert CalibrationReport.from_dict({**data, "added_later": 1}) == report


def test_leave_one_out_excludes_the_image_itself(baseline: ScorerDetector, good_images) -> None:
    """A good image scored with itself in the bank would get a ~0 few-shot map; leave-one-out
    must score it as a new image: the same as a bank built from the other images alone."""
    config = ReferenceConfig(max_patches_per_layer=10_000, fusion_weight=1.0)
    build = baseline.build_reference(good_images, config=config)
    without_first = baseline.build_reference(good_images[1:], config=config)
    alone = baseline.inspect([good_images[0]], None, [FewShotReference(without_first.bank, 1.0)])[0]
    assert build.report.leave_one_out_scores[0] == pytest.approx(alone.score, abs=2e-3)
    assert build.report.leave_one_out_scores[0] > 0.01


def test_too_few_images_and_bad_configs_are_refused(baseline: ScorerDetector, good_images) -> None:
    with pytest.raises(ReferenceError, match="at least 2"):
        baseline.build_reference(good_images[:1])
    with pytest.raises(ValueError):
        baseline.build_reference(good_images[:2], ["a"])
    for bad in ({"fusion_weight": 1.5}, {"false_reject_rate": 0.0}, {"max_patches_per_layer": 0}):
        with pytest.raises(ValueError):
            ReferenceConfig(**bad)


# ---------------------------------------------------------------------- calibration rules


def test_quantile_rule_takes_the_conformal_order_statistic() -> None:
    values = np.random.default_rng(0).permutation(np.arange(1, 200) / 200.0)  # 199 values 0.005..0.995
    result = calibrate_threshold(values, 0.01)
    # k = ceil(200 * 0.99) = 198 -> the 198th smallest = 0.99; rate (199 + 1 - 198) / 200
    assert result.rule == "quantile"
    assert result.threshold == pytest.approx(0.99)
    assert result.estimated_false_reject_rate == pytest.approx(0.01)
    at_99 = calibrate_threshold(np.arange(1, 100) / 100.0, 0.01)  # n = 99: k = 99, the largest
    assert at_99.rule == "quantile" and at_99.threshold == pytest.approx(0.99)
    assert at_99.estimated_false_reject_rate == pytest.approx(0.01)
    at_10_percent = calibrate_threshold(np.arange(1, 20) / 20.0, 0.1)  # n = 19: k = 18
    assert at_10_percent.threshold == pytest.approx(0.9) and at_10_percent.estimated_false_reject_rate == pytest.approx(0.1)
    assert calibrate_threshold(np.arange(1, 99) / 100.0, 0.01).rule == "small-sample"  # n = 98: k = 99 > n


def test_small_sample_rule_is_the_normal_tolerance_bound_on_logits() -> None:
    # logits -1, +1 four times each: mean 0, sd sqrt(8/7). Tables: one-sided normal tolerance
    # factor n = 8, content 0.99, confidence 0.95 is 4.354.
    values = 1.0 / (1.0 + np.exp(-np.array([-1.0, 1.0] * 4)))
    result = calibrate_threshold(values, 0.01)
    assert result.rule == "small-sample"
    assert tolerance_factor(8, 0.01) == pytest.approx(4.354, abs=1e-3)
    assert tolerance_factor(50, 0.01) == pytest.approx(2.862, abs=1e-3)
    expected = 1.0 / (1.0 + np.exp(-4.354 * np.sqrt(8 / 7)))
    assert result.threshold == pytest.approx(expected, abs=1e-4)
    # t predictive tail at 4.354 * sqrt(8/7) / (sqrt(8/7) * sqrt(9/8)) = 4.105 with 7 dof:
    # between t tables' 0.999 (4.785) and 0.995 (3.499) points
    assert 0.001 < result.estimated_false_reject_rate < 0.005
    assert "tolerance bound" in result.description


def test_small_sample_rule_never_goes_below_the_largest_value() -> None:
    # 49 values at 0.5 (logit 0) and one far outlier at logit 8: the tolerance bound
    # (mean 0.16 + 2.862 x sd 1.13 = 3.4) falls below it, so the largest value is the threshold.
    values = np.array([0.5] * 49 + [1.0 / (1.0 + np.exp(-8.0))])
    result = calibrate_threshold(values, 0.01)
    assert result.threshold == pytest.approx(values.max()) and "the largest value" in result.description
    same = calibrate_threshold(np.full(5, 0.3), 0.01)  # zero spread: just above the common value
    assert 0.3 <= same.threshold < 0.31
    with pytest.raises(ValueError):
        calibrate_threshold([0.2], 0.01)
    with pytest.raises(ValueError):
        calibrate_threshold([0.2, float("nan")], 0.01)


def test_quantile_summary_keys() -> None:
    summary = quantile_summary(np.arange(101) / 100.0)
    assert summary == pytest.approx({"min": 0.0, "p50": 0.5, "p90": 0.9, "p95": 0.95, "p99": 0.99, "max": 1.0})
