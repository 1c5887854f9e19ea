"""Bench: exact pixel metrics + AUPRO at MVTec AD scale, with no model.

Feeds ``--images`` random maps of ``--size`` x ``--size`` (default 1725 x 518 px, the
MVTec AD test set at the reference input size, about 460 M pixels) split into
``--categories`` equal categories (default 15, as MVTec AD: ~115 images each), through one
:class:`model.metrics.SegmentationMetrics` per category, exactly as
:func:`model.evaluation.evaluate` does: the buffer is sized from the category's pixel
count, the category is computed as soon as its last map is counted, then dropped. Prints
the time spent counting and computing, images/s and the peak RSS (the target: <= 4 GB).

Maps are smooth value noise plus a blurred copy of the mask (so the metrics are neither
0.5 nor 1), about 73 % of images carry 1-3 elliptical defects, as MVTec AD's test set.
``--span`` squeezes the maps into a narrow range (e.g. 1e-4): the metrics must not move.

Usage::

    python bench/bench_pixel_metrics.py                          # full size
    python bench/bench_pixel_metrics.py --images 50 --categories 1
    python bench/bench_pixel_metrics.py --images 40 --categories 2 --check-exact   # vs scikit-learn

``--check-exact`` keeps every pixel (so only for small runs) and prints scikit-learn's
pixel AUROC / AP / F1-max next to the computed ones, per category.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from model.metrics import SegmentationMetrics

ANOMALOUS_FRACTION = 0.73  # 1258 of 1725 MVTec AD test images are defective
PATCH_GRID = 37  # 518 / 14: the ViT-L/14 patch grid the real maps are upsampled from


def peak_rss_gb() -> float:
    """Peak resident set size of this process in GB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(grid.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR))


def make_sample(rng: np.random.Generator, size: int, span: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic (map, mask) pair.

    Returns:
        ``(anomaly_map, mask)``: float32 ``(size, size)`` in [0.5 - span/2, 0.5 + span/2]
        and bool ``(size, size)``.
    """
    mask = np.zeros((size, size), bool)
    if rng.random() < ANOMALOUS_FRACTION:
        rows, cols = np.ogrid[:size, :size]
        for _ in range(int(rng.integers(1, 4))):
            center_y, center_x = rng.uniform(0.1, 0.9, 2) * size
            radius_y, radius_x = rng.uniform(0.01, 0.12, 2) * size
            mask |= ((rows - center_y) / radius_y) ** 2 + ((cols - center_x) / radius_x) ** 2 <= 1.0
    noise = _upsample(rng.random((PATCH_GRID, PATCH_GRID)), size)
    # Down to the patch grid and back up: a blurred mask, as a patch-level detector sees it.
    coarse_mask = Image.fromarray(mask.astype(np.float32)).resize((PATCH_GRID, PATCH_GRID), Image.Resampling.BOX)
    anomaly_map = np.clip(0.65 * noise + 0.35 * _upsample(np.asarray(coarse_mask), size), 0.0, 1.0)
    if span != 1.0:
        anomaly_map = 0.5 + span * (anomaly_map.astype(np.float64) - 0.5)
    return anomaly_map.astype(np.float32), mask


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1725, help="number of maps (default: MVTec AD test set)")
    parser.add_argument("--categories", type=int, default=15, help="equal categories the maps are split into")
    parser.add_argument("--size", type=int, default=518, help="map side in pixels")
    parser.add_argument("--span", type=float, default=1.0, help="range the maps span (narrow: 1e-4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-exact", action="store_true",
                        help="also keep all pixels and compare with scikit-learn (small runs only)")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    per_category = np.array_split(np.arange(args.images), args.categories)
    rss_before = peak_rss_gb()
    update_seconds = compute_seconds = 0.0
    results: list[dict[str, float]] = []
    largest_buffer = 0
    start = time.perf_counter()
    for index, members in enumerate(per_category):
        metrics = SegmentationMetrics(expected_pixels=len(members) * args.size * args.size)
        kept_maps: list[np.ndarray] = []
        kept_masks: list[np.ndarray] = []
        for _ in members:
            anomaly_map, mask = make_sample(rng, args.size, args.span)
            update_start = time.perf_counter()
            metrics.update(anomaly_map, mask)
            update_seconds += time.perf_counter() - update_start
            if args.check_exact:
                kept_maps.append(anomaly_map.ravel())
                kept_masks.append(mask.ravel())
        largest_buffer = max(largest_buffer, metrics.nbytes)
        compute_start = time.perf_counter()
        result = metrics.compute()
        compute_seconds += time.perf_counter() - compute_start
        results.append(result)
        del metrics  # the category is done: its buffer goes
        if args.check_exact:
            print(f"category {index}: " + ", ".join(f"{k}={v:.6f}" for k, v in result.items()))
            print_exact_comparison(result, np.concatenate(kept_masks), np.concatenate(kept_maps))
    total_seconds = time.perf_counter() - start

    pixels = args.images * args.size * args.size
    print(f"images: {args.images} x {args.size}x{args.size} px = {pixels / 1e6:.0f} M pixels in "
          f"{args.categories} categories (largest buffer {largest_buffer / 1e6:.0f} MB); map span {args.span:g}")
    print(f"metric updates: {update_seconds:.2f} s ({args.images / update_seconds:.0f} images/s, "
          f"{pixels / update_seconds / 1e6:.0f} M pixels/s)")
    print(f"compute() (sort + sweep), all categories: {compute_seconds:.2f} s "
          f"({pixels / max(compute_seconds, 1e-9) / 1e6:.0f} M pixels/s)")
    print(f"end to end incl. map generation: {total_seconds:.2f} s ({args.images / total_seconds:.0f} images/s)")
    print(f"peak RSS: {peak_rss_gb():.3f} GB (after imports, before the loop: {rss_before:.3f} GB)")
    mean = {name: float(np.nanmean([r[name] for r in results])) for name in results[0]}
    print("mean over categories: " + ", ".join(f"{name}={value:.6f}" for name, value in mean.items()))


def print_exact_comparison(result: dict[str, float], labels: np.ndarray, scores: np.ndarray) -> None:
    """Print scikit-learn's pixel metrics and the differences."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    precision, recall, _ = precision_recall_curve(labels, scores)
    exact = {
        "pixel_auroc": roc_auc_score(labels, scores),
        "pixel_ap": average_precision_score(labels, scores),
        "pixel_f1_max": float(np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))),
    }
    for name, value in exact.items():
        print(f"  scikit-learn {name}={value:.6f} (ours - sklearn = {result[name] - value:+.2e})")


if __name__ == "__main__":
    main()
