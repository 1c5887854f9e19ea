"""The maths-side contracts between detectors, training and the wrapper that serves them.

A scorer turns one vision forward pass (``VisualFeatures``) into smoothed anomaly maps at
the model's input size, image scores and the class label it used. Keeping scorers on
features (not pixels) lets an ensemble share a single vision pass.

A *trainable* scorer (:class:`TrainableScorer`: GenCLIP, ViP2-CLIP) adds what training and
prompt checkpoints need: a config dataclass stored whole in the checkpoint sidecar, a
training pass (:meth:`TrainableScorer.forward_train`), Adam parameter groups for a learning
rate (:meth:`TrainableScorer.parameter_groups`) and the tensors a checkpoint holds.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from model.backbone import ClipBackbone, VisualFeatures

# Gaussian sigma of the common-ground map smoothing at 518 px (DESIGN.md 2).
DEFAULT_SMOOTHING_SIGMA = 4.0


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


@dataclass
class TrainingOutputs:
    """What the losses need from one training pass.

    Attributes:
        layer_probabilities: one (B, 2, S, S) [normal, abnormal] probability map per map the
            detector trains (upsampled to the input size S).
        image_logits: (B, 2) image-level [normal, abnormal] logits.
    """

    layer_probabilities: list[torch.Tensor]
    image_logits: torch.Tensor


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

    @property
    def smoothing_sigma(self) -> float:
        """Gaussian sigma at 518 px this scorer smooths its maps with (``finalize_maps``).

        The few-shot map is smoothed with it too, so both fused maps have the same blur.
        Scorers with their own sigma override this.
        """
        return DEFAULT_SMOOTHING_SIGMA

    def score_pixels(self, pixels: torch.Tensor, class_names: Sequence[str | None]) -> BatchScores:
        """Vision pass + scoring. pixels: (B, 3, S, S) normalised."""
        return self.score_features(self.backbone.encode_image(pixels, self.layers), class_names)


class TrainableScorer(AnomalyScorer, ABC):
    """A scorer with learned prompts on a frozen backbone.

    Subclasses set ``name`` and ``config_class`` (a frozen dataclass whose fields are the
    detector's whole configuration: prompt sizes and inference options), and implement
    :meth:`forward_train` and :meth:`parameter_groups`. ``our_reading`` names the parts of
    the method that are this project's reading rather than published fact; it is written
    into every checkpoint sidecar.

    Checkpoints hold :meth:`prompt_state_dict`: every parameter and persistent buffer outside
    the frozen backbone.
    """

    config_class: ClassVar[type]
    our_reading: ClassVar[dict[str, str]] = {}

    def __init__(self, backbone: ClipBackbone, layers: Sequence[int], image_size: int, config: Any) -> None:
        super().__init__(backbone, layers, image_size)
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    @property
    def profile(self) -> str:
        """Which behaviour set this instance follows (recorded in checkpoints)."""
        return self.name

    @abstractmethod
    def forward_train(self, pixels: torch.Tensor, class_names: Sequence[str | None]) -> TrainingOutputs:
        """Training pass.

        Args:
            pixels: (B, 3, S, S) normalised images.
            class_names: B product names (``None`` = unknown).
        """

    @abstractmethod
    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """Adam parameter groups (``{"params": [...], "lr": ...}``) for base learning rate ``lr``;
        together they hold every parameter of :meth:`prompt_parameters` exactly once."""

    def prompt_parameters(self) -> list[nn.Parameter]:
        """Parameters that training updates (the backbone's are frozen)."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def prompt_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: every parameter and persistent buffer outside the backbone."""
        return {
            name: tensor.detach().cpu().contiguous()
            for name, tensor in self.state_dict().items()
            if not name.startswith("backbone.")
        }

    def config_dict(self) -> dict[str, Any]:
        """The whole config as plain JSON values."""
        return dataclasses.asdict(self.config)

    def checkpoint_metadata(self) -> dict[str, Any]:
        """Sidecar fields describing this scorer (the backbone's are added by the caller)."""
        return {
            "detector": self.name,
            "profile": self.profile,
            "layers": list(self.layers),
            "image_size": self.image_size,
            "detector_config": self.config_dict(),
            "our_reading": dict(self.our_reading),
        }
