"""Training-free prompt-ensemble detector (DESIGN.md 2.3), in the spirit of WinCLIP.

State words x templates, with the class name (or ``object``), are encoded once by the frozen
CLIP and averaged per state; features are cached per class name. No checkpoint needed: it is
what runs when no trained prompts are configured, and the floor trained detectors must beat.
Image score rule: ``0.5 * p_abnormal(global embedding) + 0.5 * max(smoothed map)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from model.anomaly_maps import (
    anomaly_from_probabilities,
    finalize_maps,
    global_and_peak_score,
    patch_probabilities_to_grid,
    two_way_probabilities,
)
from model.backbone import ClipBackbone, VisualFeatures
from model.prompt_text import normalise_class_name
from model.scoring import AnomalyScorer, BatchScores

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ABNORMAL_STATES = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
TEMPLATES = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "there is a {} in the scene.",
    "this is a {} in the scene.",
)


def ensemble_prompts(name: str) -> tuple[list[str], list[str]]:
    """All normal and abnormal sentences for one class name."""
    def sentences(states: Sequence[str]) -> list[str]:
        return [template.format(state.format(name)) for state in states for template in TEMPLATES]

    return sentences(NORMAL_STATES), sentences(ABNORMAL_STATES)


class PromptEnsembleScorer(AnomalyScorer):
    """Frozen-CLIP prompt ensemble; the class name is used as given (``object`` if none)."""

    name = "baseline"

    def __init__(self, backbone: ClipBackbone, layers: Sequence[int], image_size: int, sigma: float = 4.0) -> None:
        super().__init__(backbone, layers, image_size)
        self.sigma = sigma
        self._text_cache: dict[str, torch.Tensor] = {}

    @property
    def smoothing_sigma(self) -> float:
        return self.sigma

    @torch.no_grad()
    def text_features(self, name: str) -> torch.Tensor:
        """(2, D) unit-norm mean features of the normal and abnormal sentence sets."""
        cached = self._text_cache.get(name)
        if cached is None:
            if len(self._text_cache) > 1024:
                self._text_cache.clear()
            normal, abnormal = ensemble_prompts(name)
            encoded = self.backbone.encode_texts(normal + abnormal)
            cached = torch.stack([
                F.normalize(encoded[: len(normal)].mean(dim=0), dim=-1),
                F.normalize(encoded[len(normal) :].mean(dim=0), dim=-1),
            ])
            self._text_cache[name] = cached
        return cached

    def score_features(self, features: VisualFeatures, class_names: Sequence[str | None]) -> BatchScores:
        names = [normalise_class_name(name) for name in class_names]
        text = torch.stack([self.text_features(name) for name in names]).to(features.global_embedding.dtype)
        coarse = torch.stack([
            anomaly_from_probabilities(patch_probabilities_to_grid(two_way_probabilities(tokens, text), features.grid))
            for tokens in features.patch_tokens
        ]).mean(dim=0)
        maps = finalize_maps(coarse, self.image_size, self.sigma)
        scores = global_and_peak_score(two_way_probabilities(features.global_embedding, text)[:, 1], maps)
        return BatchScores(maps=maps, scores=scores, class_labels=names)
