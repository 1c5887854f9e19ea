"""Few-shot anomaly maps from a reference bank, and their fusion with the zero-shot output.

Per tapped layer a patch's few-shot anomaly is ``(1 - max cosine to the bank's patches) / 2``
(in [0, 1]: 0 where the patch equals a good patch, 1 for the opposite direction); the layers
are averaged on the patch grid, then upsampled and smoothed exactly like the zero-shot map
(:func:`model.anomaly_maps.finalize_maps` with the scorer's sigma). Fusion is a weighted mean,
``(1 - w) * zero_shot + w * few_shot``, for maps and for image scores; the few-shot image score
is the peak of the few-shot map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Rows of the (rows x M) similarity matrix computed at once: bounds memory at large banks
# (4096 rows x 8192 patches x 4 bytes = 128 MB).
_CHUNK_ROWS = 4096


def nearest_cosine(
    tokens: torch.Tensor, bank: torch.Tensor, excluded: torch.Tensor | None = None
) -> torch.Tensor:
    """Largest cosine between each token and the bank (both unit-norm).

    Args:
        tokens: (N, D) unit-norm tokens.
        bank: (M, D) unit-norm bank patches, same dtype and device as ``tokens``.
        excluded: optional (M,) bool: bank rows to ignore (leave-one-out). If every row is
            excluded the answer is -1 (the cosine's lower bound: the farthest possible).

    Returns:
        (N,) float32 maximum cosine per token.
    """
    keep = None if excluded is None else ~excluded
    if keep is not None:
        if not bool(keep.any()):
            return torch.full((tokens.shape[0],), -1.0, device=tokens.device)
        bank = bank[keep]
    best = [
        (tokens[start : start + _CHUNK_ROWS] @ bank.t()).amax(dim=1).float()
        for start in range(0, tokens.shape[0], _CHUNK_ROWS)
    ]
    return torch.cat(best).clamp_(-1.0, 1.0)


def few_shot_coarse_map(
    patch_tokens: Sequence[torch.Tensor],
    bank_patches: Sequence[torch.Tensor],
    grid: tuple[int, int],
    excluded: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Few-shot anomaly on the patch grid, averaged over layers.

    Args:
        patch_tokens: per layer, (B, N, D) unit-norm patch tokens, N = grid_h * grid_w.
        bank_patches: per layer (same order), (M_l, D) bank patches in the tokens' dtype/device.
        grid: (grid_h, grid_w).
        excluded: optional per layer (M_l,) bool bank rows to ignore (same for the whole batch).

    Returns:
        (B, grid_h, grid_w) float32 in [0, 1].
    """
    if len(patch_tokens) != len(bank_patches):
        raise ValueError(f"{len(patch_tokens)} token layers but {len(bank_patches)} bank layers")
    layer_maps = []
    for position, (tokens, bank) in enumerate(zip(patch_tokens, bank_patches)):
        batch = tokens.shape[0]
        cosine = nearest_cosine(tokens.reshape(-1, tokens.shape[-1]), bank, None if excluded is None else excluded[position])
        layer_maps.append(((1.0 - cosine) / 2.0).view(batch, grid[0], grid[1]))
    return torch.stack(layer_maps).mean(dim=0)


def fuse(zero_shot: torch.Tensor, few_shot: torch.Tensor, weight: float | torch.Tensor) -> torch.Tensor:
    """Weighted mean ``(1 - w) * zero_shot + w * few_shot`` (maps or scores; ``w`` may be
    a tensor broadcasting against them, e.g. (B, 1, 1) per-image weights for (B, H, W) maps)."""
    return (1.0 - weight) * zero_shot + weight * few_shot
