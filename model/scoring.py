"""The maths-side contract between detectors and the wrapper that serves them.

A scorer turns one vision forward pass (``VisualFeatures``) into smoothed anomaly maps at
the model's input size, image scores and the class label it used. Keeping scorers on
features (not pixels) lets an ensemble share a single vision pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from model.backbone import ClipBackbone, VisualFeatures


@dataclass
class BatchScores:
    """Scores for B images.

    Attributes:
        maps: (B, S, S) smoothed anomaly maps in [0, 1] at the model input size S.
        scores: (B,) image scores in [0, 1].
        class_labels: B names actually used (after class-name filtering) or ``object``.
        component_scores: B dicts of per-detector scores (ensembles), else empty dicts.
    """

    maps: torch.Tensor
    scores: torch.Tensor
    class_labels: list[str]
    component_scores: list[dict[str, float]] = field(default_factory=list)


class AnomalyScorer(nn.Module):
    """Base class: a detector's maths on top of a frozen :class:`ClipBackbone`."""

    name: str = "scorer"

    def __init__(self, backbone: ClipBackbone, layers: Sequence[int], image_size: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.layers = tuple(sorted({int(layer) for layer in layers}))
        self.image_size = int(image_size)

    def score_features(
        self, features: VisualFeatures, class_names: Sequence[str | None]
    ) -> BatchScores:  # pragma: no cover - abstract
        raise NotImplementedError

    def score_pixels(self, pixels: torch.Tensor, class_names: Sequence[str | None]) -> BatchScores:
        """Vision pass + scoring. pixels: (B, 3, S, S) normalised."""
        return self.score_features(self.backbone.encode_image(pixels, self.layers), class_names)

    def prompt_parameters(self) -> list[nn.Parameter]:
        """Parameters that training updates (the backbone's are frozen)."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the learned prompt tensors: what a checkpoint stores."""
        trainable = {name for name, parameter in self.named_parameters() if parameter.requires_grad}
        return {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items() if name in trainable}

    def prompt_sizes(self) -> dict[str, int]:
        """Hyper-parameters that shape the prompt tensors (recorded in checkpoints)."""
        return {}
