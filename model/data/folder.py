"""Reader for a user's own images in a plain folder layout.

Layout::

    <root>/good/*.{png,jpg,jpeg,bmp,tif,tiff}       # defect-free images
    <root>/<defect>/*                               # one folder per defect type
    <root>/ground_truth/<defect>/<stem>_mask.png    # optional masks, or <stem>.<any image ext>

Unlike MVTec AD, masks are optional: a defect image without one gets ``mask_path=None``
and training uses the image-level loss only for it. Every image is one category, named
after the root folder unless told otherwise.
"""

from __future__ import annotations

from pathlib import Path

from model.data.errors import DatasetError
from model.data.sample import GOOD_DEFECT, IMAGE_EXTENSIONS, InspectionSample, list_image_files

GROUND_TRUTH_FOLDER = "ground_truth"


def _find_mask(mask_dir: Path, image_path: Path) -> Path | None:
    """The mask for ``image_path`` in ``mask_dir``: ``<stem>_mask.png`` first, then
    ``<stem>.<ext>`` for any image extension (sorted, so the choice is stable)."""
    preferred = mask_dir / f"{image_path.stem}_mask.png"
    if preferred.is_file():
        return preferred
    for extension in sorted(IMAGE_EXTENSIONS):
        for suffix in (extension, extension.upper()):
            candidate = mask_dir / f"{image_path.stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def read_folder(root: str | Path, category: str | None = None) -> list[InspectionSample]:
    """List the samples of a folder-layout data set.

    Args:
        root: folder holding ``good/`` and/or one folder per defect type.
        category: class name given to every sample; defaults to the root folder's name.

    Returns:
        Samples sorted by defect (``good`` included), then file name.

    Raises:
        DatasetError: the root is missing, holds neither ``good/`` nor defect folders, or
            holds no image at all. The message names the path.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("data set root not found", root)
    category = category or root.resolve().name
    defect_dirs = sorted(
        (child for child in root.iterdir()
         if child.is_dir() and not child.name.startswith(".") and child.name != GROUND_TRUTH_FOLDER),
        key=lambda p: p.name,
    )
    if not defect_dirs:
        raise DatasetError("expected <root>/good/ and/or <root>/<defect>/ image folders under", root)

    samples: list[InspectionSample] = []
    for defect_dir in defect_dirs:
        defect = defect_dir.name
        is_anomalous = defect != GOOD_DEFECT
        mask_dir = root / GROUND_TRUTH_FOLDER / defect
        for image_path in list_image_files(defect_dir):
            mask_path = _find_mask(mask_dir, image_path) if is_anomalous and mask_dir.is_dir() else None
            samples.append(InspectionSample(image_path, category, defect, is_anomalous, mask_path))
    if not samples:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DatasetError(f"no image files ({extensions}) in the good/ or defect folders of", root)
    return samples
