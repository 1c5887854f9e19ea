"""Metrics: image metrics against scikit-learn; the exact pixel metrics and AUPRO against
scikit-learn and an independent exact AUPRO, on narrow-range maps, ties and degenerate data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

import model.metrics.pixel_metrics as pixel_metrics
from model.metrics import SegmentationMetrics, f1_max, image_ap, image_auroc, image_level_metrics
from model.metrics.pixel_metrics import ordered_score_keys

# The pixel metrics are exact on float32 scores: only float64 summation separates them
# from the references.
TOLERANCE = 1e-9


# ------------------------------------------------------------------------ references


def sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(f1.max())


def exact_aupro(maps: list[np.ndarray], masks: list[np.ndarray], fpr_limit: float = 0.3) -> float:
    """Non-streaming AUPRO: every distinct score is a threshold (MVTec AD's definition)."""
    scores, overlap_weights, negative_weights, num_regions = [], [], [], 0
    for anomaly_map, mask in zip(maps, masks, strict=True):
        regions, count = ndimage.label(mask, structure=np.ones((3, 3)))
        sizes = np.bincount(regions.ravel())
        weights = np.zeros(anomaly_map.shape)
        weights[mask] = 1.0 / sizes[regions[mask]]
        scores.append(anomaly_map.ravel())
        overlap_weights.append(weights.ravel())
        negative_weights.append((~mask).ravel().astype(float))
        num_regions += count
    score = np.concatenate(scores)
    order = np.argsort(-score, kind="stable")
    sorted_scores = score[order]
    overlap = np.cumsum(np.concatenate(overlap_weights)[order])
    negatives = np.concatenate(negative_weights)
    false_positives = np.cumsum(negatives[order])
    # One curve point per distinct score: the last position of each tie group.
    group_ends = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    fpr = np.concatenate(([0.0], false_positives[group_ends] / negatives.sum()))
    pro = np.concatenate(([0.0], overlap[group_ends] / num_regions))
    area = 0.0
    for x0, x1, y0, y1 in zip(fpr[:-1], fpr[1:], pro[:-1], pro[1:], strict=True):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def blob_masks_and_maps(seed: int, count: int, size: int = 48) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Continuous, spatially smooth maps loosely correlated with blob masks (some empty)."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for index in range(count):
        mask = np.zeros((size, size), bool)
        if index % 3:  # every third image is good
            for _ in range(rng.integers(1, 4)):
                center = rng.integers(4, size - 4, 2)
                radius = rng.integers(2, 7)
                rows, cols = np.ogrid[:size, :size]
                mask |= (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius**2
        noise = ndimage.gaussian_filter(rng.random((size, size)), 2)
        smooth_noise = (noise - noise.min()) / np.ptp(noise)
        anomaly_map = np.clip(0.6 * smooth_noise + 0.35 * ndimage.gaussian_filter(mask * 1.0, 2), 0, 1)
        maps.append(anomaly_map.astype(np.float32))
        masks.append(mask)
    return maps, masks


def assert_pixel_metrics_match_sklearn(
    result: dict[str, float], labels: np.ndarray, scores: np.ndarray, tolerance: float = TOLERANCE
) -> None:
    """scikit-learn on the same float32 scores the metrics compare."""
    scores = np.asarray(scores, dtype=np.float32).ravel()
    labels = np.asarray(labels).ravel()
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=tolerance)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(labels, scores), abs=tolerance)
    assert result["pixel_f1_max"] == pytest.approx(sklearn_f1_max(labels, scores), abs=tolerance)


# ------------------------------------------------------------------------ image level


def test_image_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.4
    scores = np.round(rng.random(200) + 0.4 * labels, 2)  # with ties
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    assert image_ap(labels, scores) == pytest.approx(average_precision_score(labels, scores))
    assert f1_max(labels, scores) == pytest.approx(sklearn_f1_max(labels, scores))
    assert image_level_metrics(labels.astype(int), scores) == {
        "auroc": image_auroc(labels, scores), "ap": image_ap(labels, scores), "f1_max": f1_max(labels, scores),
    }


def test_image_metrics_hand_case() -> None:
    labels, scores = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert image_auroc(labels, scores) == pytest.approx(0.75)
    # Thresholds 0.8, 0.4, 0.35: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    assert image_ap(labels, scores) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert f1_max(labels, scores) == pytest.approx(0.8)  # threshold 0.35: P=2/3, R=1


def test_image_metrics_single_class_gives_nan() -> None:
    for metric in (image_auroc, image_ap, f1_max):
        assert math.isnan(metric([1, 1, 1], [0.1, 0.2, 0.3]))
        assert math.isnan(metric([0, 0], [0.1, 0.2]))
    assert all(math.isnan(value) for value in image_level_metrics([0, 0], [0.3, 0.5]).values())
    with pytest.raises(ValueError, match="length"):
        image_auroc([0, 1], [0.5])


# ------------------------------------------------------------------------ pixel level


