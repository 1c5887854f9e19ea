"""Building a product's reference from one vision pass over its good images.

The detector wrapper runs the vision pass and the zero-shot scorer over the good images (the
same pass an inspection runs) and hands over what came out; this module does the rest:

1. bank: per layer, all good patch tokens, reduced to ``max_patches_per_layer`` by greedy
   coreset subsampling, stored float16 with each patch's source image;
2. leave-one-out: each good image's few-shot map against the bank *without the patches that
   image contributed* (so the bank is the one built from the other images, up to which of
   their patches the coreset kept), smoothed like the zero-shot map and fused with the
   image's zero-shot map and score at the configured weight;
3. thresholds on those fused scores and fused-map maxima (:mod:`model.fewshot.calibration`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from model.anomaly_maps import finalize_maps, max_map_score
from model.fewshot.bank import ReferenceBank
from model.fewshot.calibration import CalibrationReport, calibrate_threshold, quantile_summary
from model.fewshot.config import ReferenceConfig
from model.fewshot.coreset import greedy_coresets
from model.fewshot.errors import ReferenceError
from model.fewshot.scoring import few_shot_coarse_map, fuse

MIN_GOOD_IMAGES = 2  # leave-one-out needs another image to compare with


@dataclass
class ReferenceBuild:
    """A built reference: the bank to store and the calibration report of its thresholds."""

    bank: ReferenceBank
    report: CalibrationReport


@dataclass
class GoodImageFeatures:
    """What one vision pass over n good images gave.

    Attributes:
        patch_tokens: per layer, (n, N, D) unit-norm patch tokens (float16 on the CPU keeps
            memory low: ViT-L / 518 px holds 8.4 MB per image).
        zero_shot_maps: (n, S, S) zero-shot anomaly maps at the model input size.
        zero_shot_scores: (n,) zero-shot image scores.
        grid: (grid_h, grid_w), N = grid_h * grid_w.
    """

    patch_tokens: list[torch.Tensor]
    zero_shot_maps: torch.Tensor
    zero_shot_scores: torch.Tensor
    grid: tuple[int, int]

    @property
    def image_count(self) -> int:
        return int(self.zero_shot_scores.shape[0])


def build_bank(
    patch_tokens: Sequence[torch.Tensor],
    layers: Sequence[int],
    identity: dict[str, Any],
    max_patches_per_layer: int,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> ReferenceBank:
    """Coreset-capped float16 bank from per-layer (n, N, D) tokens of n good images.

    All layers are subsampled in one greedy loop seeded with ``seed``, run on ``device``
    (default: the tokens' own).
    """
    if len(patch_tokens) != len(layers):
        raise ValueError(f"{len(patch_tokens)} token layers for layers {list(layers)}")
    image_count, per_image = int(patch_tokens[0].shape[0]), int(patch_tokens[0].shape[1])
    image_of_patch = torch.arange(image_count, dtype=torch.int32).repeat_interleave(per_image)
    flat = [tokens.reshape(image_count * per_image, tokens.shape[-1]) for tokens in patch_tokens]
    patches, sources = [], []
    for tokens, keep in zip(flat, greedy_coresets(flat, max_patches_per_layer, seed=seed, device=device)):
        # Re-normalise before the float16 cast so the stored tokens are unit-norm to its precision.
        patches.append(torch.nn.functional.normalize(tokens[keep.to(tokens.device)].float(), dim=-1).half().cpu())
        sources.append(image_of_patch[keep].contiguous())
    return ReferenceBank(tuple(layers), patches, sources, image_count, dict(identity))


def leave_one_out_maps(
    features: GoodImageFeatures,
    bank: ReferenceBank,
    image_size: int,
    sigma: float,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(n, S, S) few-shot maps, image i scored against the bank without its own patches.

    Runs on ``device`` (default: the tokens' own), one image's tokens moved there at a time;
    float32 on a CPU (its float16 matrix products are slow), float16 on an accelerator.
    """
    device = torch.device(device) if device is not None else features.patch_tokens[0].device
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    bank_patches = bank.patches_on(device, dtype)
    coarse = []
    for index in range(features.image_count):
        tokens = [layer_tokens[index : index + 1].to(device, dtype) for layer_tokens in features.patch_tokens]
        excluded = [(sources == index).to(device) for sources in bank.sources]
        coarse.append(few_shot_coarse_map(tokens, bank_patches, features.grid, excluded))
    return torch.cat([finalize_maps(block, image_size, sigma) for block in torch.cat(coarse).split(16)])


def build_reference_from_features(
    features: GoodImageFeatures,
    layers: Sequence[int],
    identity: dict[str, Any],
    image_size: int,
    sigma: float,
    config: ReferenceConfig = ReferenceConfig(),
    started: float | None = None,
    device: torch.device | str | None = None,
) -> ReferenceBuild:
    """Bank + leave-one-out calibration of both thresholds on the fused outputs.

    Args:
        features: the good images' vision-pass outputs (see :class:`GoodImageFeatures`).
        layers: the 1-based layers ``features.patch_tokens`` hold, in order.
        identity: the detector identity subset the bank records (``bank_identity``).
        image_size: model input side S (maps are finalised at S x S).
        sigma: the scorer's smoothing sigma at 518 px (scaled to S by ``finalize_maps``).
        config: cap, fusion weight, target rate, seed.
        started: ``time.perf_counter()`` at the start of the whole build (vision passes
            included) for the report's ``seconds``; default: now.
        device: where the coreset and leave-one-out search run (default: the tokens' device).

    Raises:
        ReferenceError: fewer than :data:`MIN_GOOD_IMAGES` images.
    """
    started = time.perf_counter() if started is None else started
    count = features.image_count
    if count < MIN_GOOD_IMAGES:
        raise ReferenceError(f"A reference needs at least {MIN_GOOD_IMAGES} good images (leave-one-out), got {count}")
    bank = build_bank(features.patch_tokens, layers, identity, config.max_patches_per_layer, config.seed, device)
    few_shot = leave_one_out_maps(features, bank, image_size, sigma, device).cpu()
    zero_maps = features.zero_shot_maps.float().cpu()
    zero_scores = features.zero_shot_scores.float().cpu()
    weight = config.fusion_weight
    fused_scores = fuse(zero_scores, max_map_score(few_shot), weight).clamp(0.0, 1.0)
    fused_maxima = max_map_score(fuse(zero_maps, few_shot, weight)).clamp(0.0, 1.0)
    image = calibrate_threshold(fused_scores.numpy(), config.false_reject_rate)
    pixel = calibrate_threshold(fused_maxima.numpy(), config.false_reject_rate)
    report = CalibrationReport(
        image_count=count,
        false_reject_rate_target=config.false_reject_rate,
        image_threshold=image.threshold,
        pixel_threshold=pixel.threshold,
        estimated_false_reject_rate=image.estimated_false_reject_rate,
        rule=image.rule,
        score_quantiles=quantile_summary(fused_scores.numpy()),
        pixel_quantiles=quantile_summary(fused_maxima.numpy()),
        leave_one_out_scores=[float(value) for value in fused_scores],
        bank_patches_per_layer=bank.patches_per_layer,
        bank_bytes=bank.nbytes,
        fusion_weight=weight,
        seconds=round(time.perf_counter() - started, 3),
        estimate_method=f"image threshold, {image.description}; pixel threshold, {pixel.description}",
        pixel_estimated_false_reject_rate=pixel.estimated_false_reject_rate,
        leave_one_out_pixel_maxima=[float(value) for value in fused_maxima],
    )
    return ReferenceBuild(bank=bank, report=report)
