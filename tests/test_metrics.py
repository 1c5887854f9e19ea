"""Metrics: streaming pixel metrics and AUPRO against exact references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from model.metrics import (
    AuproAccumulator,
    PixelMetricAccumulator,
    SegmentationMetrics,
    f1_max,
    image_ap,
    image_auroc,
    image_level_metrics,
)

TOLERANCE = 1e-3


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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_metrics_uniform_random_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random((3, 40, 40)) < 0.2
    scores = np.clip(rng.random((3, 40, 40)) * 0.8 + 0.2 * labels, 0, 1)
    accumulator = PixelMetricAccumulator()
    for image_scores, image_labels in zip(scores, labels, strict=True):
        accumulator.update(image_scores, image_labels)
    assert_pixel_metrics_match_sklearn(accumulator.compute(), labels.ravel(), scores.ravel())


def test_pixel_metrics_tied_scores_are_exact() -> None:
    rng = np.random.default_rng(5)
    labels = rng.random(5000) < 0.3
    scores = rng.integers(0, 20, 5000) / 19.0 * 0.7 + 0.3 * labels * (rng.random(5000) < 0.5)
    scores = np.round(scores, 6)
    accumulator = PixelMetricAccumulator()
    accumulator.update(scores, labels)
    assert_pixel_metrics_match_sklearn(accumulator.compute(), labels, scores, tolerance=1e-9)


def test_pixel_metrics_near_tied_scores_above_bin_width_are_resolved() -> None:
    # 50 score levels, each split into near-ties 2e-6 apart: wider than one bin (2**-20,
    # about 9.5e-7), so the histogram orders them exactly as scikit-learn does.
    rng = np.random.default_rng(6)
    labels = rng.random(20000) < 0.25
    base = rng.integers(0, 50, 20000) / 50.0 * 0.9
    scores = base + 0.05 * labels + rng.integers(0, 20, 20000) * 2e-6
    accumulator = PixelMetricAccumulator()
    accumulator.update(scores, labels)
    assert_pixel_metrics_match_sklearn(accumulator.compute(), labels, scores, tolerance=1e-9)


def test_pixel_metrics_near_tied_scores_below_bin_width() -> None:
    # Scores 1e-9 apart share a bin and count as tied, while scikit-learn orders them.
    # AUROC of a tie is the mean over orderings, so it stays within 1e-3; AP is not linear
    # in the ordering and moves more. This case is the worst kind: every one of 50 tie
    # groups mixes 400 pixels of both classes. (float32 maps cannot even hold such
    # near-ties: their spacing is at least 6e-8.)
    rng = np.random.default_rng(6)
    labels = rng.random(20000) < 0.25
    base = rng.integers(0, 50, 20000) / 50.0
    scores = np.clip(base + 0.1 * labels + rng.random(20000) * 1e-9, 0, 1)
    accumulator = PixelMetricAccumulator()
    accumulator.update(scores, labels)
    result = accumulator.compute()
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=TOLERANCE)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-2)


def test_pixel_metrics_continuous_maps_streamed_match_sklearn() -> None:
    maps, masks = blob_masks_and_maps(seed=7, count=9)
    accumulator = PixelMetricAccumulator(buffer_size=3000)  # small: exercises both flush paths
    for anomaly_map, mask in zip(maps, masks, strict=True):
        accumulator.update(anomaly_map, mask.astype(np.uint8) * 255)  # 0/255 masks work too
    labels = np.concatenate([m.ravel() for m in masks])
    scores = np.concatenate([m.ravel() for m in maps])
    assert_pixel_metrics_match_sklearn(accumulator.compute(), labels, scores)


def test_pixel_metrics_clip_out_of_range_and_reject_nan() -> None:
    rng = np.random.default_rng(8)
    labels = rng.random(2000) < 0.3
    scores = rng.normal(0.5 + 0.2 * labels, 0.4)  # about 20 % outside [0, 1]
    accumulator = PixelMetricAccumulator()
    accumulator.update(scores, labels)
    assert_pixel_metrics_match_sklearn(accumulator.compute(), labels, np.clip(scores, 0, 1))
    with pytest.raises(ValueError, match="NaN"):
        accumulator.update(np.array([0.5, np.nan]), np.array([True, False]))
    with pytest.raises(ValueError, match="shape"):
        accumulator.update(np.zeros((4, 4)), np.zeros((4, 5), bool))


def test_pixel_metrics_degenerate_and_memory_is_bounded() -> None:
    accumulator = PixelMetricAccumulator(num_bins=1024)
    assert all(math.isnan(v) for v in accumulator.compute().values())
    accumulator.update(np.full((8, 8), 0.3), np.zeros((8, 8), bool))
    assert all(math.isnan(v) for v in accumulator.compute().values())
    state_sizes = (accumulator.positive_counts.size, accumulator.negative_counts.size)
    for _ in range(20):
        accumulator.update(np.random.default_rng(0).random((64, 64)), np.eye(64, dtype=bool))
    assert (accumulator.positive_counts.size, accumulator.negative_counts.size) == state_sizes == (1024, 1024)
    assert accumulator.positive_counts.sum() == 20 * 64
    accumulator.reset()
    assert accumulator.positive_counts.sum() == accumulator.negative_counts.sum() == 0


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
    accumulator = AuproAccumulator()
    accumulator.update(anomaly_map, mask)
    assert accumulator.num_regions == 2
    assert accumulator.compute() == pytest.approx(0.5, abs=1e-9)
    full = AuproAccumulator(fpr_limit=1.0)
    full.update(anomaly_map, mask)
    assert full.compute() == pytest.approx(0.85, abs=1e-9)
    assert exact_aupro([anomaly_map], [mask]) == pytest.approx(0.5)
    assert exact_aupro([anomaly_map], [mask], fpr_limit=1.0) == pytest.approx(0.85)


def test_aupro_counts_diagonal_neighbours_as_one_region() -> None:
    mask = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]], bool)
    accumulator = AuproAccumulator()
    accumulator.update(np.where(mask, 0.9, 0.1), mask)
    assert accumulator.num_regions == 1
    assert accumulator.compute() == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_matches_exact_reference_on_random_maps(seed: int) -> None:
    maps, masks = blob_masks_and_maps(seed=seed, count=6, size=40)
    accumulator = AuproAccumulator()
    for anomaly_map, mask in zip(maps, masks, strict=True):
        accumulator.update(anomaly_map, mask)
    assert accumulator.compute() == pytest.approx(exact_aupro(maps, masks), abs=TOLERANCE)


def test_aupro_coarse_grid_and_batched_update_still_close() -> None:
    rng = np.random.default_rng(11)
    masks = rng.random((4, 32, 32)) < 0.15  # many small regions
    maps = np.clip(rng.random((4, 32, 32)) * 0.8 + 0.2 * masks, 0, 1)
    accumulator = AuproAccumulator(num_thresholds=4096)
    accumulator.update(maps, masks)  # (B, H, W): regions found per image
    assert accumulator.compute() == pytest.approx(exact_aupro(list(maps), list(masks)), abs=TOLERANCE)


def test_aupro_degenerate_gives_nan() -> None:
    accumulator = AuproAccumulator()
    assert math.isnan(accumulator.compute())
    accumulator.update(np.full((4, 4), 0.2), np.zeros((4, 4), bool))
    assert math.isnan(accumulator.compute())
    only_positive = AuproAccumulator()
    only_positive.update(np.full((2, 2), 0.2), np.ones((2, 2), bool))
    assert math.isnan(only_positive.compute())


# ------------------------------------------------------------------------ combined


def test_segmentation_metrics_combine_both() -> None:
    maps, masks = blob_masks_and_maps(seed=3, count=6)
    metrics = SegmentationMetrics()
    for anomaly_map, mask in zip(maps, masks, strict=True):
        metrics.update(anomaly_map, mask)
    result = metrics.compute()
    assert set(result) == {"pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"}
    labels = np.concatenate([m.ravel() for m in masks])
    scores = np.concatenate([m.ravel() for m in maps])
    assert_pixel_metrics_match_sklearn(result, labels, scores)
    assert result["aupro"] == pytest.approx(exact_aupro(maps, masks), abs=TOLERANCE)
    metrics.reset()
    assert all(math.isnan(v) for v in metrics.compute().values())