def metrics_of(maps: list[np.ndarray] | np.ndarray, masks: list[np.ndarray] | np.ndarray, **kwargs: object) -> dict[str, float]:
    metrics = SegmentationMetrics(**kwargs)  # type: ignore[arg-type]
    for anomaly_map, mask in zip(maps, masks, strict=True):
        metrics.update(anomaly_map, mask)
    return metrics.compute()


def flat(arrays: list[np.ndarray] | np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(a).ravel() for a in arrays])


def test_ordered_keys_sort_like_the_floats() -> None:
    values = np.array(
        [-np.finfo(np.float32).max, -3.5, -1e-30, -np.finfo(np.float32).tiny / 4, -0.0, 0.0,
         np.finfo(np.float32).tiny / 4, 1e-30, 0.5, 0.50000006, 7.0, np.finfo(np.float32).max],
        dtype=np.float32,
    )
    keys = ordered_score_keys(values)
    assert keys.dtype == np.uint32
    assert np.all(np.diff(keys[[0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]].astype(np.int64)) > 0)
    assert keys[4] == keys[5]  # -0.0 and 0.0 are one score
    shuffled = np.random.default_rng(0).permutation(values)
    np.testing.assert_array_equal(np.sort(ordered_score_keys(shuffled)), keys)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_metrics_uniform_random_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random((3, 40, 40)) < 0.2
    scores = np.clip(rng.random((3, 40, 40)) * 0.8 + 0.2 * labels, 0, 1)
    assert_pixel_metrics_match_sklearn(metrics_of(scores, labels), labels, scores)


def test_pixel_metrics_ties_are_exact() -> None:
    # 20 score levels shared by both classes: every threshold is a mixed tie group.
    rng = np.random.default_rng(5)
    labels = rng.random((5, 40, 50)) < 0.3
    scores = (rng.integers(0, 20, labels.shape) / 19.0 * 0.7 + 0.3 * labels * (rng.random(labels.shape) < 0.5))
    result = metrics_of(scores, labels)
    assert_pixel_metrics_match_sklearn(result, labels, scores)
    assert result["aupro"] == pytest.approx(exact_aupro(list(scores.astype(np.float32)), list(labels)), abs=TOLERANCE)


@pytest.mark.parametrize("span", [1e-4, 1e-2, 1.0, 1e4])
def test_pixel_metrics_do_not_depend_on_the_range_of_the_maps(span: float) -> None:
    """A category whose maps span 1e-4 (or 1e4, or sit below zero) gets the exact figures.

    The maps are built in float32 at the given span; stretching them back to [0, 1] in
    float64 keeps every distinct value distinct, so the metrics must not move.
    """
    maps, masks = blob_masks_and_maps(seed=4, count=6)
    narrow = [(0.5 + span * (m.astype(np.float64) - 0.5)).astype(np.float32) - np.float32(0.25 * span) for m in maps]
    result = metrics_of(narrow, masks)
    assert_pixel_metrics_match_sklearn(result, flat(masks), flat(narrow))
    assert result["aupro"] == pytest.approx(exact_aupro(narrow, masks), abs=TOLERANCE)
    low, high = min(float(m.min()) for m in narrow), max(float(m.max()) for m in narrow)
    stretched = [((m.astype(np.float64) - low) / (high - low)).astype(np.float32) for m in narrow]
    for name, value in metrics_of(stretched, masks).items():
        assert value == pytest.approx(result[name], abs=TOLERANCE), name


def test_pixel_metrics_continuous_maps_with_tiny_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunks of 7 pixels put tie groups and segments across every chunk boundary.
    maps, masks = blob_masks_and_maps(seed=7, count=5, size=24)
    maps = [np.round(m, 2) for m in maps]  # ties that straddle chunk boundaries
    whole = metrics_of(maps, masks)
    monkeypatch.setattr(pixel_metrics, "SWEEP_CHUNK", 7)
    chunked = metrics_of(maps, [m.astype(np.uint8) * 255 for m in masks])  # 0/255 masks work too
    for name, value in whole.items():
        assert chunked[name] == pytest.approx(value, abs=TOLERANCE), name
    assert_pixel_metrics_match_sklearn(chunked, flat(masks), flat(maps))
    assert chunked["aupro"] == pytest.approx(exact_aupro([m.astype(np.float32) for m in maps], masks), abs=TOLERANCE)


def test_pixel_metrics_reject_nan_and_shape_mismatch() -> None:
    metrics = SegmentationMetrics()
    with pytest.raises(ValueError, match="NaN"):
        metrics.update(np.array([0.5, np.nan]), np.array([True, False]))
    with pytest.raises(ValueError, match="NaN"):
        metrics.update(np.array([0.5, 1e300]), np.array([True, False]))  # beyond float32
    with pytest.raises(ValueError, match="shape"):
        metrics.update(np.zeros((4, 4)), np.zeros((4, 5), bool))
    assert metrics.pixels == 0


