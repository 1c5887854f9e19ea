"""Training losses: known values on tiny tensors, masking, gradient flow."""

from __future__ import annotations

import math
import re

import pytest
import torch

from model.losses import dice_loss, focal_loss, image_loss, segmentation_loss


def two_channel(p_abnormal: torch.Tensor) -> torch.Tensor:
    """(B, H, W) abnormal probabilities -> (B, 2, H, W) [normal, abnormal]."""
    return torch.stack([1 - p_abnormal, p_abnormal], dim=1)


def test_focal_loss_known_values() -> None:
    probabilities = two_channel(torch.full((1, 2, 2), 0.5))
    mask = torch.tensor([[[0, 1], [1, 0]]])
    # p_t = 0.5 everywhere: (1 - 0.5)^2 * ln 2.
    assert focal_loss(probabilities, mask).item() == pytest.approx(0.25 * math.log(2))
    assert focal_loss(probabilities, mask, gamma=0).item() == pytest.approx(math.log(2))
    mixed = two_channel(torch.tensor([[[0.9, 0.2]]]))
    target = torch.tensor([[[1, 1]]])
    expected = (0.1**2 * -math.log(0.9) + 0.8**2 * -math.log(0.2)) / 2
    assert focal_loss(mixed, target).item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_is_finite_when_saturated() -> None:
    probabilities = two_channel(torch.tensor([[[0.0, 1.0]]])).requires_grad_()
    loss = focal_loss(probabilities, torch.tensor([[[1, 0]]]))
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(probabilities.grad).all()


def test_dice_loss_known_values() -> None:
    prediction = torch.tensor([[[1.0, 0.0], [0.5, 0.0]]])
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    # intersection 1.5, |X| 1.5, |Y| 2: 1 - (3 + 1) / (3.5 + 1).
    assert dice_loss(prediction, target).item() == pytest.approx(1 - 4 / 4.5)
    empty = torch.zeros(1, 2, 2)
    assert dice_loss(empty, empty).item() == pytest.approx(0.0)
    batch = torch.cat([prediction, empty])
    assert dice_loss(batch, torch.cat([target, empty])).item() == pytest.approx((1 - 4 / 4.5) / 2)


def test_segmentation_loss_sums_layers_and_skips_unmasked_samples() -> None:
    p_abnormal = torch.tensor([[[0.8, 0.3], [0.1, 0.6]], [[0.5, 0.5], [0.5, 0.5]]])
    probabilities = two_channel(p_abnormal)
    mask = torch.tensor([[[1, 0], [0, 1]], [[1, 1], [1, 1]]], dtype=torch.float32)
    has_mask = torch.tensor([True, False])
    expected_one_layer = (
        focal_loss(probabilities[:1], mask[:1])
        + dice_loss(p_abnormal[:1], mask[:1])
        + dice_loss(1 - p_abnormal[:1], 1 - mask[:1])
    )
    loss = segmentation_loss([probabilities, probabilities], mask, has_mask)
    assert loss.item() == pytest.approx(2 * expected_one_layer.item(), rel=1e-6)


def test_segmentation_loss_without_masks_is_zero_with_gradient() -> None:
    logits = torch.randn(2, 2, 4, 4, requires_grad=True)
    layers = [logits.softmax(dim=1), logits.softmax(dim=1)]
    loss = segmentation_loss(layers, torch.zeros(2, 4, 4), torch.tensor([False, False]))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros_like(logits))


def test_gradient_flows_to_logits() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 8, 8, requires_grad=True)
    mask = (torch.rand(2, 8, 8) > 0.7).float()
    loss = segmentation_loss([logits.softmax(dim=1)], mask, torch.tensor([True, True]))
    image_logits = torch.randn(2, 2, requires_grad=True)
    total = loss + image_loss(image_logits, torch.tensor([0, 1]))
    total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert image_logits.grad is not None and image_logits.grad.abs().sum() > 0


def test_image_loss_known_value() -> None:
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    labels = torch.tensor([1, 0])
    expected = (math.log(2) + math.log(1 + math.exp(-2))) / 2
    assert image_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match=re.escape("(B, 2, H, W)")):
        focal_loss(torch.rand(1, 3, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="differ"):
        dice_loss(torch.rand(1, 2, 2), torch.rand(1, 2, 3))
