"""Which thresholds decide an inspection, and the defect regions they cut out of the map.

Precedence for the image threshold (``threshold_source`` in the answer):

1. ``product``: the product's calibrated threshold (``POST /products/{name}/good``);
2. ``class``: a per-class entry of ``GENCLIP_THRESHOLDS_FILE`` (the class name sent, else the
   label the model used);
3. ``default``: ``GENCLIP_DEFAULT_THRESHOLD``.

The pixel threshold (defect regions, ``mask_png``) is the product's calibrated one, else
``GENCLIP_DEFAULT_PIXEL_THRESHOLD``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.regions import defect_regions

from service.products.resolver import ProductView
from service.thresholds import Thresholds


@dataclass(frozen=True)
class DecisionPolicy:
    threshold: float
    threshold_source: str  # product | class | default
    pixel_threshold: float


def decision_policy(
    product: ProductView | None,
    thresholds: Thresholds,
    class_name: str | None,
    class_label: str | None,
    default_pixel_threshold: float,
) -> DecisionPolicy:
    if product is not None and product.image_threshold is not None:
        threshold, source = product.image_threshold, "product"
    else:
        threshold, source = thresholds.lookup(class_name, class_label)
    pixel = product.pixel_threshold if product is not None and product.pixel_threshold is not None else default_pixel_threshold
    return DecisionPolicy(threshold, source, pixel)


def find_defects(map_u8: np.ndarray, pixel_threshold: float, min_area: int, max_regions: int) -> list[dict]:
    """Connected regions of the (H, W) uint8 map at or above ``pixel_threshold`` (in [0, 1])."""
    if max_regions <= 0:
        return []
    regions = defect_regions(map_u8, pixel_threshold, min_area=min_area, max_regions=max_regions)
    return [
        {"x": r.x, "y": r.y, "width": r.width, "height": r.height, "area": r.area, "peak": round(float(r.peak), 6)}
        for r in regions
    ]
