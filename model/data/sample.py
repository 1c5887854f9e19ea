"""What every reader returns, and the two loaders that turn it into arrays.

A reader only lists files; it never decodes them. Decoding happens later, one sample at a
time, through :func:`load_image` and :func:`load_mask`, so listing a 10k-image data set is
cheap and memory stays flat.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from model.data.errors import DatasetError

GOOD_DEFECT = "good"
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

# Pillow raises a zoo of types for broken files: OSError for truncated or unknown data,
# SyntaxError from some plugins' header parsers, ValueError/struct errors from others.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class InspectionSample:
    """One image to inspect, with its ground truth.

    Attributes:
        image_path: the image file.
        category: product name (``bottle``, ``pcb1``, ...), the class name a detector gets.
        defect: defect type folder name; ``good`` for defect-free images.
        is_anomalous: image-level label (``defect != "good"`` for MVTec-style layouts).
        mask_path: pixel ground truth (values > 0 are anomalous), or ``None`` when the image
            is good or when no mask exists (then only the image-level label is known).
    """

    image_path: Path
    category: str
    defect: str
    is_anomalous: bool
    mask_path: Path | None


def is_image_file(path: Path) -> bool:
    """Whether ``path`` is a visible regular file with a known image extension."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def list_image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (stable sample order)."""
    return sorted((path for path in folder.iterdir() if is_image_file(path)), key=lambda p: p.name)


def _open_decoded(path: str | Path) -> Image.Image:
    """Open and fully decode ``path``; any failure becomes a :class:`DatasetError`."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError("image file not found", path)
    try:
        with Image.open(path) as image:
            # Image.open is lazy: a truncated file only fails when pixels are read, so
            # force it here, where the error can still name the file.
            image.load()
    except _DECODE_ERRORS as error:
        raise DatasetError(f"cannot decode image ({type(error).__name__}: {error})", path) from error
    return image


def load_image(path: str | Path) -> Image.Image:
    """Decode an image file as RGB.

    Args:
        path: image file.

    Returns:
        A decoded RGB :class:`PIL.Image.Image` (grayscale and palette files are converted).

    Raises:
        DatasetError: the file is missing, unreadable or corrupt (the message names it).
    """
    image = _open_decoded(path)
    return image if image.mode == "RGB" else image.convert("RGB")


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a ground-truth mask.

    Args:
        path: mask file; any pixel value > 0 (in any channel) is anomalous, so both 0/255
            masks (MVTec AD) and 0/1 masks (VisA) work.
        size: ``(height, width)`` of the returned array, i.e. numpy order, *not* PIL's
            ``(width, height)``. ``None`` keeps the file's size. Resizing uses
            nearest-neighbour so the mask stays binary and no new pixels appear.

    Returns:
        Boolean array of shape ``(H, W)``.

    Raises:
        DatasetError: the file is missing, unreadable or corrupt (the message names it).
    """
    image = _open_decoded(path)
    if size is not None:
        height, width = size
        if (width, height) != image.size:
            image = image.resize((width, height), Image.Resampling.NEAREST)
    if image.mode == "P":
        # A palette index of 0 need not be black; read the colours, not the indices.
        image = image.convert("RGB")
    values = np.asarray(image)
    if values.ndim == 3:
        return np.any(values > 0, axis=-1)
    return values > 0
