"""Patch-to-text similarity maps, shared by every detector (DESIGN.md 2, common ground)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

TEMPERATURE = 0.07
REFERENCE_IMAGE_SIZE = 518


def two_way_probabilities(features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Softmax over [normal, abnormal] of cosine / 0.07.

    Args:
        features: (B, N, D) unit-norm patch tokens (or (B, D) global embeddings).
        text_features: (B, 2, D) per-image or (2, D) shared unit-norm text features.

    Returns:
        (B, N, 2) (or (B, 2)) probabilities, channel 0 normal, channel 1 abnormal.
    """
    squeeze = features.dim() == 2
    if squeeze:
        features = features.unsqueeze(1)
    if text_features.dim() == 2:
        logits = features @ text_features.t()
    else:
        logits = features @ text_features.transpose(1, 2)
    probabilities = (logits / TEMPERATURE).softmax(dim=-1)
    return probabilities.squeeze(1) if squeeze else probabilities


def patch_probabilities_to_grid(probabilities: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, 2) patch probabilities -> (B, 2, grid_h, grid_w)."""
    batch = probabilities.shape[0]
    return probabilities.transpose(1, 2).reshape(batch, 2, grid[0], grid[1])


def anomaly_from_probabilities(probabilities: torch.Tensor) -> torch.Tensor:
    """(B, 2, ...) probabilities -> (B, ...) anomaly = (p_abnormal + 1 - p_normal) / 2."""
    return (probabilities[:, 1] + 1.0 - probabilities[:, 0]) / 2.0


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) or (B, h, w) maps to ``size``."""
    squeeze = maps.dim() == 3
    if squeeze:
        maps = maps.unsqueeze(1)
    resized = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return resized.squeeze(1) if squeeze else resized


def smoothing_sigma(reference_sigma: float, image_size: int) -> float:
    """Scale a sigma given at 518 px to another input size."""
    return reference_sigma * image_size / REFERENCE_IMAGE_SIZE


SMOOTHING_BORDERS = ("mirror", "symmetric")


def _symmetric_pad_index(size: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices extending an axis of ``size`` by ``radius`` on each side, half-sample
    symmetric (``d c b a | a b c d | d c b a``), for any radius (the reflection repeats with
    period ``2 * size``, as scipy does when the kernel is wider than the axis)."""
    positions = torch.arange(-radius, size + radius, device=device) % (2 * size)
    return torch.where(positions < size, positions, 2 * size - 1 - positions)


def gaussian_smooth(maps: torch.Tensor, sigma: float, border: str = "mirror") -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps.

    Args:
        maps: (B, H, W).
        sigma: standard deviation in pixels (<= 0: no blur).
        border: how the map is extended past its edges:

            - ``"mirror"``: ``d c b | a b c d`` (the edge pixel is not repeated): torch's pad
              mode ``reflect``, scipy's ``mirror``; kernel radius ``ceil(4 sigma)``, capped at
              the map side minus one. The project's detectors use it.
            - ``"symmetric"``: ``d c b a | a b c d`` (half-sample symmetric, the edge pixel is
              repeated): numpy's pad mode ``symmetric``, scipy's ``reflect``, the default of
              ``scipy.ndimage.gaussian_filter``, with scipy's radius ``int(4 sigma + 0.5)`` for
              any map size. It reproduces scipy's ``gaussian_filter(map, sigma)`` (the
              published ViP2-CLIP inference).

    Returns:
        (B, H, W) smoothed maps, same dtype.
    """
    if border not in SMOOTHING_BORDERS:
        raise ValueError(f"unknown smoothing border {border!r}; choose one of {SMOOTHING_BORDERS}")
    if sigma <= 0:
        return maps
    if border == "symmetric":
        radius = int(4.0 * sigma + 0.5)
    else:
        radius = min(max(1, int(math.ceil(4.0 * sigma))), min(maps.shape[-2:]) - 1)
    if radius < 1:
        return maps
    offsets = torch.arange(-radius, radius + 1, device=maps.device, dtype=maps.dtype)
    kernel = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    kernel = kernel / kernel.sum()
    x = maps.unsqueeze(1)
    if border == "symmetric":
        x = x.index_select(-1, _symmetric_pad_index(x.shape[-1], radius, x.device))
        x = F.conv2d(x, kernel.view(1, 1, 1, -1))
        x = x.index_select(-2, _symmetric_pad_index(x.shape[-2], radius, x.device))
        x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    else:
        x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
        x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def max_map_score(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) -> (B,) peak value of each map."""
    return maps.flatten(1).amax(dim=1)


def finalize_maps(coarse: torch.Tensor, image_size: int, reference_sigma: float, border: str = "mirror") -> torch.Tensor:
    """(B, gh, gw) patch-grid anomaly -> (B, S, S) smoothed map in [0, 1] at the input size
    (``border``: see :func:`gaussian_smooth`)."""
    maps = upsample(coarse, (image_size, image_size))
    return gaussian_smooth(maps, smoothing_sigma(reference_sigma, image_size), border).clamp_(0.0, 1.0)


def global_and_peak_score(global_abnormal: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """(B,) image score: mean of the global abnormal probability and the map's peak, in [0, 1]."""
    return (0.5 * global_abnormal + 0.5 * max_map_score(maps)).clamp(0.0, 1.0)
