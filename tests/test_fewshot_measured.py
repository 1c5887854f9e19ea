"""Measured check of the few-shot reference on synthetic textures (tiny random backbone).

**Plumbing check, not a quality claim**: the backbone is the tiny *random* CLIP and the data
are procedural textures with painted-in defects (model/data/synthetic.py). It shows that the
bank, the fused maps and the calibration do what they should on images nothing here was tuned
on (reference images: ``train/good`` renders; evaluation images: ``test/...`` renders, other
seeds). Quote MVTec AD / VisA figures for quality. bench/bench_fewshot.py runs the same check
(model/fewshot/measured_check.py) on a random ViT-B-16 at 224 px.

Setup: seed 0, CPU, one thread, 96 px (12 x 12 patches), layers 1-4, the training-free
baseline, default ``ReferenceConfig`` (fusion weight 0.5, 1 % target), the five procedural
textures. Measured (torch 2.14.1):

1. baseline + 8 good images against baseline alone (per texture 8 good + 16 defective test
   images): image AUROC 0.522 -> 0.883, pixel AUROC 0.597 -> 0.762 (the untrained zero-shot
   half is noise on random weights and dilutes the fused map; few-shot alone reaches ~0.94
   pixel AUROC here);
2. baseline + 50 good images, calibrated at 1 % (small-sample rule: normal tolerance bound),
   on 120 held-out good images per texture: false-reject rate 0.33 % (2 of 600; 0-1.7 % per
   texture), within [0, 2 %]; defect regions on 0.17 % of the good images; detection rate at
   the threshold 51 % of the 160 defective images (19-72 % per texture).

About 20 s of CPU time (more wall time on shared cores): mostly the 50-image coresets and
the 1300 inspections.
"""

from __future__ import annotations

import pytest

from model.backbone import ClipBackbone
from model.data.synthetic import PROCEDURAL_CATEGORIES
from model.fewshot.measured_check import calibrated_rates, few_shot_lift
from model.scorer_detector import ScorerDetector
from model.scorer_registry import create_scorer

SIZE = 96
LAYERS = (1, 2, 3, 4)
MIN_LIFT = 0.10


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def baseline(tiny_backbone: ClipBackbone) -> ScorerDetector:
    return ScorerDetector(create_scorer("baseline", tiny_backbone, LAYERS, SIZE))


def test_eight_good_images_lift_image_and_pixel_auroc(baseline: ScorerDetector) -> None:
    lift = few_shot_lift(baseline, PROCEDURAL_CATEGORIES, SIZE, good_count=8, test_good=8, defects_per_type=4)
    for category, row in lift.per_category.items():
        print(f"\n{category}: " + ", ".join(f"{key} {value:.3f}" for key, value in row.items()))
    print(
        f"\nbaseline alone -> baseline + 8 good images (random weights, plumbing only): image AUROC "
        f"{lift.zero_shot_image_auroc:.3f} -> {lift.few_shot_image_auroc:.3f}, pixel AUROC "
        f"{lift.zero_shot_pixel_auroc:.3f} -> {lift.few_shot_pixel_auroc:.3f}"
    )
    assert lift.few_shot_image_auroc >= lift.zero_shot_image_auroc + MIN_LIFT
    assert lift.few_shot_pixel_auroc >= lift.zero_shot_pixel_auroc + MIN_LIFT


def test_fifty_good_images_calibrate_the_false_reject_rate(baseline: ScorerDetector) -> None:
    rates = calibrated_rates(baseline, PROCEDURAL_CATEGORIES, SIZE, good_count=50, held_out_good=120, defects_per_type=8)
    for category, row in rates.per_category.items():
        print(f"\n{category}: {row}")
    print(
        f"\n50 good images, target {rates.target:.0%} (random weights, plumbing only): held-out false-reject "
        f"rate {rates.false_reject_rate:.4f} ({rates.false_rejects}/{rates.held_out_good}), defect regions on "
        f"{rates.good_with_regions_rate:.4f} of good images, detection rate {rates.detection_rate:.3f} "
        f"({rates.detected}/{rates.defective})"
    )
    assert all(row["rule"] == "small-sample" for row in rates.per_category.values())
    assert 0.0 <= rates.false_reject_rate <= 2 * rates.target
    assert 0.0 <= rates.good_with_regions_rate <= 2 * rates.target
    assert rates.detection_rate > 0.2  # the threshold is not simply above everything
