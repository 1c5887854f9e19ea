"""Request and response bodies of the products API (pydantic; they make the OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.db.products import NAME_PATTERN, Product, ProductReference
from service.query_types import NOT_BLANK_TEXT, has_control_characters


class ProductSettings(BaseModel):
    """``PUT /products/{name}`` body: the settings to set (absent = unchanged / default)."""

    model_config = ConfigDict(extra="forbid", strict=True)  # a JSON `false` is not a number

    class_name: str | None = Field(
        None, min_length=1, max_length=128, pattern=NOT_BLANK_TEXT,
        description="Class name written in the prompts (default: the product name); not blank.",
    )
    false_reject_rate: float | None = Field(
        None, gt=0.0, le=0.5,
        description="Target share of good parts wrongly rejected; the image threshold is calibrated for it "
        "(default 0.01).",
    )
    few_shot: bool | None = Field(
        None, description="Fuse the few-shot map (good-photo reference) with the zero-shot map (default true)."
    )
    fusion_weight: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Weight of the few-shot branch: fused = (1 - w) zero-shot + w few-shot (default 0.5).",
    )

    @field_validator("class_name")
    @classmethod
    def _clean_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if has_control_characters(value):
            raise ValueError("control characters are not allowed")
        cleaned = " ".join(value.split())
        if not cleaned:
            raise ValueError("must not be blank")
        return cleaned

    def changes(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class CalibrationReport(BaseModel):
    """What calibration measured on the good photos (leave-one-out) and decided."""

    model_config = ConfigDict(extra="allow")

    image_count: int = Field(description="Good photos the reference was built from.")
    false_reject_rate_target: float | None = Field(None, description="The product's target false-reject rate.")
    image_threshold: float | None = Field(None, description="Score at or above which a part is rejected.")
    pixel_threshold: float | None = Field(None, description="Map value at or above which a pixel is defective.")
    estimated_false_reject_rate: float | None = Field(None, description="Estimated share of good parts rejected.")
    rule: str | None = Field(None, description="Which rule set the image threshold (quantile or small-sample rule).")
    score_quantiles: dict[str, float] | None = Field(None, description="Leave-one-out scores of the good photos.")
    pixel_quantiles: dict[str, float] | None = None
    few_shot: bool | None = None
    fusion_weight: float | None = None
    bank_bytes: int | None = Field(None, description="Size of the stored reference bank.")


class ReferenceInfo(BaseModel):
    version: int = Field(description="Increases with every rebuild; inspections name the version they used.")
    image_count: int
    detector: str
    backbone: str
    image_size: int
    identity: dict[str, Any] = Field(description="Detector identity the bank was built with.")
    bank_bytes: int
    created_at: datetime


class ProductOut(BaseModel):
    name: str = Field(description=f"Product name, `{NAME_PATTERN}`.")
    class_name: str
    false_reject_rate: float
    few_shot: bool
    fusion_weight: float
    version: int = Field(description="Increases with every change that can alter a decision.")
    image_count: int = Field(description="Good photos stored.")
    calibration_status: str = Field(
        description="`none` (no photos), `pending` (rebuild queued or running), `ready`, `failed`, "
        "`stale` (photos or settings changed and no rebuild could be queued: POST .../calibrate)."
    )
    calibration_error: str | None = None
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    calibration: CalibrationReport | None = None
    reference: ReferenceInfo | None = None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, product: Product, image_count: int, reference: ProductReference | None) -> ProductOut:
        return cls(
            name=product.name, class_name=product.class_name, false_reject_rate=product.false_reject_rate,
            few_shot=product.few_shot, fusion_weight=product.fusion_weight, version=product.version,
            image_count=image_count, calibration_status=product.calibration_status,
            calibration_error=product.calibration_error, image_threshold=product.image_threshold,
            pixel_threshold=product.pixel_threshold,
            calibration=CalibrationReport.model_validate(product.calibration) if product.calibration and product.calibration.get("image_count") else None,
            reference=ReferenceInfo(
                version=reference.version, image_count=reference.image_count, detector=reference.detector,
                backbone=reference.backbone, image_size=reference.image_size, identity=reference.identity,
                bank_bytes=reference.bank_bytes, created_at=reference.created_at,
            ) if reference is not None else None,
            created_at=product.created_at, updated_at=product.updated_at,
        )


class ProductList(BaseModel):
    products: list[ProductOut]


class GoodPhotosResult(BaseModel):
    """``POST /products/{name}/good``: what was stored and the calibration it led to."""

    product: ProductOut
    added: int = Field(description="New photos stored.")
    duplicates: int = Field(description="Photos already stored (same content), skipped.")
    calibrated: bool = Field(description="Whether the calibration finished within the wait (else it goes on: "
                             "poll GET /products/{name}).")
