"""Defect regions: connected areas of an anomaly map at or above a pixel threshold.

The pixel threshold of a product comes from its calibration (the fused map's per-image
maximum over good images, see :mod:`model.fewshot.calibration`); regions are what a client
draws as boxes. Maps may be float in [0, 1] or the uint8 0..255 rendering of one (a heatmap
grey level): the threshold is always on the [0, 1] scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# 8-connectivity: diagonal neighbours belong to the same region.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class DefectRegion:
    """One connected region above the threshold.

    Attributes:
        x, y: top-left corner of the bounding box, in image pixels (column, row).
        width, height: bounding box size in pixels.
        area: pixels in the region (not the box).
        peak: the region's highest map value, on the [0, 1] scale.
    """

    x: int
    y: int
    width: int
    height: int
    area: int
    peak: float


def _validated(anomaly_map: np.ndarray, threshold: float) -> tuple[np.ndarray, float]:
    """(H, W) map as float on the [0, 1] scale (uint8 divided by 255) and the checked threshold."""
    array = np.asarray(anomaly_map)
    if array.ndim != 2:
        raise ValueError(f"anomaly map must be 2-D (H, W), got shape {array.shape}")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0, float(threshold)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"anomaly map must be float in [0, 1] or uint8 0..255, got {array.dtype}")
    return array, float(threshold)


def defect_mask(anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W) bool: where the map is at or above ``threshold`` (a [0, 1] value, also for uint8 maps)."""
    values, threshold = _validated(anomaly_map, threshold)
    return values >= threshold


def defect_regions(
    anomaly_map: np.ndarray, threshold: float, *, min_area: int = 1, max_regions: int = 100
) -> list[DefectRegion]:
    """Connected regions (8-connectivity) of ``map >= threshold``.

    Args:
        anomaly_map: (H, W) float in [0, 1] or uint8 0..255.
        threshold: on the [0, 1] scale.
        min_area: drop regions with fewer pixels.
        max_regions: keep at most this many (after sorting).

    Returns:
        Regions sorted by peak (highest first), then area (largest first), then position.
    """
    values, threshold = _validated(anomaly_map, threshold)
    labels, count = ndimage.label(values >= threshold, structure=_EIGHT_CONNECTED)
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index)
    peaks = ndimage.maximum(values, labels, index)
    regions = []
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        area = int(areas[label - 1])
        if box is None or area < min_area:
            continue
        rows, cols = box
        regions.append(DefectRegion(
            x=int(cols.start),
            y=int(rows.start),
            width=int(cols.stop - cols.start),
            height=int(rows.stop - rows.start),
            area=area,
            peak=float(peaks[label - 1]),
        ))
    regions.sort(key=lambda region: (-region.peak, -region.area, region.y, region.x))
    return regions[: max(0, max_regions)]
