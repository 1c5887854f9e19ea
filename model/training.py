"""Prompt training on auxiliary data: frozen backbone, Adam, focal + Dice + image CE.

The loop is the same for every trainable detector (GenCLIP, ViP2-CLIP): a
:class:`model.scoring.TrainableScorer` gives ``forward_train(pixels, class_names)`` and
``parameter_groups(lr)`` (ViP2-CLIP: FGP at lr / 100). Training is resumable (a state file
beside the output, written every epoch, which records the run it belongs to: resuming another
detector, config or data is refused) and writes ``<output>.safetensors`` + ``.json`` with the
detector's whole config.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from model.backbone import ClipBackbone, default_layers
from model.checkpoint import backbone_metadata, code_version, non_finite_tensors, save_checkpoint
from model.data.sample import InspectionSample, load_image, load_mask
from model.errors import ResumeError
from model.losses import image_loss, segmentation_loss
from model.scorer_registry import TRAINABLE_DETECTORS, create_scorer
from model.scoring import TrainableScorer

log = logging.getLogger(__name__)


@dataclass
class TrainingConfig:
    """Options of one training run (defaults: the papers' settings).

    Attributes:
        detector: ``genclip`` or ``vip2clip``.
        output: checkpoint path (``.safetensors``; the sidecar goes beside it).
        epochs, batch_size, learning_rate: Adam schedule (lr 1e-3, batch 8, 10 epochs).
        image_size: training input side (518).
        layers: tapped blocks (``None``: quarter points of the backbone).
        seed: seeds Python, numpy and torch, and the data order.
        resume: continue from ``<output>.resume.pt`` when it exists.
        image_loss_weight: weight of the image-level cross-entropy.
        prompt_options: detector config fields (prompt sizes...).
        max_steps_per_epoch: cap for quick runs and tests (``None``: full epochs).
        data_description: what was trained on (kind, root, categories), for the sidecar.
        data_workers: DataLoader worker processes decoding images (0: in the main process).
    """

    detector: str = "genclip"
    output: Path = Path("weights/genclip.safetensors")
    epochs: int = 10
    batch_size: int = 8
    learning_rate: float = 1e-3
    image_size: int = 518
    layers: tuple[int, ...] | None = None
    seed: int = 0
    resume: bool = False
    image_loss_weight: float = 1.0
    prompt_options: dict[str, Any] = field(default_factory=dict)
    max_steps_per_epoch: int | None = None
    data_description: dict[str, Any] = field(default_factory=dict)
    data_workers: int = 0


@dataclass
class TrainingResult:
    """What a run produced: the checkpoint, its digest and the loss per epoch."""

    checkpoint: Path
    digest: str
    epoch_losses: list[float]
    metadata: dict[str, Any]


class InspectionDataset(Dataset):
    """Samples as tensors: normalised pixels (3, S, S), mask (S, S), has_mask, label, name."""

    def __init__(self, samples: Sequence[InspectionSample], backbone: ClipBackbone, image_size: int) -> None:
        self.samples = list(samples)
        self.image_size = image_size
        self.mean = backbone.pixel_mean.view(3, 1, 1).cpu()
        self.std = backbone.pixel_std.view(3, 1, 1).cpu()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        size = self.image_size
        image = load_image(sample.image_path).resize((size, size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        if sample.mask_path is not None:
            mask = torch.from_numpy(load_mask(sample.mask_path, (size, size)).astype(np.float32))
            has_mask = True
        else:
            mask = torch.zeros(size, size)
            has_mask = not sample.is_anomalous  # a good image's mask is known: all normal
        return {
            "pixels": (pixels - self.mean) / self.std,
            "mask": mask,
            "has_mask": has_mask,
            "label": int(sample.is_anomalous),
            "class_name": sample.category,
        }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(scorer: TrainableScorer, learning_rate: float) -> torch.optim.Optimizer:
    """Adam over the detector's parameter groups for ``learning_rate``."""
    if not isinstance(scorer, TrainableScorer):
        raise TypeError(f"{type(scorer).__name__} is not a TrainableScorer: it has nothing to train")
    return torch.optim.Adam(scorer.parameter_groups(learning_rate), lr=learning_rate)


def resume_path(output: Path) -> Path:
    return output.with_suffix(".resume.pt")


def run_identity(scorer: TrainableScorer, backbone: ClipBackbone, config: TrainingConfig, samples: int) -> dict[str, Any]:
    """What a resume state must match: the detector, its whole config, the backbone, the data
    and the optimisation settings (not the epoch count: a run may be extended)."""
    return {
        **scorer.checkpoint_metadata(),
        "backbone": backbone.model_name,
        "backbone_weights": backbone.weights_label,
        "learning_rate": config.learning_rate,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "image_loss_weight": config.image_loss_weight,
        "data": {**config.data_description, "samples": samples},
    }


def _read_resume_state(state_file: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """Load a resume state and check it belongs to this run.

    Raises:
        ResumeError: unreadable, written by another run (named field by field), or holding
            NaN / Inf.
    """
    remedy = f"delete {state_file} to start afresh, or run with the settings it was written with"
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged file
        raise ResumeError(f"Cannot read the resume state {state_file}: {error}; {remedy}") from error
    recorded = state.get("run") if isinstance(state, dict) else None
    if not isinstance(recorded, dict):
        raise ResumeError(f"{state_file} does not record which run wrote it (an older version's file); {remedy}")
    differences = [
        f"{key}: {recorded.get(key)!r} there, {value!r} now" for key, value in identity.items() if recorded.get(key) != value
    ]
    if differences:
        raise ResumeError(
            f"The resume state {state_file} belongs to a different run ({recorded.get('detector')}, "
            f"profile {recorded.get('profile')}): " + "; ".join(differences) + f". {remedy}"
        )
    broken = non_finite_tensors(state["prompts"])
    if broken:
        raise ResumeError(f"The resume state {state_file} holds NaN or Inf in {broken}; {remedy}")
    return state


def training_loss(scorer: TrainableScorer, batch: dict[str, Any], image_loss_weight: float) -> torch.Tensor:
    device = scorer.backbone.device
    outputs = scorer.forward_train(batch["pixels"].to(device), list(batch["class_name"]))
    mask = batch["mask"].to(device)
    has_mask = torch.as_tensor(batch["has_mask"], device=device)
    loss = segmentation_loss([p.float() for p in outputs.layer_probabilities], mask, has_mask)
    labels = torch.as_tensor(batch["label"], device=device, dtype=torch.long)
    return loss + image_loss_weight * image_loss(outputs.image_logits.float(), labels)


def train(
    backbone: ClipBackbone,
    samples: Sequence[InspectionSample],
    config: TrainingConfig,
    progress: bool = True,
    on_epoch_end: Callable[[int, float], None] | None = None,
    on_resume: Callable[[Path, int, list[float]], None] | None = None,
) -> TrainingResult:
    """Train prompts on ``samples`` and write the checkpoint.

    Args:
        on_epoch_end: called with (epoch, mean loss) after each epoch.
        on_resume: called with (state file, epochs already done, their losses) when
            ``config.resume`` picks up an interrupted run.

    Raises:
        ValueError: unknown detector, or no samples.
        ResumeError: ``config.resume`` and the state file belongs to another run or is damaged.
    """
    if config.detector not in TRAINABLE_DETECTORS:
        raise ValueError(f"cannot train {config.detector!r}; trainable detectors: {TRAINABLE_DETECTORS}")
    if not samples:
        raise ValueError("no training samples")
    from tqdm.auto import tqdm

    seed_everything(config.seed)
    layers = config.layers or default_layers(backbone.num_blocks)
    scorer = create_scorer(config.detector, backbone, layers, config.image_size, config.prompt_options)
    assert isinstance(scorer, TrainableScorer)
    scorer.to(backbone.device)
    optimizer = build_optimizer(scorer, config.learning_rate)
    identity = run_identity(scorer, backbone, config, len(samples))
    use_amp = backbone.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        InspectionDataset(samples, backbone, config.image_size),
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        num_workers=config.data_workers,
        pin_memory=use_amp,
        persistent_workers=config.data_workers > 0,
        drop_last=False,
    )

    epoch_losses: list[float] = []
    start_epoch = 0
    state_file = resume_path(Path(config.output))
    if config.resume and state_file.is_file():
        state = _read_resume_state(state_file, identity)
        scorer.load_state_dict(state["prompts"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        epoch_losses = list(state["epoch_losses"])
        start_epoch = int(state["epoch"])
        log.info("resuming %s from epoch %d", state_file, start_epoch)
        if on_resume is not None:
            on_resume(state_file, start_epoch, list(epoch_losses))

    started = time.time()
    for epoch in range(start_epoch, config.epochs):
        scorer.train()
        total, count = 0.0, 0
        steps = len(loader) if config.max_steps_per_epoch is None else min(len(loader), config.max_steps_per_epoch)
        bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        for step, batch in enumerate(loader):
            if step >= steps:
                break
            with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
                loss = training_loss(scorer, batch, config.image_loss_weight)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.item() * len(batch["label"])
            count += len(batch["label"])
            bar.update(1)
            bar.set_postfix(loss=f"{total / count:.4f}")
        bar.close()
        epoch_loss = total / max(count, 1)
        epoch_losses.append(epoch_loss)
        log.info("epoch %d/%d loss %.4f", epoch + 1, config.epochs, epoch_loss)
        state_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "prompts": scorer.prompt_state_dict(),
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "epoch_losses": epoch_losses,
                "epoch": epoch + 1,
                "run": identity,
            },
            state_file,
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, epoch_loss)

    metadata = {
        **scorer.checkpoint_metadata(),
        **backbone_metadata(backbone),
        "training": {
            **config.data_description,
            "categories": sorted({sample.category for sample in samples}),
            "samples": len(samples),
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "learning_rate": config.learning_rate,
            "seed": config.seed,
            "final_loss": epoch_losses[-1] if epoch_losses else None,
            "epoch_losses": epoch_losses,
            "seconds": round(time.time() - started, 1),
            "device": str(backbone.device),
            "mixed_precision": use_amp,
        },
        "code_version": code_version(),
    }
    digest = save_checkpoint(Path(config.output), scorer.prompt_state_dict(), metadata)
    state_file.unlink(missing_ok=True)
    return TrainingResult(Path(config.output).with_suffix(".safetensors"), digest, epoch_losses, metadata)


def config_summary(config: TrainingConfig) -> dict[str, Any]:
    summary = asdict(config)
    summary["output"] = str(config.output)
    return summary
