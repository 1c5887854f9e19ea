"""Reader for the VisA layout, driven by its split file.

Layout (the official ``1cls`` split)::

    <root>/split_csv/1cls.csv        # columns: object,split,label,image,mask
    <root>/<object>/Data/Images/{Normal,Anomaly}/*.JPG
    <root>/<object>/Data/Masks/Anomaly/*.png

``label`` is ``normal`` or ``anomaly``; ``image`` and ``mask`` are relative to ``<root>``;
``mask`` is empty for normal rows. VisA masks hold 0/1 values, which :func:`load_mask`
reads correctly (any value > 0 is anomalous). VisA has no defect-type folders, so the
defect is ``good`` for normal rows and ``anomaly`` otherwise.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

from model.data.errors import DatasetError
from model.data.mvtec import select_categories
from model.data.sample import GOOD_DEFECT, InspectionSample

VISA_SPLIT_FILE = Path("split_csv") / "1cls.csv"
VISA_COLUMNS: tuple[str, ...] = ("object", "split", "label", "image", "mask")
VISA_ANOMALY_DEFECT = "anomaly"
_LABELS = {"normal": False, "anomaly": True}


def read_visa(
    root: str | Path,
    categories: Iterable[str] | None = None,
    split: str | None = "test",
) -> list[InspectionSample]:
    """List the samples of a VisA data set.

    Args:
        root: folder holding ``split_csv/1cls.csv`` and the object folders.
        categories: objects to read (a single name is accepted too); ``None`` reads all.
        split: ``"test"``, ``"train"``, or ``None`` for every row.

    Returns:
        Samples in the order of the csv file.

    Raises:
        DatasetError: the root or csv is missing, the csv lacks a column or has an unknown
            label, a referenced image or mask is missing, an anomaly row has no mask, or a
            requested category is unknown. The message names the path.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("data set root not found", root)
    csv_path = root / VISA_SPLIT_FILE
    if not csv_path.is_file():
        raise DatasetError("does not look like VisA: split file not found", csv_path)

    with csv_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in VISA_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"split file lacks column(s) {', '.join(missing)}", csv_path)
        rows = list(reader)

    available = sorted({row["object"] for row in rows})
    wanted = set(select_categories(available, categories, csv_path))

    samples: list[InspectionSample] = []
    for line_number, row in enumerate(rows, start=2):  # line 1 is the header
        if row["object"] not in wanted or (split is not None and row["split"] != split):
            continue
        where = f"{csv_path}:{line_number}"
        label = row["label"].strip().lower()
        if label not in _LABELS:
            raise DatasetError(f"unknown label {row['label']!r} (expected normal/anomaly) at", where)
        is_anomalous = _LABELS[label]
        image_path = root / row["image"].strip()
        if not image_path.is_file():
            raise DatasetError(f"image listed at {where} not found", image_path)
        mask_path: Path | None = None
        mask_field = (row["mask"] or "").strip()
        if is_anomalous:
            if not mask_field:
                raise DatasetError("anomaly row has an empty mask column at", where)
            mask_path = root / mask_field
            if not mask_path.is_file():
                raise DatasetError(f"mask listed at {where} not found", mask_path)
        defect = VISA_ANOMALY_DEFECT if is_anomalous else GOOD_DEFECT
        samples.append(InspectionSample(image_path, row["object"], defect, is_anomalous, mask_path))
    return samples
