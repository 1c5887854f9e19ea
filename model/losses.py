"""Training losses for prompt learning (GenCLIP, ViP2-CLIP), as in AnomalyCLIP's recipe.

Per tapped layer the detector produces softmaxed ``[normal, abnormal]`` probability maps;
the segmentation loss is focal + Dice(abnormal, mask) + Dice(normal, 1 - mask), summed
over layers, and an image-level cross-entropy may be added. Samples without a pixel mask
(user folders where only the image label is known) are left out of the segmentation term
instead of being treated as all-normal, which would teach the prompts that their defects
are background.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Smallest probability fed to log(): keeps the focal loss finite when a softmax saturates.
_LOG_CLAMP = 1e-8


def focal_loss(probabilities: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss on per-pixel class probabilities, averaged over pixels.

    ``-(1 - p_t) ** gamma * log(p_t)``, with ``p_t`` the probability of the pixel's true
    class; ``gamma = 0`` gives the plain negative log-likelihood.

    Args:
        probabilities: ``(B, 2, H, W)`` softmaxed ``[normal, abnormal]`` channels.
        mask: ``(B, H, W)`` ground truth, 1 (or ``> 0.5``) = abnormal.
        gamma: focusing exponent.

    Returns:
        Scalar tensor.
    """
    if probabilities.dim() != 4 or probabilities.shape[1] != 2:
        raise ValueError(f"expected probabilities of shape (B, 2, H, W), got {tuple(probabilities.shape)}")
    target = (mask > 0.5).long().unsqueeze(1)  # (B, 1, H, W)
    if target.shape[0] != probabilities.shape[0] or target.shape[2:] != probabilities.shape[2:]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match probabilities {tuple(probabilities.shape)}")
    p_true = probabilities.gather(1, target).squeeze(1)
    log_p_true = torch.log(p_true.clamp(min=_LOG_CLAMP))
    return (-((1.0 - p_true) ** gamma) * log_p_true).mean()


def dice_loss(prediction: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss, per sample then averaged over the batch.

    ``1 - (2 |X ∩ Y| + smooth) / (|X| + |Y| + smooth)`` with ``|X ∩ Y| = sum(x * y)``; the
    smoothing term keeps an empty target with an empty prediction at loss 0.

    Args:
        prediction: ``(B, H, W)`` probabilities in [0, 1].
        target: ``(B, H, W)`` in {0, 1} (soft values are accepted).
        smooth: additive smoothing.

    Returns:
        Scalar tensor.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
    batch = prediction.shape[0]
    flat_prediction = prediction.reshape(batch, -1)
    flat_target = target.reshape(batch, -1).to(prediction.dtype)
    intersection = (flat_prediction * flat_target).sum(dim=1)
    dice = (2.0 * intersection + smooth) / (flat_prediction.sum(dim=1) + flat_target.sum(dim=1) + smooth)
    return 1.0 - dice.mean()


def segmentation_loss(
    layer_probabilities: Sequence[torch.Tensor],
    mask: torch.Tensor,
    has_mask: torch.Tensor,
    gamma: float = 2.0,
) -> torch.Tensor:
    """Focal + Dice(abnormal, mask) + Dice(normal, 1 - mask), summed over layers.

    Args:
        layer_probabilities: one ``(B, 2, H, W)`` softmaxed ``[normal, abnormal]`` map per
            tapped layer, already at the mask's resolution.
        mask: ``(B, H, W)`` ground truth in {0, 1} (``> 0.5`` = abnormal); rows whose
            ``has_mask`` is False are ignored, whatever they hold.
        has_mask: ``(B,)`` bool, whether the sample has a pixel mask (good images do: all 0).
        gamma: focal exponent.

    Returns:
        Scalar tensor. When no sample has a mask it is a zero still connected to every
        input, so ``backward()`` works and gives zero gradients.
    """
    if not layer_probabilities:
        raise ValueError("layer_probabilities is empty")
    keep = has_mask.to(torch.bool).reshape(-1)
    if not bool(keep.any()):
        zero = layer_probabilities[0].sum() * 0.0
        for probabilities in layer_probabilities[1:]:
            zero = zero + probabilities.sum() * 0.0
        return zero
    target = (mask[keep] > 0.5).to(layer_probabilities[0].dtype)
    total = layer_probabilities[0].new_zeros(())
    for probabilities in layer_probabilities:
        kept = probabilities[keep]
        total = total + focal_loss(kept, target, gamma)
        total = total + dice_loss(kept[:, 1], target)
        total = total + dice_loss(kept[:, 0], 1.0 - target)
    return total


def image_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Image-level cross-entropy.

    Args:
        logits: ``(B, 2)`` unnormalised ``[normal, abnormal]`` scores.
        labels: ``(B,)`` long, 1 = anomalous.

    Returns:
        Scalar tensor (mean over the batch).
    """
    return F.cross_entropy(logits, labels.long())
