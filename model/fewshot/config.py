"""How a product's reference is built and fused (one frozen dataclass, safe as a default)."""

from __future__ import annotations

from dataclasses import dataclass

# At ViT-L-14-336 / 518 px (37 x 37 patches, 4 tapped layers, 768 wide) 32 good images give
# 43 808 patches per layer; 4096 of them (9.4 %, PatchCore's 1-10 % range) make a 25.2 MB bank
# (4 x 4096 x (768 x 2 + 4) bytes), well under the 64 MB budget, and keep the nearest-neighbour
# search at ~3.5 % of that backbone's forward FLOPs. bench/bench_fewshot.py measures both.
DEFAULT_MAX_PATCHES_PER_LAYER = 4096


@dataclass(frozen=True)
class ReferenceConfig:
    """Settings of one reference build.

    Attributes:
        max_patches_per_layer: cap on the bank's patches per layer; more good patches than
            this are reduced by greedy k-center coreset subsampling (PatchCore).
        fusion_weight: ``w`` in ``fused = (1 - w) * zero_shot + w * few_shot`` (maps and
            image scores); calibration uses it, so a reference is calibrated for this weight.
        false_reject_rate: target share of good parts flagged (image threshold), and of good
            parts on which any defect region is reported (pixel threshold).
        seed: seed of the coreset's random projection and start point (same seed, same bank).
    """

    max_patches_per_layer: int = DEFAULT_MAX_PATCHES_PER_LAYER
    fusion_weight: float = 0.5
    false_reject_rate: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_patches_per_layer < 1:
            raise ValueError(f"max_patches_per_layer must be at least 1, got {self.max_patches_per_layer}")
        if not 0.0 <= self.fusion_weight <= 1.0:
            raise ValueError(f"fusion_weight must lie in [0, 1], got {self.fusion_weight}")
        if not 0.0 < self.false_reject_rate < 1.0:
            raise ValueError(f"false_reject_rate must lie in (0, 1), got {self.false_reject_rate}")
