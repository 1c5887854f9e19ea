"""Detectors by name, and how to build each one's scorer from prompt sizes."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from model.backbone import ClipBackbone
from model.errors import UnknownDetectorError
from model.scoring import AnomalyScorer

TRAINABLE_DETECTORS = ("genclip", "vip2clip")
DETECTOR_NAMES = ("auto", "genclip", "vip2clip", "baseline", "ensemble")


def _trainable_classes(name: str) -> tuple[type[AnomalyScorer], type]:
    # Imported lazily so one detector's import cost is not paid by the others.
    if name == "genclip":
        from model.genclip import GenCLIP, GenCLIPConfig

        return GenCLIP, GenCLIPConfig
    if name == "vip2clip":
        from model.vip2clip import VIP2CLIP, VIP2CLIPConfig

        return VIP2CLIP, VIP2CLIPConfig
    raise UnknownDetectorError(f"Unknown trainable detector {name!r}; choose one of {TRAINABLE_DETECTORS}")


def create_scorer(
    name: str,
    backbone: ClipBackbone,
    layers: Sequence[int],
    image_size: int,
    options: Mapping[str, Any] | None = None,
) -> AnomalyScorer:
    """Build a scorer; ``options`` fill its config dataclass (unknown keys are ignored)."""
    if name == "baseline":
        from model.baseline import PromptEnsembleScorer

        return PromptEnsembleScorer(backbone, layers, image_size)
    scorer_class, config_class = _trainable_classes(name)
    known = {field.name for field in dataclasses.fields(config_class)}
    config = config_class(**{key: value for key, value in (options or {}).items() if key in known})
    factory: Callable[..., AnomalyScorer] = scorer_class
    return factory(backbone, layers, image_size, config)
