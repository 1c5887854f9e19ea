"""Few-shot product reference: a good-patch memory bank, fused maps and calibrated thresholds.

From a product's good photos (no training run): keep the tapped layers' unit-norm patch
tokens as a coreset-capped float16 bank; at inspection a patch's few-shot anomaly is
``(1 - max cosine to the bank) / 2``, averaged over layers, upsampled and smoothed like the
zero-shot map and fused with it by a weighted mean; thresholds come from leave-one-out scores
of the good images (DESIGN.md 2.4). Pure maths: no HTTP, no database; the bytes of a bank
(:meth:`ReferenceBank.to_bytes`) are what a caller stores.
"""

from model.fewshot.bank import ReferenceBank, bank_identity
from model.fewshot.build import (
    MIN_GOOD_IMAGES,
    GoodImageFeatures,
    ReferenceBuild,
    build_bank,
    build_reference_from_features,
)
from model.fewshot.calibration import CalibratedThreshold, CalibrationReport, calibrate_threshold, quantile_summary
from model.fewshot.config import DEFAULT_MAX_PATCHES_PER_LAYER, ReferenceConfig
from model.fewshot.coreset import greedy_coreset, greedy_coresets
from model.fewshot.errors import ReferenceError, ReferenceMismatchError
from model.fewshot.scoring import few_shot_coarse_map, fuse, nearest_cosine

__all__ = [
    "DEFAULT_MAX_PATCHES_PER_LAYER",
    "MIN_GOOD_IMAGES",
    "CalibratedThreshold",
    "CalibrationReport",
    "GoodImageFeatures",
    "ReferenceBank",
    "ReferenceBuild",
    "ReferenceConfig",
    "ReferenceError",
    "ReferenceMismatchError",
    "bank_identity",
    "build_bank",
    "build_reference_from_features",
    "calibrate_threshold",
    "few_shot_coarse_map",
    "fuse",
    "greedy_coreset",
    "greedy_coresets",
    "nearest_cosine",
    "quantile_summary",
]