def test_all_good_category_gives_nan_and_counts_nothing_anomalous() -> None:
    metrics = SegmentationMetrics()
    assert all(math.isnan(value) for value in metrics.compute().values())
    for seed in range(3):
        metrics.update(np.random.default_rng(seed).random((8, 8)), np.zeros((8, 8), bool))
    assert metrics.anomalous_pixels == 0 and metrics.num_regions == 0 and metrics.pixels == 192
    assert all(math.isnan(value) for value in metrics.compute().values())


def test_buffer_is_sized_once_when_the_pixel_count_is_known_and_compute_can_repeat() -> None:
    maps, masks = blob_masks_and_maps(seed=9, count=4, size=32)
    sized = SegmentationMetrics(expected_pixels=4 * 32 * 32)
    growing = SegmentationMetrics()
    for anomaly_map, mask in zip(maps, masks, strict=True):
        sized.update(anomaly_map, mask)
        growing.update(anomaly_map, mask)
    assert sized.nbytes == 4 * 32 * 32 * 8  # 8 bytes per pixel, no spare
    assert sized.compute() == growing.compute()
    first = sized.compute()
    assert sized.compute() == first  # compute sorts in place; a second call agrees
    sized.update(maps[0], masks[0])  # counting may continue after compute
    assert_pixel_metrics_match_sklearn(sized.compute(), flat(masks + masks[:1]), flat(maps + maps[:1]))
    sized.reset()
    assert sized.pixels == 0 and sized.nbytes == 0


# ------------------------------------------------------------------------ AUPRO


def hand_case() -> tuple[np.ndarray, np.ndarray]:
    """Two regions (A: 2 pixels, B: 1 pixel) and 5 normal pixels.

    Sweeping down the distinct scores gives (FPR, PRO):
    0.9 -> (0, 1/4)   A half covered, B not: (1/2 + 0) / 2
    0.8 -> (1/5, 1/4) one normal pixel
    0.7 -> (1/5, 3/4) B covered
    0.4 -> (1/5, 1)   A covered
    0.2 -> (3/5, 1), 0.1 -> (1, 1)
    Area up to FPR 0.3: 0.2 * 1/4 + 0.1 * 1 = 0.15, / 0.3 = 0.5.
    Area up to FPR 1.0: 0.05 + 0.8 * 1 = 0.85.
    """
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 1]], bool)
    anomaly_map = np.array([[0.9, 0.4, 0.8, 0.2], [0.2, 0.1, 0.1, 0.7]])
    return anomaly_map, mask


def test_aupro_hand_computed_case() -> None:
    anomaly_map, mask = hand_case()
    metrics = SegmentationMetrics()
    metrics.update(anomaly_map, mask)
    assert metrics.num_regions == 2
    assert metrics.compute()["aupro"] == pytest.approx(0.5, abs=1e-9)
    full = SegmentationMetrics(fpr_limit=1.0)
    full.update(anomaly_map, mask)
    assert full.compute()["aupro"] == pytest.approx(0.85, abs=1e-9)
    assert exact_aupro([anomaly_map], [mask]) == pytest.approx(0.5)
    assert exact_aupro([anomaly_map], [mask], fpr_limit=1.0) == pytest.approx(0.85)


def test_aupro_counts_diagonal_neighbours_as_one_region() -> None:
    mask = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]], bool)
    metrics = SegmentationMetrics()
    metrics.update(np.where(mask, 0.9, 0.1), mask)
    assert metrics.num_regions == 1
    assert metrics.compute()["aupro"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_exact_reference_on_random_maps(seed: int) -> None:
    maps, masks = blob_masks_and_maps(seed=seed, count=6, size=40)
    assert metrics_of(maps, masks)["aupro"] == pytest.approx(exact_aupro(maps, masks), abs=TOLERANCE)


def test_aupro_batched_update_finds_regions_per_image() -> None:
    rng = np.random.default_rng(11)
    masks = rng.random((4, 32, 32)) < 0.15  # many small regions
    maps = np.clip(rng.random((4, 32, 32)) * 0.8 + 0.2 * masks, 0, 1).astype(np.float32)
    metrics = SegmentationMetrics()
    metrics.update(maps, masks)  # (B, H, W): regions found per image
    assert metrics.num_regions == sum(ndimage.label(m, structure=np.ones((3, 3)))[1] for m in masks)
    assert metrics.compute()["aupro"] == pytest.approx(exact_aupro(list(maps), list(masks)), abs=TOLERANCE)


def test_aupro_degenerate_gives_nan() -> None:
    only_positive = SegmentationMetrics()
    only_positive.update(np.full((2, 2), 0.2), np.ones((2, 2), bool))
    assert math.isnan(only_positive.compute()["aupro"])
    assert math.isnan(only_positive.compute()["pixel_auroc"])


def test_segmentation_metrics_combine_both() -> None:
    maps, masks = blob_masks_and_maps(seed=3, count=6)
    result = metrics_of(maps, masks)
    assert set(result) == {"pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"}
    assert_pixel_metrics_match_sklearn(result, flat(masks), flat(maps))
    assert result["aupro"] == pytest.approx(exact_aupro(maps, masks), abs=TOLERANCE)
