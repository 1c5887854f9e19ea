"""Good and defective part photos for the product tests (synthetic textures, PNG bytes)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from svc_helpers import image_bytes

from model.data.synthetic import apply_defect, render_texture

TEXTURE = "carpet_like"


def good_photo(index: int, size: int = 64, category: str = TEXTURE) -> Image.Image:
    rng = np.random.default_rng(1000 + index)
    return Image.fromarray(render_texture(category, size, rng))


def defective_photo(index: int, size: int = 64, category: str = TEXTURE, defect: str = "hole") -> Image.Image:
    rng = np.random.default_rng(5000 + index)
    image, _mask = apply_defect(render_texture(category, size, rng), defect, rng)
    return Image.fromarray(image)


def good_files(count: int, start: int = 0, size: int = 64) -> list[tuple[str, tuple[str, bytes, str]]]:
    """Multipart ``images`` fields of ``count`` good photos."""
    return [("images", (f"good_{i}.png", image_bytes(good_photo(i, size)), "image/png")) for i in range(start, start + count)]
