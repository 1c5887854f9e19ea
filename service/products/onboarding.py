"""Rebuild a product's few-shot reference from its good photos and calibrate its thresholds.

Runs where a detector runs: in a worker (``reference`` jobs from the queue, so the model work of
``POST /products/{name}/good`` goes through the same workers as ``/inspect``) or in the
``genclip products`` CLI. The photos are read from the database, the bank and calibration
written back in one conditional transaction (:func:`repository.store_calibration`): a build that
a newer upload or settings change overtook is discarded, never stored over the newer state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from model.detector import Detector
from model.fewshot import MIN_GOOD_IMAGES, ReferenceConfig

from service.db.database import Database
from service.db.products import CALIBRATION_FAILED
from service.image_input import decode_image
from service.products import repository
from service.products.repository import CalibrationTarget

log = logging.getLogger(__name__)


class CalibrationFailed(RuntimeError):
    """The photos could not be turned into a reference (unreadable photo, model error)."""


@dataclass(frozen=True)
class OnboardingLimits:
    """Settings the build needs (from :class:`service.settings.Settings`)."""

    bank_max_patches: int
    max_upload_bytes: int
    max_image_pixels: int

    @classmethod
    def from_settings(cls, settings) -> OnboardingLimits:  # type: ignore[no-untyped-def]
        return cls(settings.bank_max_patches, settings.max_upload_bytes, settings.max_image_pixels)


@dataclass
class OnboardingOutcome:
    """What a rebuild did: ``stored`` is false when a newer state superseded it."""

    target: CalibrationTarget
    report: dict[str, Any]
    stored: bool


def build_and_store(
    database: Database,
    detector: Detector,
    product_id: int,
    limits: OnboardingLimits,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> OnboardingOutcome | None:
    """Rebuild the reference of ``product_id`` from its current photos and settings (always
    the newest state, whichever request queued the job).

    Args:
        progress: ``progress(done, total)`` while images are processed.

    Returns:
        The outcome, or ``None`` if the product no longer exists.

    Raises:
        CalibrationFailed: a photo cannot be decoded or the detector failed; the product is
            marked ``failed`` with the reason.
    """
    target, photos = database.transaction(
        lambda session: (repository.load_target(session, product_id), repository.load_images(session, product_id))
    )
    if target is None:
        return None
    started = time.perf_counter()
    try:
        images = [
            decode_image(data, max_bytes=limits.max_upload_bytes, max_pixels=limits.max_image_pixels).image
            for _, data in photos
        ]
        if len(images) >= MIN_GOOD_IMAGES:
            config = ReferenceConfig(
                max_patches_per_layer=limits.bank_max_patches,
                fusion_weight=target.fusion_weight if target.few_shot else 0.0,
                false_reject_rate=target.false_reject_rate,
            )
            build = detector.build_reference(images, [target.class_name] * len(images), config=config, progress=progress)
            report = build.report.as_dict()
            bank, thresholds = build.bank.to_bytes(), (build.report.image_threshold, build.report.pixel_threshold)
        else:  # leave-one-out needs two photos: decisions stay zero-shot until then
            report = {"image_count": len(images), "rule": f"waiting for photos: calibration needs at least "
                      f"{MIN_GOOD_IMAGES} good photos, the product has {len(images)}"}
            bank, thresholds = None, (None, None)
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        log.error("calibration of product %s failed: %s", target.name, message)
        database.transaction(lambda session: repository.mark_calibration(session, target, CALIBRATION_FAILED, message))
        raise CalibrationFailed(message) from exc
    report.update(
        few_shot=target.few_shot,
        images_version=target.images_version,
        settings_version=target.settings_version,
        detector=detector.identity.as_dict(),
        seconds_total=round(time.perf_counter() - started, 3),
    )
    stored = database.transaction(lambda session: repository.store_calibration(
        session, target, bank=bank, identity=detector.identity.as_dict(), report=report,
        image_threshold=thresholds[0], pixel_threshold=thresholds[1],
    ))
    if not stored:
        log.info("calibration of product %s superseded by a newer upload or settings change", target.name)
    return OnboardingOutcome(target=target, report=report, stored=stored)
