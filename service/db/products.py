"""Tables of the product resource: a product, its good photos, its few-shot reference.

* ``products``: settings a quality engineer sets (class name written in prompts, target false
  reject rate, few-shot on/off, fusion weight) and what calibration produced (image and pixel
  thresholds, the report). ``version`` increases with every change that alters decisions;
  ``images_version`` with every change of the good photos and ``settings_version`` with every
  change of a setting calibration depends on: a calibration is stored only if both still hold
  the values it was computed from (a newer calibration is then on its way).
* ``product_images``: the good photos as uploaded (validated bytes), unique per content hash.
* ``product_references``: the current reference bank of a product (one row per product,
  replaced on rebuild), with the detector identity it was built with and the ``images_version``
  it was built from.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from service.db.base import Base, BlobType, JsonType, UtcDateTime, utcnow

NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"

CALIBRATION_NONE = "none"  # no good photos yet
CALIBRATION_PENDING = "pending"  # a rebuild is queued or running
CALIBRATION_READY = "ready"
CALIBRATION_FAILED = "failed"
CALIBRATION_STALE = "stale"  # photos or settings changed and no rebuild could be queued
CALIBRATION_STATUSES = (CALIBRATION_NONE, CALIBRATION_PENDING, CALIBRATION_READY, CALIBRATION_FAILED, CALIBRATION_STALE)


class Product(Base):
    __tablename__ = "products"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True, nullable=False)
    class_name: Mapped[str] = mapped_column(String(128), nullable=False)
    false_reject_rate: Mapped[float] = mapped_column(Float, nullable=False, default=0.01)
    few_shot: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    fusion_weight: Mapped[float] = mapped_column(Float, nullable=False, default=0.5)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    images_version: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    settings_version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    image_threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    pixel_threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    calibration: Mapped[dict[str, Any] | None] = mapped_column(JsonType, nullable=True)
    calibration_status: Mapped[str] = mapped_column(String(16), nullable=False, default=CALIBRATION_NONE)
    calibration_error: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow, onupdate=utcnow)

    images: Mapped[list[ProductImage]] = relationship(
        back_populates="product", cascade="all, delete-orphan", passive_deletes=True, lazy="raise"
    )
    reference: Mapped[ProductReference | None] = relationship(
        back_populates="product", cascade="all, delete-orphan", passive_deletes=True, lazy="raise",
        uselist=False,
    )


class ProductImage(Base):
    __tablename__ = "product_images"
    __table_args__ = (UniqueConstraint("product_id", "sha256", name="uq_product_images_product_sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"), nullable=False, index=True)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    filename: Mapped[str] = mapped_column(String(255), nullable=False)
    format: Mapped[str] = mapped_column(String(8), nullable=False)
    width: Mapped[int] = mapped_column(Integer, nullable=False)
    height: Mapped[int] = mapped_column(Integer, nullable=False)
    size_bytes: Mapped[int] = mapped_column(Integer, nullable=False)
    data: Mapped[bytes] = mapped_column(BlobType, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow)

    product: Mapped[Product] = relationship(back_populates="images", lazy="raise")


class ProductReference(Base):
    __tablename__ = "product_references"

    product_id: Mapped[int] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    images_version: Mapped[int] = mapped_column(Integer, nullable=False)
    image_count: Mapped[int] = mapped_column(Integer, nullable=False)
    detector: Mapped[str] = mapped_column(String(64), nullable=False)
    backbone: Mapped[str] = mapped_column(String(128), nullable=False)
    image_size: Mapped[int] = mapped_column(Integer, nullable=False)
    identity: Mapped[dict[str, Any]] = mapped_column(JsonType, nullable=False)
    bank_bytes: Mapped[int] = mapped_column(Integer, nullable=False)
    bank: Mapped[bytes] = mapped_column(BlobType, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, nullable=False, default=utcnow)

    product: Mapped[Product] = relationship(back_populates="reference", lazy="raise")
