"""Database operations on products, their good photos and references (synchronous sessions).

Writers that race are made safe by the database, not by the process: versions are bumped
with ``UPDATE ... SET v = v + 1``, a calibration is stored by a conditional ``UPDATE`` that only
matches while the product still has the photos and settings it was computed from, and
duplicate photos are caught by the ``(product_id, sha256)`` unique constraint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.db.base import utcnow
from service.db.products import (
    CALIBRATION_FAILED,
    CALIBRATION_NONE,
    CALIBRATION_PENDING,
    CALIBRATION_READY,
    Product,
    ProductImage,
    ProductReference,
)

# Settings whose change invalidates a calibration (the scores it was computed on change).
CALIBRATION_SETTINGS = ("class_name", "false_reject_rate", "few_shot", "fusion_weight")
PRODUCT_SETTINGS = CALIBRATION_SETTINGS


class ProductNotFound(LookupError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown product {name!r}")
        self.name = name


@dataclass(frozen=True)
class GoodImage:
    """A validated good photo to store."""

    filename: str
    format: str
    width: int
    height: int
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class CalibrationTarget:
    """What a reference job must cover: the product's photos and settings at one moment."""

    product_id: int
    name: str
    class_name: str
    false_reject_rate: float
    few_shot: bool
    fusion_weight: float
    images_version: int
    settings_version: int


def get_product(session: Session, name: str) -> Product:
    product = session.scalars(select(Product).where(Product.name == name)).one_or_none()
    if product is None:
        raise ProductNotFound(name)
    return product


def list_products(session: Session) -> list[Product]:
    return list(session.scalars(select(Product).order_by(Product.name)))


def image_counts(session: Session, product_ids: Sequence[int] | None = None) -> dict[int, int]:
    query = select(ProductImage.product_id, func.count()).group_by(ProductImage.product_id)
    if product_ids is not None:
        query = query.where(ProductImage.product_id.in_(list(product_ids)))
    return {pid: int(count) for pid, count in session.execute(query)}


def upsert_product(session: Session, name: str, changes: dict[str, Any]) -> tuple[Product, bool, bool]:
    """Create ``name`` or update its settings.

    Returns:
        ``(product, created, recalibrate)``: ``recalibrate`` is true when a setting that the
        calibration depends on changed and the product has good photos.
    """
    unknown = set(changes) - set(PRODUCT_SETTINGS)
    if unknown:
        raise ValueError(f"unknown product settings {sorted(unknown)}")
    product = session.scalars(select(Product).where(Product.name == name).with_for_update()).one_or_none()
    if product is None:
        product = Product(
            name=name,
            class_name=changes.get("class_name") or name,
            false_reject_rate=changes.get("false_reject_rate", 0.01),
            few_shot=changes.get("few_shot", True),
            fusion_weight=changes.get("fusion_weight", 0.5),
            version=1,
            images_version=0,
            settings_version=1,
            calibration_status=CALIBRATION_NONE,
        )
        session.add(product)
        session.flush()
        return product, True, False
    changed = {key: value for key, value in changes.items() if getattr(product, key) != value}
    if not changed:
        return product, False, False
    recalibrate = bool(set(changed) & set(CALIBRATION_SETTINGS)) and product.images_version > 0
    values: dict[str, Any] = dict(changed, version=Product.version + 1, updated_at=utcnow())
    if recalibrate:  # counters move in SQL, so concurrent writers never lose an increment
        values.update(settings_version=Product.settings_version + 1, calibration_status=CALIBRATION_PENDING)
    session.execute(update(Product).where(Product.id == product.id).values(**values))
    session.refresh(product)
    return product, False, recalibrate


def delete_product(session: Session, name: str) -> None:
    result = session.execute(delete(Product).where(Product.name == name))
    if result.rowcount == 0:
        raise ProductNotFound(name)


