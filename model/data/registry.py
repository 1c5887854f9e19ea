"""One entry point for every data-set kind: ``read_dataset(kind, root)``.

The CLI, training and evaluation pick a reader by name through this module, so adding a
layout means one entry in :data:`_READERS`, not an ``if`` chain in each caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from model.data.errors import DatasetError
from model.data.folder import read_folder
from model.data.mvtec import read_mvtec
from model.data.sample import InspectionSample
from model.data.synthetic import generate_synthetic_dataset
from model.data.visa import read_visa

Reader = Callable[[Path, list[str] | None, str], list[InspectionSample]]


def _read_folder_kind(root: Path, categories: list[str] | None, split: str) -> list[InspectionSample]:
    if split != "test":
        raise DatasetError(f"the folder layout has no {split!r} split (only 'test') at", root)
    if categories is not None and len(categories) != 1:
        raise DatasetError("the folder layout holds one category; pass at most one name for", root)
    return read_folder(root, category=categories[0] if categories else None)


def _read_synthetic_kind(root: Path, categories: list[str] | None, split: str) -> list[InspectionSample]:
    # Generate only into a missing or empty folder: never overwrite what a user put there.
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        generate_synthetic_dataset(root)
    return read_mvtec(root, categories, split)


_READERS: dict[str, Reader] = {
    "mvtec": read_mvtec,
    "visa": read_visa,
    "folder": _read_folder_kind,
    "synthetic": _read_synthetic_kind,
}
DATASET_KINDS: tuple[str, ...] = tuple(_READERS)


def read_dataset(
    kind: str,
    root: str | Path,
    categories: Iterable[str] | None = None,
    split: str = "test",
) -> list[InspectionSample]:
    """List the samples of a data set of the given kind.

    Args:
        kind: one of :data:`DATASET_KINDS`: ``mvtec``, ``visa``, ``folder`` (a user's
            ``good/`` + ``<defect>/`` folders) or ``synthetic`` (generated into ``root``
            when it is missing or empty, then read as MVTec AD).
        root: data-set folder.
        categories: categories to read (a single name is accepted too); ``None`` reads
            all. For ``folder``, at most one name, used as the class name.
        split: ``"test"`` or ``"train"`` (``folder`` only has ``"test"``).

    Returns:
        The samples, see the kind's reader for the order.

    Raises:
        DatasetError: unknown kind (the message lists the kinds) or any reader error.
    """
    if kind not in _READERS:
        raise DatasetError(f"unknown data set kind {kind!r}; known kinds: {', '.join(DATASET_KINDS)}")
    selected = [categories] if isinstance(categories, str) else (list(categories) if categories is not None else None)
    return _READERS[kind](Path(root), selected, split)
