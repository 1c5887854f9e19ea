"""Bench: streaming pixel metrics + AUPRO at MVTec AD scale, with no model.

Feeds ``--images`` random maps of ``--size`` x ``--size`` (default 1725 x 518 px, the
MVTec AD test set at the reference input size, about 460 M pixels) through
:class:`model.metrics.SegmentationMetrics`, one image at a time, and prints the time
spent in the metric updates, the end-to-end time, images/s and the peak RSS. Each map and
mask is generated on the fly and dropped after its update, as an evaluation loop would.

Maps are smooth value noise plus a blurred copy of the mask (so the metrics are neither
0.5 nor 1), about 73 % of images carry 1-3 elliptical defects, as MVTec AD's test set.

Usage::

    python bench/bench_pixel_metrics.py                 # full size
    python bench/bench_pixel_metrics.py --images 50     # quick check
    python bench/bench_pixel_metrics.py --images 50 --check-exact   # vs scikit-learn

``--check-exact`` keeps every pixel (so only for small runs) and prints scikit-learn's
exact pixel AUROC / AP / F1-max next to the streamed ones.
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


def make_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic (map, mask) pair.

    Returns:
        ``(anomaly_map, mask)``: float32 ``(size, size)`` in [0, 1] and bool ``(size, size)``.
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
    anomaly_map = 0.65 * noise + 0.35 * _upsample(np.asarray(coarse_mask), size)
    return np.clip(anomaly_map, 0.0, 1.0), mask


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1725, help="number of maps (default: MVTec AD test set)")
    parser.add_argument("--size", type=int, default=518, help="map side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-exact", action="store_true",
                        help="also keep all pixels and compare with scikit-learn (small runs only)")
    args = parser.parse_args(argv)
    kept_maps: list[np.ndarray] = []
    kept_masks: list[np.ndarray] = []

    rng = np.random.default_rng(args.seed)
    metrics = SegmentationMetrics()
    rss_before = peak_rss_gb()
    update_seconds = 0.0
    start = time.perf_counter()
    for _ in range(args.images):
        anomaly_map, mask = make_sample(rng, args.size)
        update_start = time.perf_counter()
        metrics.update(anomaly_map, mask)
        update_seconds += time.perf_counter() - update_start
        if args.check_exact:
            kept_maps.append(anomaly_map.ravel())
            kept_masks.append(mask.ravel())
    compute_start = time.perf_counter()
    result = metrics.compute()
    compute_seconds = time.perf_counter() - compute_start
    total_seconds = time.perf_counter() - start

    pixels = args.images * args.size * args.size
    print(f"images: {args.images} x {args.size}x{args.size} px = {pixels / 1e6:.0f} M pixels")
    print(f"metric updates: {update_seconds:.2f} s ({args.images / update_seconds:.0f} images/s, "
          f"{pixels / update_seconds / 1e6:.0f} M pixels/s)")
    print(f"compute(): {compute_seconds:.3f} s")
    print(f"end to end incl. map generation: {total_seconds:.2f} s ({args.images / total_seconds:.0f} images/s)")
    print(f"peak RSS: {peak_rss_gb():.3f} GB (after imports, before the loop: {rss_before:.3f} GB)")
    print("metrics: " + ", ".join(f"{name}={value:.6f}" for name, value in result.items()))
    if args.check_exact:
        print_exact_comparison(result, np.concatenate(kept_masks), np.concatenate(kept_maps))


def print_exact_comparison(result: dict[str, float], labels: np.ndarray, scores: np.ndarray) -> None:
    """Print scikit-learn's exact pixel metrics and the streamed ones' differences."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    precision, recall, _ = precision_recall_curve(labels, scores)
    exact = {
        "pixel_auroc": roc_auc_score(labels, scores),
        "pixel_ap": average_precision_score(labels, scores),
        "pixel_f1_max": float(np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))),
    }
    for name, value in exact.items():
        print(f"exact {name}={value:.6f} (streamed - exact = {result[name] - value:+.2e})")


if __name__ == "__main__":
    main()
