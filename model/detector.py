"""The one interface every consumer of the model uses.

A detector takes a batch of PIL images (any sizes, any modes) and optional class names and
returns one :class:`Inspection` per image. Everything downstream (CLI, evaluation, the HTTP
service) talks to this protocol only; prompt internals stay behind it.

A product's few-shot reference (a bank of good patches, :mod:`model.fewshot`) is built through
the same interface (:meth:`Detector.build_reference`) and passed back per image at inspection
(:class:`FewShotReference`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from model.fewshot import ReferenceBank, ReferenceBuild, ReferenceConfig

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
        runtime: what ran the vision tower: ``torch`` or ``openvino``.
        precision: its arithmetic: ``fp32``, ``int8`` (OpenVINO) or ``fp16`` (torch autocast on CUDA).
    """

    name: str
    backbone: str
    backbone_weights: str
    layers: tuple[int, ...]
    image_size: int
    checkpoint: str | None = None
    runtime: str = "torch"
    precision: str = "fp32"

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["layers"] = list(self.layers)
        return data


@dataclass(frozen=True)
class FewShotReference:
    """A product's good-patch bank and the weight it is fused with.

    Attributes:
        bank: the product's reference bank (built by :meth:`Detector.build_reference`).
        weight: ``w`` in ``fused = (1 - w) * zero_shot + w * few_shot`` (maps and scores);
            use the weight the bank was calibrated with, or its thresholds do not apply.
    """

    bank: ReferenceBank
    weight: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ValueError(f"fusion weight must lie in [0, 1], got {self.weight}")


@dataclass
class Inspection:
    """The result for one image.

    Attributes:
        score: image-level anomaly score in [0, 1].
        anomaly_map: float32 array (H, W) in [0, 1] at the *input image's* resolution.
        class_label: the class name actually used after Class Name Filtering, or ``object``.
        component_scores: per-detector scores when several detectors are fused (ensemble),
            plus ``zero_shot`` and ``few_shot`` when a reference was fused in.
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
        references: Sequence[FewShotReference | None] | None = None,
        map_size: int | None = None,
    ) -> list[Inspection]:
        """Score a batch.

        Args:
            images: B PIL images of any size and mode.
            class_names: B optional product names (``None`` entries mean unknown).
            references: B optional few-shot references (``None`` entries: zero-shot only).
                Different images may carry different banks.
            map_size: return every map as (map_size, map_size), taken from the model's square
                map directly (evaluation: masks are compared on that grid), instead of
                (H_i, W_i); ``None``: the image's size.

        Returns:
            B inspections, in input order; each map is (H_i, W_i) of image i (or
            (map_size, map_size)). A referenced
            image's map and score are the fused ones, and its ``component_scores`` gain
            ``{"zero_shot": s0, "few_shot": s1}``.

        Raises:
            ReferenceMismatchError: a bank built for another detector setting (before any work).
        """
        ...

    def build_reference(
        self,
        images: Sequence[Image.Image],
        class_names: Sequence[str | None] | None = None,
        *,
        config: ReferenceConfig = ReferenceConfig(),
        progress: Callable[[int, int], None] | None = None,
    ) -> ReferenceBuild:
        """Build a product's bank from good images and calibrate its thresholds.

        One vision pass per good image (batched); the bank keeps the tapped layers' patch
        tokens (coreset-capped); both thresholds are calibrated leave-one-out on the fused
        outputs at ``config.fusion_weight``; ``progress(done, total)`` follows the images.

        Raises:
            ReferenceError: fewer than two images.
        """
        ...
