"""Reader for the MVTec AD folder layout.

Layout (the official archive, unchanged)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<defect>/*.png           # defect == "good" for normal images
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

Every test image outside ``good`` promises a mask; a missing one is an error rather than a
silently image-level-only sample, because pixel metrics on a half-masked set are wrong.
The synthetic generator (:mod:`model.data.synthetic`) writes this layout too.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from model.data.errors import DatasetError
from model.data.sample import GOOD_DEFECT, InspectionSample, list_image_files

MVTEC_SPLITS: tuple[str, ...] = ("train", "test")


def mvtec_mask_path(root: Path, category: str, defect: str, image_path: Path) -> Path:
    """Where the layout puts the mask of ``image_path``: ``<stem>_mask.png``."""
    return root / category / "ground_truth" / defect / f"{image_path.stem}_mask.png"


def select_categories(available: list[str], requested: Iterable[str] | None, root: Path) -> list[str]:
    """Check ``requested`` against ``available`` and return them (all when ``None``).

    Raises:
        DatasetError: a requested category does not exist (the message lists those that do).
    """
    if requested is None:
        return available
    requested = [requested] if isinstance(requested, str) else list(requested)
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise DatasetError(
            f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} "
            f"(available: {', '.join(available)}) in",
            root,
        )
    return requested


def read_mvtec(
    root: str | Path,
    categories: Iterable[str] | None = None,
    split: str = "test",
) -> list[InspectionSample]:
    """List the samples of an MVTec-AD-layout data set.

    Args:
        root: folder holding one sub-folder per category.
        categories: categories to read (a single name is accepted too); ``None`` reads
            every sub-folder that has a ``<split>/`` folder.
        split: ``"test"`` (good and defective images, with masks) or ``"train"`` (good
            images only, no masks).

    Returns:
        Samples sorted by category, then defect, then file name.

    Raises:
        DatasetError: the root is missing, holds no category, a requested category is
            unknown, or a defect image's mask file is missing. The message names the path.
    """
    if split not in MVTEC_SPLITS:
        raise ValueError(f"split must be one of {MVTEC_SPLITS}, got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("data set root not found", root)
    available = sorted(
        child.name for child in root.iterdir() if not child.name.startswith(".") and (child / split).is_dir()
    )
    if not available:
        raise DatasetError(
            f"does not look like MVTec AD: expected <root>/<category>/{split}/<defect>/ under", root
        )

    samples: list[InspectionSample] = []
    for category in select_categories(available, categories, root):
        split_dir = root / category / split
        defects = sorted(
            child.name for child in split_dir.iterdir() if child.is_dir() and not child.name.startswith(".")
        )
        for defect in defects:
            is_anomalous = defect != GOOD_DEFECT
            for image_path in list_image_files(split_dir / defect):
                mask_path = mvtec_mask_path(root, category, defect, image_path) if is_anomalous else None
                if mask_path is not None and not mask_path.is_file():
                    raise DatasetError(f"mask missing for defect image {image_path}; expected", mask_path)
                samples.append(InspectionSample(image_path, category, defect, is_anomalous, mask_path))
    return samples
