"""Data-set readers (MVTec AD, VisA, plain folders), loaders and a synthetic generator.

Readers list :class:`InspectionSample` records without decoding any pixel; decode with
:func:`load_image` / :func:`load_mask`. Every data problem raises :class:`DatasetError`
naming the path at fault.
"""

from model.data.errors import DatasetError
from model.data.folder import read_folder
from model.data.mvtec import read_mvtec
from model.data.registry import DATASET_KINDS, read_dataset
from model.data.sample import GOOD_DEFECT, IMAGE_EXTENSIONS, InspectionSample, load_image, load_mask
from model.data.synthetic import DEFECT_TYPES, generate_synthetic_dataset
from model.data.visa import read_visa

__all__ = [
    "DATASET_KINDS",
    "DEFECT_TYPES",
    "GOOD_DEFECT",
    "IMAGE_EXTENSIONS",
    "DatasetError",
    "InspectionSample",
    "generate_synthetic_dataset",
    "load_image",
    "load_mask",
    "read_dataset",
    "read_folder",
    "read_mvtec",
    "read_visa",
]
