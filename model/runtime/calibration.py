"""Images for int8 calibration and NNCF post-training quantization of the exported tower.

Post-training quantization needs a few images like the ones the model will see, only to
measure activation ranges: a product's good photos when the operator has them (a folder, or
a sequence of PIL images from the caller), else the built-in synthetic textures
(:mod:`model.data.synthetic`, good and defective). Every image is preprocessed exactly as in
serving (:meth:`model.backbone.ClipBackbone.preprocess` at the serving resolution).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model.backbone import ClipBackbone
from model.data.errors import DatasetError
from model.data.sample import is_image_file, load_image
from model.data.synthetic import DEFECT_TYPES, available_categories, synthesize_sample
from model.errors import CalibrationDataError, RuntimeExportError

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION_SIZE = 16
SYNTHETIC_SEED = 0


def evenly_spaced(items: Sequence[Any], count: int) -> list[Any]:
    """At most ``count`` items spread evenly over ``items`` (all of them when fewer), in order."""
    if count >= len(items):
        return list(items)
    return [items[(index * len(items)) // count] for index in range(count)]


def read_calibration_folder(folder: Path, limit: int = DEFAULT_CALIBRATION_SIZE) -> list[Image.Image]:
    """Up to ``limit`` images found under ``folder`` (recursively), spread over its sorted files.

    Raises:
        CalibrationDataError: the folder is missing, holds no image, or an image is corrupt.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationDataError(f"calibration image folder not found: {folder}")
    files = sorted(
        (path for path in folder.rglob("*") if is_image_file(path)), key=lambda path: path.relative_to(folder).parts
    )
    if not files:
        raise CalibrationDataError(f"no image (PNG, JPEG, BMP, TIFF) under the calibration folder {folder}")
    try:
        return [load_image(path) for path in evenly_spaced(files, limit)]
    except DatasetError as error:
        raise CalibrationDataError(f"calibration image unreadable: {error}") from error


def synthetic_calibration_images(count: int = DEFAULT_CALIBRATION_SIZE, image_size: int = 518) -> list[Image.Image]:
    """``count`` built-in synthetic textures at ``image_size``: three good images for one defective.

    Deterministic (fixed seed), cycling over every available texture category and defect type.
    """
    categories = available_categories()
    images = []
    for index in range(count):
        category = categories[index % len(categories)]
        stream = DEFECT_TYPES[(index // 4) % len(DEFECT_TYPES)] if index % 4 == 3 else "train/good"
        _, image, _ = synthesize_sample(category, stream, index, image_size=image_size, seed=SYNTHETIC_SEED)
        images.append(Image.fromarray(image))
    return images


def calibration_pixels(backbone: ClipBackbone, images: Sequence[Image.Image], image_size: int) -> list[np.ndarray]:
    """Each image preprocessed as in serving: a list of (1, 3, S, S) float32 arrays."""
    if not images:
        raise CalibrationDataError("int8 calibration needs at least one image")
    return [backbone.preprocess([image], image_size).cpu().numpy() for image in images]


def pixels_digest(pixels: Sequence[np.ndarray]) -> str:
    """sha256 of a calibration set (after preprocessing): part of the int8 IR's cache key."""
    digest = hashlib.sha256()
    for array in pixels:
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
    return digest.hexdigest()


def quantize_int8(model: Any, pixels: Sequence[np.ndarray]) -> Any:
    """NNCF post-training int8 quantization of an fp32 ``openvino.Model``.

    Transformer preset (``ModelType.TRANSFORMER``: mixed symmetric / asymmetric activations,
    SmoothQuant, fast bias correction), statistics from every image in ``pixels``.

    Raises:
        RuntimeExportError: NNCF failed.
    """
    import nncf

    start = time.perf_counter()
    log.info("quantizing the vision tower to int8 on %d calibration images", len(pixels))
    try:
        quantized = nncf.quantize(
            model,
            nncf.Dataset(list(pixels)),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(pixels),
        )
    except Exception as error:  # NNCF raises many types
        raise RuntimeExportError(
            f"int8 quantization (NNCF) failed: {type(error).__name__}: {error}. "
            "Use GENCLIP_PRECISION=fp32 meanwhile."
        ) from error
    log.info("quantized in %.1f s", time.perf_counter() - start)
    return quantized
