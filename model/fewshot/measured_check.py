"""Measured check of a few-shot reference on synthetic textures, shared by a test and a bench.

**Plumbing check, never a quality claim**: run on random backbone weights and procedural
textures (model/data/synthetic.py), it shows the bank, the fused maps and the calibration
behave as designed on images nothing was tuned on (reference images are ``train/good``
renders, evaluation images ``test/...`` renders: other seeds). Quote MVTec AD / VisA figures
for quality.

- :func:`few_shot_lift`: zero-shot alone against zero-shot + ``n`` good images, image and
  pixel AUROC averaged over textures;
- :func:`calibrated_rates`: after calibrating on ``n`` good images, the false-reject rate
  on held-out good images, the share of them with a defect region, and the detection rate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from model.data.synthetic import DEFECT_TYPES, synthesize_sample
from model.detector import Detector, FewShotReference, Inspection
from model.fewshot.config import ReferenceConfig
from model.metrics import SegmentationMetrics, image_auroc

BATCH_SIZE = 16


def good_images(category: str, stream: str, indices: Sequence[int], size: int) -> list[Image.Image]:
    """Defect-free renders (``stream`` ``train/good`` or ``test/good``)."""
    return [Image.fromarray(synthesize_sample(category, stream, index, size)[1]) for index in indices]


def defective_images(category: str, per_type: int, size: int) -> tuple[list[Image.Image], list[np.ndarray]]:
    """``per_type`` renders of each defect type and their (size, size) bool masks."""
    samples = [synthesize_sample(category, defect, index, size) for defect in DEFECT_TYPES for index in range(per_type)]
    return [Image.fromarray(image) for _, image, _ in samples], [mask for _, _, mask in samples]  # type: ignore[misc]


def inspect_all(
    detector: Detector, images: Sequence[Image.Image], category: str, reference: FewShotReference | None
) -> list[Inspection]:
    """Inspect in batches of :data:`BATCH_SIZE`, every image with the same class name and reference."""
    results: list[Inspection] = []
    for start in range(0, len(images), BATCH_SIZE):
        batch = list(images[start : start + BATCH_SIZE])
        references = None if reference is None else [reference] * len(batch)
        results += detector.inspect(batch, [category] * len(batch), references)
    return results


def _aurocs(results: Sequence[Inspection], labels: Sequence[bool], masks: Sequence[np.ndarray]) -> tuple[float, float]:
    pixels = SegmentationMetrics()
    for result, mask in zip(results, masks):
        pixels.update(result.anomaly_map, mask)
    return image_auroc(labels, [result.score for result in results]), float(pixels.compute()["pixel_auroc"])


@dataclass
class LiftResult:
    """Mean over textures (and per texture) of image and pixel AUROC, without and with a reference."""

    good_images: int
    zero_shot_image_auroc: float
    zero_shot_pixel_auroc: float
    few_shot_image_auroc: float
    few_shot_pixel_auroc: float
    per_category: dict[str, dict[str, float]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def few_shot_lift(
    detector: Detector,
    categories: Sequence[str],
    size: int,
    good_count: int = 8,
    test_good: int = 8,
    defects_per_type: int = 4,
    config: ReferenceConfig = ReferenceConfig(),
    progress: bool = False,
) -> LiftResult:
    """Zero-shot against zero-shot + ``good_count`` good images, per texture then averaged."""
    per_category: dict[str, dict[str, float]] = {}
    for category in tqdm(categories, desc=f"lift, {good_count} good", unit="texture", disable=not progress):
        build = detector.build_reference(
            good_images(category, "train/good", range(good_count), size), [category] * good_count, config=config
        )
        reference = FewShotReference(build.bank, config.fusion_weight)
        good = good_images(category, "test/good", range(test_good), size)
        defective, defect_masks = defective_images(category, defects_per_type, size)
        labels = [False] * len(good) + [True] * len(defective)
        masks = [np.zeros((size, size), bool)] * len(good) + defect_masks
        zero = _aurocs(inspect_all(detector, good + defective, category, None), labels, masks)
        fused = _aurocs(inspect_all(detector, good + defective, category, reference), labels, masks)
        per_category[category] = {
            "zero_shot_image_auroc": zero[0], "zero_shot_pixel_auroc": zero[1],
            "few_shot_image_auroc": fused[0], "few_shot_pixel_auroc": fused[1],
        }
    means = {key: float(np.mean([row[key] for row in per_category.values()])) for key in next(iter(per_category.values()))}
    return LiftResult(good_images=good_count, per_category=per_category, **means)


@dataclass
class RateResult:
    """Calibrated on ``good_images`` per texture, measured on held-out images (pooled over textures)."""

    good_images: int
    target: float
    false_reject_rate: float
    false_rejects: int
    held_out_good: int
    good_with_regions_rate: float
    detection_rate: float
    detected: int
    defective: int
    per_category: dict[str, dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrated_rates(
    detector: Detector,
    categories: Sequence[str],
    size: int,
    good_count: int = 50,
    held_out_good: int = 200,
    defects_per_type: int = 10,
    config: ReferenceConfig = ReferenceConfig(),
    progress: bool = False,
) -> RateResult:
    """Calibrate on ``good_count`` good images per texture; count decisions on held-out images.

    A held-out good image is falsely rejected when its fused score reaches the image
    threshold, and "has a region" when its fused map reaches the pixel threshold anywhere.
    """
    per_category: dict[str, dict[str, Any]] = {}
    for category in tqdm(categories, desc=f"rates, {good_count} good", unit="texture", disable=not progress):
        build = detector.build_reference(
            good_images(category, "train/good", range(good_count), size), [category] * good_count, config=config
        )
        report = build.report
        reference = FewShotReference(build.bank, report.fusion_weight)
        # Held-out good images start at index 1000: disjoint from any lift check's test images.
        good = inspect_all(detector, good_images(category, "test/good", range(1000, 1000 + held_out_good), size), category, reference)
        defective, _ = defective_images(category, defects_per_type, size)
        flagged = inspect_all(detector, defective, category, reference)
        per_category[category] = {
            "image_threshold": report.image_threshold,
            "pixel_threshold": report.pixel_threshold,
            "rule": report.rule,
            "estimated_false_reject_rate": report.estimated_false_reject_rate,
            "false_rejects": sum(result.score >= report.image_threshold for result in good),
            "good_with_regions": sum(float(result.anomaly_map.max()) >= report.pixel_threshold for result in good),
            "held_out_good": len(good),
            "detected": sum(result.score >= report.image_threshold for result in flagged),
            "defective": len(flagged),
            "build_seconds": report.seconds,
        }
    total = {key: sum(row[key] for row in per_category.values())
             for key in ("false_rejects", "good_with_regions", "held_out_good", "detected", "defective")}
    return RateResult(
        good_images=good_count,
        target=config.false_reject_rate,
        false_reject_rate=total["false_rejects"] / total["held_out_good"],
        false_rejects=total["false_rejects"],
        held_out_good=total["held_out_good"],
        good_with_regions_rate=total["good_with_regions"] / total["held_out_good"],
        detection_rate=total["detected"] / total["defective"],
        detected=total["detected"],
        defective=total["defective"],
        per_category=per_category,
    )
