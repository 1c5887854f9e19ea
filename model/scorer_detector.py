"""Adapts an :class:`AnomalyScorer` to the :class:`Detector` interface.

Handles what the maths should not: PIL in, preprocessing, no-grad inference, fp16 autocast
on CUDA, and resizing each map back to its image's own resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from model.anomaly_maps import upsample
from model.detector import DetectorIdentity, Inspection
from model.scoring import AnomalyScorer


class ScorerDetector:
    """A ready-to-serve detector around one scorer (frozen, eval mode)."""

    def __init__(self, scorer: AnomalyScorer, checkpoint_digest: str | None = None, fp16_on_cuda: bool = True) -> None:
        self.scorer = scorer.eval()
        self.fp16 = fp16_on_cuda and scorer.backbone.device.type == "cuda"
        backbone = scorer.backbone
        self._identity = DetectorIdentity(
            name=scorer.name,
            backbone=backbone.model_name,
            backbone_weights=backbone.weights_label,
            layers=scorer.layers,
            image_size=scorer.image_size,
            checkpoint=checkpoint_digest,
        )

    @property
    def identity(self) -> DetectorIdentity:
        return self._identity

    @property
    def device(self) -> torch.device:
        return self.scorer.backbone.device

    @torch.inference_mode()
    def inspect(
        self,
        images: Sequence[Image.Image],
        class_names: Sequence[str | None] | None = None,
    ) -> list[Inspection]:
        if not images:
            return []
        names = list(class_names) if class_names is not None else [None] * len(images)
        if len(names) != len(images):
            raise ValueError(f"{len(images)} images but {len(names)} class names")
        pixels = self.scorer.backbone.preprocess(images, self.scorer.image_size)
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=self.fp16):
            result = self.scorer.score_pixels(pixels, names)
        maps = result.maps.float()
        scores = result.scores.float().cpu().tolist()
        inspections = []
        for index, image in enumerate(images):
            width, height = image.size
            full = upsample(maps[index : index + 1], (height, width))[0].clamp_(0.0, 1.0)
            inspections.append(
                Inspection(
                    score=float(scores[index]),
                    anomaly_map=full.cpu().numpy().astype(np.float32, copy=False),
                    class_label=result.class_labels[index],
                    component_scores=result.component_scores[index] if result.component_scores else {},
                )
            )
        return inspections
