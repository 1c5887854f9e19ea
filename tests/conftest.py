"""Shared fixtures: the tiny random backbone (built once) and small images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from model.backbone import ClipBackbone, load_backbone
from model.weights_source import TINY_MODEL_NAME, BackboneSpec

TINY_SPEC = BackboneSpec(TINY_MODEL_NAME, "random")


@pytest.fixture(scope="session")
def tiny_backbone() -> ClipBackbone:
    torch.manual_seed(0)
    return load_backbone(TINY_SPEC)


@pytest.fixture
def random_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (33, 47, 3), dtype=np.uint8)),
    ]