def add_images(session: Session, name: str, images: Sequence[GoodImage]) -> tuple[Product, int, int]:
    """Store good photos (duplicates by content hash are skipped) and mark the product for
    recalibration. One transaction: the caller's ``Session.begin()`` commits all or nothing.

    Returns:
        ``(product, added, duplicates)``.
    """
    product = session.scalars(select(Product).where(Product.name == name).with_for_update()).one_or_none()
    if product is None:
        raise ProductNotFound(name)
    hashes = {image.sha256: image for image in images}
    existing = set(session.scalars(
        select(ProductImage.sha256).where(ProductImage.product_id == product.id, ProductImage.sha256.in_(list(hashes)))
    ))
    fresh = [image for sha, image in hashes.items() if sha not in existing]
    for image in fresh:
        session.add(ProductImage(
            product_id=product.id, sha256=image.sha256, filename=image.filename[:255], format=image.format,
            width=image.width, height=image.height, size_bytes=len(image.data), data=image.data,
        ))
    if fresh:
        session.flush()
        session.execute(update(Product).where(Product.id == product.id).values(
            images_version=Product.images_version + 1, version=Product.version + 1, updated_at=utcnow(),
            calibration_status=CALIBRATION_PENDING, calibration_error=None,
        ))
        session.refresh(product)
    return product, len(fresh), len(images) - len(fresh)


def calibration_target(product: Product) -> CalibrationTarget:
    return CalibrationTarget(
        product_id=product.id, name=product.name, class_name=product.class_name,
        false_reject_rate=product.false_reject_rate, few_shot=product.few_shot,
        fusion_weight=product.fusion_weight, images_version=product.images_version,
        settings_version=product.settings_version,
    )


def load_target(session: Session, product_id: int) -> CalibrationTarget | None:
    product = session.get(Product, product_id)
    return calibration_target(product) if product is not None else None


def load_images(session: Session, product_id: int) -> list[tuple[str, bytes]]:
    """``(filename, file bytes)`` of every good photo of a product, oldest first."""
    rows = session.execute(
        select(ProductImage.filename, ProductImage.data).where(ProductImage.product_id == product_id).order_by(ProductImage.id)
    )
    return [(filename, bytes(data)) for filename, data in rows]


def _is_current(target: CalibrationTarget) -> Any:
    return (Product.id == target.product_id) & (Product.images_version == target.images_version) & (
        Product.settings_version == target.settings_version
    )


def store_calibration(
    session: Session,
    target: CalibrationTarget,
    *,
    bank: bytes | None,
    identity: dict[str, Any],
    report: dict[str, Any],
    image_threshold: float | None,
    pixel_threshold: float | None,
) -> bool:
    """Store a reference and its calibration if the product still matches ``target``.

    Returns ``False`` (nothing written) when the photos or settings changed meanwhile: the job
    that covers the newer state will store its own result.
    """
    status = CALIBRATION_READY if image_threshold is not None else CALIBRATION_NONE
    updated = session.execute(
        update(Product).where(_is_current(target)).values(
            image_threshold=image_threshold, pixel_threshold=pixel_threshold, calibration=report,
            calibration_status=status, calibration_error=None, version=Product.version + 1, updated_at=utcnow(),
        )
    ).rowcount
    if updated != 1:
        return False
    reference = session.get(ProductReference, target.product_id)
    if bank is None:
        if reference is not None:
            session.delete(reference)
        return True
    if reference is None:
        reference = ProductReference(product_id=target.product_id, version=0)
        session.add(reference)
    reference.version += 1
    reference.images_version = target.images_version
    reference.image_count = int(report.get("image_count", 0))
    reference.detector = str(identity.get("name", ""))
    reference.backbone = str(identity.get("backbone", ""))
    reference.image_size = int(identity.get("image_size", 0))
    reference.identity = identity
    reference.bank_bytes = len(bank)
    reference.bank = bank
    reference.created_at = utcnow()
    session.flush()
    return True


def mark_calibration(session: Session, target: CalibrationTarget, status: str, error: str | None = None) -> bool:
    """Set the calibration status (failed / stale) if the product still matches ``target``."""
    values: dict[str, Any] = {"calibration_status": status, "calibration_error": (error or "")[:2000] or None}
    if status == CALIBRATION_FAILED:
        values["version"] = Product.version + 1
    return session.execute(update(Product).where(_is_current(target)).values(**values)).rowcount == 1


def reference_of(session: Session, product_id: int) -> ProductReference | None:
    return session.get(ProductReference, product_id)


def reference_version(session: Session, product_id: int) -> int:
    version = session.scalar(select(ProductReference.version).where(ProductReference.product_id == product_id))
    return int(version or 0)
