"""Defect regions and masks: boxes, areas, peaks, connectivity, float and uint8 maps."""

from __future__ import annotations

import numpy as np
import pytest

from model.regions import DefectRegion, defect_mask, defect_regions


def _two_blobs() -> np.ndarray:
    """8 x 10 map: an L-shaped blob joined only diagonally to a corner pixel, and a square."""
    anomaly = np.zeros((8, 10), dtype=np.float32)
    anomaly[1, 1:4] = 0.6          # row 1, columns 1..3
    anomaly[2, 1] = 0.7            # the L's foot (peak 0.7)
    anomaly[3, 0] = 0.55           # diagonal neighbour of (2, 1): same region under 8-connectivity
    anomaly[5:7, 6:9] = 0.9        # 2 x 3 square, peak 0.9
    anomaly[6, 8] = 0.95
    anomaly[0, 9] = 0.4            # below the threshold
    return anomaly


def test_regions_boxes_areas_peaks_sorted_by_peak() -> None:
    regions = defect_regions(_two_blobs(), 0.5)
    assert regions == [
        DefectRegion(x=6, y=5, width=3, height=2, area=6, peak=pytest.approx(0.95)),
        DefectRegion(x=0, y=1, width=4, height=3, area=5, peak=pytest.approx(0.7)),
    ]


def test_threshold_is_inclusive_and_mask_matches() -> None:
    anomaly = _two_blobs()
    mask = defect_mask(anomaly, 0.6)
    assert mask.dtype == bool and mask.shape == anomaly.shape
    assert mask.sum() == 3 + 1 + 6  # 0.6 pixels count (>=), 0.55 does not
    regions = defect_regions(anomaly, 0.6)
    # without the 0.55 pixel the L is 4 pixels, box 3 x 2
    assert [(r.x, r.y, r.width, r.height, r.area) for r in regions] == [(6, 5, 3, 2, 6), (1, 1, 3, 2, 4)]


def test_uint8_map_uses_the_unit_threshold() -> None:
    anomaly = np.round(_two_blobs() * 255).astype(np.uint8)
    assert defect_mask(anomaly, 0.5).sum() == defect_mask(_two_blobs(), 0.5).sum() == 11
    regions = defect_regions(anomaly, 0.5)
    assert [r.area for r in regions] == [6, 5]
    assert regions[0].peak == pytest.approx(242 / 255)  # round(0.95 * 255) / 255
    assert defect_regions(anomaly, 0.96) == []


def test_min_area_max_regions_and_ties() -> None:
    anomaly = np.zeros((5, 9), dtype=np.float64)
    anomaly[0, 0] = anomaly[0, 4] = anomaly[0, 8] = 0.8  # three single pixels, same peak
    anomaly[3:5, 3:5] = 0.8                               # a 4-pixel square, same peak
    regions = defect_regions(anomaly, 0.5)
    assert [(r.area, r.x, r.y) for r in regions] == [(4, 3, 3), (1, 0, 0), (1, 4, 0), (1, 8, 0)]
    assert [r.area for r in defect_regions(anomaly, 0.5, min_area=2)] == [4]
    assert len(defect_regions(anomaly, 0.5, max_regions=2)) == 2


def test_empty_and_full_maps() -> None:
    assert defect_regions(np.zeros((4, 4), np.float32), 0.1) == []
    full = defect_regions(np.full((4, 6), 0.3, np.float32), 0.1)
    assert full == [DefectRegion(x=0, y=0, width=6, height=4, area=24, peak=pytest.approx(0.3))]


@pytest.mark.parametrize(
    "anomaly, threshold",
    [
        (np.zeros((2, 2, 3), np.float32), 0.5),      # not 2-D
        (np.zeros((4, 4), np.int64), 0.5),           # neither float nor uint8
        (np.zeros((4, 4), np.float32), float("nan")),
    ],
)
def test_bad_input_is_refused(anomaly: np.ndarray, threshold: float) -> None:
    with pytest.raises(ValueError):
        defect_regions(anomaly, threshold)
    with pytest.raises(ValueError):
        defect_mask(anomaly, threshold)
