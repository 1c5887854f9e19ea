"""Build a ready detector from configuration: backbone + scorer + checkpoint, checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from model.backbone import ClipBackbone, default_layers, load_backbone
from model.checkpoint import check_compatible, read_checkpoint, load_prompt_tensors
from model.errors import CheckpointError, DetectorConfigError, UnknownDetectorError, VisionRuntimeError
from model.runtime import PRECISIONS, RUNTIMES
from model.runtime.calibration import DEFAULT_CALIBRATION_SIZE
from model.scorer_detector import ScorerDetector
from model.scorer_registry import DETECTOR_NAMES, create_scorer
from model.scoring import AnomalyScorer, TrainableScorer
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
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``... With the
            OpenVINO runtime everything runs on the CPU (``auto`` means ``cpu``).
        runtime: what runs the vision tower: ``torch`` or ``openvino`` (an IR exported at the
            serving resolution, cached in ``runtime_cache_dir``).
        precision: ``fp32``, or ``int8`` (OpenVINO only: NNCF post-training quantization).
        runtime_cache_dir: OpenVINO IR cache folder; ``None``: ``~/.cache/genclip/openvino``.
        calibration_images: int8: folder of images to calibrate on (a product's good photos);
            ``None``: the built-in synthetic textures.
        calibration_photos: int8: images to calibrate on, in memory (e.g. a product's good
            photos read by the service); they take precedence over ``calibration_images``.
        calibration_size: int8: how many images to calibrate on (spread over the folder).
        threads: CPU inference threads of the OpenVINO runtime (``None``: one per core).
    """

    detector: str = "auto"
    backbone: BackboneSpec = field(default_factory=BackboneSpec)
    checkpoint: Path | None = None
    vip2clip_checkpoint: Path | None = None
    image_size: int | None = None
    layers: tuple[int, ...] | None = None
    device: str = "auto"
    runtime: str = "torch"
    precision: str = "fp32"
    runtime_cache_dir: Path | None = None
    calibration_images: Path | None = None
    calibration_photos: tuple[Image.Image, ...] | None = None
    calibration_size: int = DEFAULT_CALIBRATION_SIZE
    threads: int | None = None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_runtime(config: DetectorConfig) -> None:
    """Reject runtime / precision / device combinations that cannot run.

    Raises:
        VisionRuntimeError: unknown runtime or precision, int8 without OpenVINO, OpenVINO on a GPU.
    """
    if config.runtime not in RUNTIMES:
        raise VisionRuntimeError(f"Unknown runtime {config.runtime!r}; choose one of {RUNTIMES}")
    if config.precision not in PRECISIONS:
        raise VisionRuntimeError(f"Unknown precision {config.precision!r}; choose one of {PRECISIONS}")
    if config.precision == "int8" and config.runtime != "openvino":
        raise VisionRuntimeError("GENCLIP_PRECISION=int8 needs GENCLIP_RUNTIME=openvino")
    if config.runtime == "openvino" and config.device not in ("auto", "cpu"):
        raise VisionRuntimeError(
            f"GENCLIP_RUNTIME=openvino runs on the CPU: set GENCLIP_DEVICE=cpu (or auto), not {config.device!r}"
        )


def attach_runtime(config: DetectorConfig, scorer: AnomalyScorer) -> AnomalyScorer:
    """Run ``scorer``'s vision passes in the configured runtime (torch: nothing to do)."""
    if config.runtime == "torch":
        return scorer
    from model.runtime.calibration import evenly_spaced, read_calibration_folder
    from model.runtime.openvino_runtime import load_openvino_runtime, require_openvino

    require_openvino()  # before reading calibration images: the missing extra is the first thing to say
    images = None
    if config.precision == "int8" and config.calibration_photos:
        images = evenly_spaced(list(config.calibration_photos), config.calibration_size)
    elif config.precision == "int8" and config.calibration_images is not None:
        images = read_calibration_folder(config.calibration_images, config.calibration_size)
    runtime = load_openvino_runtime(
        scorer.backbone,
        scorer.image_size,
        scorer.layers,
        config.precision,
        cache_dir=config.runtime_cache_dir,
        calibration_images=images,
        calibration_size=config.calibration_size,
        threads=config.threads,
        attach=True,  # sets the runtime and frees the torch vision blocks before compiling
    )
    assert scorer.backbone.vision_runtime is runtime
    return scorer


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
) -> tuple[TrainableScorer, str]:
    """A trained scorer with its prompts loaded and checked; returns (scorer, digest).

    The scorer is rebuilt from the sidecar's ``detector_config`` strictly (an unknown or
    missing key is an error naming it), so every profile (``vip2clip``, ``vip2clip-official``,
    ``genclip``) loads through this one path.
    """
    if checkpoint_path is None:
        variable = "GENCLIP_CHECKPOINT" if name == "genclip" else "GENCLIP_VIP2CLIP_CHECKPOINT"
        raise CheckpointError(
            f"The {name} detector needs trained prompts: set {variable} to a checkpoint in weights/ "
            "(untrained prompts are never served)."
        )
    checkpoint = read_checkpoint(checkpoint_path)
    check_compatible(checkpoint, backbone, name)
    try:
        scorer = create_scorer(
            name, backbone, checkpoint.layers, image_size or checkpoint.image_size, checkpoint.detector_config, strict=True
        )
    except DetectorConfigError as error:
        raise CheckpointError(f"Checkpoint {checkpoint.path}: sidecar {error}") from error
    assert isinstance(scorer, TrainableScorer)
    if scorer.profile != checkpoint.profile:
        raise CheckpointError(
            f"Checkpoint {checkpoint.path}: the sidecar says profile {checkpoint.profile!r} but its "
            f"detector_config describes {scorer.profile!r}"
        )
    scorer.to(backbone.device)
    load_prompt_tensors(scorer, checkpoint, scorer.prompt_state_dict())
    return scorer, checkpoint.digest


def build_detector(config: DetectorConfig) -> ScorerDetector:
    """Load the backbone, the scorer(s) and checkpoint(s) named by ``config``.

    Raises:
        WeightsNotFoundError / WeightsFormatError: backbone weights missing or unloadable.
        CheckpointError: a checkpoint is missing, malformed or trained for another setting.
        UnknownDetectorError: ``config.detector`` is not a known name.
        VisionRuntimeError: the runtime cannot run (OpenVINO missing, export failed...).
    """
    name = _detector_name(config)
    check_runtime(config)
    device = "cpu" if config.runtime == "openvino" else config.device
    backbone = load_backbone(config.backbone, resolve_device(device))
    if name == "baseline":
        layers = config.layers or default_layers(backbone.num_blocks)
        scorer = create_scorer("baseline", backbone, layers, config.image_size or default_image_size(backbone))
        return ScorerDetector(attach_runtime(config, scorer.to(backbone.device)))
    if name == "ensemble":
        from model.ensemble import EnsembleScorer

        genclip, genclip_digest = load_trained_scorer("genclip", config.checkpoint, backbone, config.image_size)
        vip2clip, vip2clip_digest = load_trained_scorer(
            "vip2clip", config.vip2clip_checkpoint, backbone, config.image_size or genclip.image_size
        )
        ensemble = attach_runtime(config, EnsembleScorer([genclip, vip2clip]))
        return ScorerDetector(ensemble, f"{genclip_digest}+{vip2clip_digest}")
    path = config.checkpoint if name == "genclip" else config.vip2clip_checkpoint
    scorer, digest = load_trained_scorer(name, path, backbone, config.image_size)
    return ScorerDetector(attach_runtime(config, scorer), digest)
