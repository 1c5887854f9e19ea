"""Evaluation compares maps with masks on the model's square grid, taking the detector's map
there directly: no round trip through each image's own size (which blurs and shifts it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from model.backbone import ClipBackbone
from model.data.sample import InspectionSample
from model.evaluation import _resize_map, evaluate
from model.scorer_detector import ScorerDetector
from model.scorer_registry import create_scorer


def test_evaluate_takes_maps_on_the_metrics_grid(tmp_path: Path, tiny_backbone: ClipBackbone) -> None:
    size = tiny_backbone.native_image_size
    detector = ScorerDetector(create_scorer("baseline", tiny_backbone, (1, 2, 3, 4), size))
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (97, 171, 3), dtype=np.uint8))  # not square, not size
    mask = np.zeros((97, 171), np.uint8)
    mask[30:60, 40:90] = 255
    image.save(tmp_path / "part.png")
    Image.fromarray(mask).save(tmp_path / "part_mask.png")
    sample = InspectionSample(tmp_path / "part.png", "part", "scratch", True, tmp_path / "part_mask.png")
    seen: list[np.ndarray] = []
    report = evaluate(detector, [sample], progress=False, on_result=lambda *args: seen.append(args[-1]))
    assert report["eval_size"] == size and seen[0].shape == (size, size)
    direct = detector.inspect([image], ["part"], map_size=size)[0].anomaly_map
    np.testing.assert_array_equal(seen[0], direct)
    # the old path (map at the image's 171x97, then back to size x size) is measurably different
    round_trip = _resize_map(detector.inspect([image], ["part"])[0].anomaly_map, size)
    assert np.abs(round_trip - direct).max() > 1e-4
    # and the image-sized map is still what a caller gets without map_size
    assert detector.inspect([image], ["part"])[0].anomaly_map.shape == (97, 171)
