"""Fusing several scorers that share one vision pass (mean of maps and of scores)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.backbone import VisualFeatures
from model.scoring import AnomalyScorer, BatchScores


class EnsembleScorer(AnomalyScorer):
    """Runs the backbone once on the union of the members' layers and averages their outputs.

    The class label is the first member's (GenCLIP's, whose CNF label is the informative one);
    each member's image score is reported in ``component_scores``.
    """

    name = "ensemble"

    def __init__(self, members: Sequence[AnomalyScorer]) -> None:
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two scorers")
        sizes = {member.image_size for member in members}
        if len(sizes) != 1:
            raise ValueError(f"ensemble members disagree on image size: {sorted(sizes)}")
        layers = sorted({layer for member in members for layer in member.layers})
        super().__init__(members[0].backbone, layers, sizes.pop())
        self.members = torch.nn.ModuleList(members)

    @property
    def smoothing_sigma(self) -> float:
        """Mean of the members' sigmas (GenCLIP 4 + ViP2-CLIP 8 -> 6): the few-shot map gets one
        blur between the members' (their maps are each blurred with their own, then averaged)."""
        return sum(member.smoothing_sigma for member in self.members) / len(self.members)

    def score_features(self, features: VisualFeatures, class_names: Sequence[str | None]) -> BatchScores:
        results = [member.score_features(features.select(member.layers), class_names) for member in self.members]
        maps = torch.stack([result.maps for result in results]).mean(dim=0)
        scores = torch.stack([result.scores for result in results]).mean(dim=0)
        components = [
            {member.name: float(result.scores[index]) for member, result in zip(self.members, results)}
            for index in range(maps.shape[0])
        ]
        return BatchScores(maps=maps, scores=scores, class_labels=results[0].class_labels, component_scores=components)
