"""Build a ready detector from configuration: backbone + scorer + checkpoint, checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from model.backbone import ClipBackbone, default_layers, load_backbone
from model.checkpoint import check_compatible, read_checkpoint, load_prompt_tensors
from model.errors import CheckpointError, UnknownDetectorError
from model.scorer_detector import ScorerDetector
from model.scorer_registry import DETECTOR_NAMES, create_scorer
from model.scoring import AnomalyScorer
from model.weights_source import TINY_MODEL_NAME, BackboneSpec

REFERENCE_IMAGE_SIZE = 518

__all__ = ["BackboneSpec", "DetectorConfig", "build_detector", "resolve_device", "default_image_size"]


@dataclass(frozen=True)
class DetectorConfig:
    """Everything needed to build a detector.

    Attributes:
        detector: ``auto`` (GenCLIP if its checkpoint is set, else ViP2-CLIP if its checkpoint
            is set, else the training-free baseline), ``genclip``, ``vip2clip``, ``baseline``
            or ``ensemble`` (GenCLIP + ViP2-CLIP; needs both checkpoints).
        backbone: which CLIP and where its weights come from.
        checkpoint: GenCLIP prompt checkpoint (``.safetensors`` with a ``.json`` sidecar).
        vip2clip_checkpoint: ViP2-CLIP prompt checkpoint.
        image_size: model input side; ``None`` takes the checkpoint's, else 518
            (the tiny test backbone: its native 64).
        layers: 1-based tapped blocks for the baseline; ``None`` = quarter points.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``...
    """

    detector: str = "auto"
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    checkpoint: Path | None = None
    vip2clip_checkpoint: Path | None = None
    image_size: int | None = None
    layers: tuple[int, ...] | None = None
    device: str = "auto"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_image_size(backbone: ClipBackbone) -> int:
    return backbone.native_image_size if backbone.model_name == TINY_MODEL_NAME else REFERENCE_IMAGE_SIZE


def _detector_name(config: DetectorConfig) -> str:
    if config.detector not in DETECTOR_NAMES:
        raise UnknownDetectorError(f"Unknown detector {config.detector!r}; choose one of {DETECTOR_NAMES}")
    if config.detector != "auto":
        return config.detector
    if config.checkpoint is not None:
        return "genclip"
    if config.vip2clip_checkpoint is not None:
        return "vip2clip"
    return "baseline"


def load_trained_scorer(
    name: str, checkpoint_path: Path | None, backbone: ClipBackbone, image_size: int | None
) -> tuple[AnomalyScorer, str]:
    """A trained scorer with its prompts loaded and checked; returns (scorer, digest)."""
    if checkpoint_path is None:
        variable = "GENCLIP_CHECKPOINT" if name == "genclip" else "GENCLIP_VIP2CLIP_CHECKPOINT"
        raise CheckpointError(
            f"The {name} detector needs trained prompts: set {variable} to a checkpoint in weights/ "
            "(untrained prompts are never served)."
        )
    checkpoint = read_checkpoint(checkpoint_path)
    check_compatible(checkpoint, backbone, name)
    scorer = create_scorer(name, backbone, checkpoint.layers, image_size or checkpoint.image_size, checkpoint.prompt_sizes)
    scorer.to(backbone.device)
    load_prompt_tensors(scorer, checkpoint, scorer.prompt_state_dict())
    return scorer, checkpoint.digest


def build_detector(config: DetectorConfig) -> ScorerDetector:
    """Load the backbone, the scorer(s) and checkpoint(s) named by ``config``.

    Raises:
        WeightsNotFoundError / WeightsFormatError: backbone weights missing or unloadable.
        CheckpointError: a checkpoint is missing, malformed or trained for another setting.
        UnknownDetectorError: ``config.detector`` is not a known name.
    """
    name = _detector_name(config)
    backbone = load_backbone(config.backbone, resolve_device(config.device))
    if name == "baseline":
        layers = config.layers or default_layers(backbone.num_blocks)
        scorer = create_scorer("baseline", backbone, layers, config.image_size or default_image_size(backbone))
        return ScorerDetector(scorer.to(backbone.device))
    if name == "ensemble":
        from model.ensemble import EnsembleScorer

        genclip, genclip_digest = load_trained_scorer("genclip", config.checkpoint, backbone, config.image_size)
        vip2clip, vip2clip_digest = load_trained_scorer(
            "vip2clip", config.vip2clip_checkpoint, backbone, config.image_size or genclip.image_size
        )
        return ScorerDetector(EnsembleScorer([genclip, vip2clip]), f"{genclip_digest}+{vip2clip_digest}")
    path = config.checkpoint if name == "genclip" else config.vip2clip_checkpoint
    scorer, digest = load_trained_scorer(name, path, backbone, config.image_size)
    return ScorerDetector(scorer, digest)
