"""The one interface every consumer of the model uses.

A detector takes a batch of PIL images (any sizes, any modes) and optional class names and
returns one :class:`Inspection` per image. Everything downstream (CLI, evaluation, the HTTP
service) talks to this protocol only; prompt internals stay behind it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

OBJECT_LABEL = "object"


@dataclass(frozen=True)
class DetectorIdentity:
    """What is running: reported by the CLI, the evaluation report and every HTTP response.

    Attributes:
        name: detector name (``genclip``, ``vip2clip``, ``baseline``, ``ensemble``).
        backbone: open_clip model name, e.g. ``ViT-L-14-336``.
        backbone_weights: where the backbone weights came from (``openai``, a file path,
            or ``random`` for untrained weights, which are never a quality claim).
        layers: 1-based transformer blocks whose patch tokens are tapped.
        image_size: side of the square model input in pixels.
        checkpoint: sha256 hex digest of the prompt checkpoint, or ``None`` (training-free).
    """

    name: str
    backbone: str
    backbone_weights: str
    layers: tuple[int, ...]
    image_size: int
    checkpoint: str | None = None

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["layers"] = list(self.layers)
        return data


@dataclass
class Inspection:
    """The result for one image.

    Attributes:
        score: image-level anomaly score in [0, 1].
        anomaly_map: float32 array (H, W) in [0, 1] at the *input image's* resolution.
        class_label: the class name actually used after Class Name Filtering, or ``object``.
        component_scores: per-detector scores when several detectors are fused (ensemble).
    """

    score: float
    anomaly_map: np.ndarray
    class_label: str
    component_scores: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Detector(Protocol):
    """Batch anomaly detector."""

    @property
    def identity(self) -> DetectorIdentity: ...

    def inspect(
        self,
        images: Sequence[Image.Image],
        class_names: Sequence[str | None] | None = None,
    ) -> list[Inspection]:
        """Score a batch.

        Args:
            images: B PIL images of any size and mode.
            class_names: B optional product names (``None`` entries mean unknown).

        Returns:
            B inspections, in input order; each map is (H_i, W_i) of image i.
        """
        ...
