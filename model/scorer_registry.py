"""Detectors by name, and how to build each one's scorer from its config.

A trainable detector's config is a frozen dataclass (``GenCLIPConfig``, ``VIP2CLIPConfig``);
a checkpoint sidecar stores it whole, and :func:`config_from_dict` rebuilds it strictly, as
open_clip does with its model configs: an unknown key, a missing key or a value of the wrong
type is an error naming it, never a silent default.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from model.backbone import ClipBackbone
from model.errors import DetectorConfigError, UnknownDetectorError
from model.scoring import AnomalyScorer, TrainableScorer

TRAINABLE_DETECTORS = ("genclip", "vip2clip")
DETECTOR_NAMES = ("auto", "genclip", "vip2clip", "baseline", "ensemble")


def trainable_class(name: str) -> type[TrainableScorer]:
    """The scorer class of a trainable detector (imported lazily: one detector's import
    cost is not paid by the others)."""
    if name == "genclip":
        from model.genclip import GenCLIP

        return GenCLIP
    if name == "vip2clip":
        from model.vip2clip import VIP2CLIP

        return VIP2CLIP
    raise UnknownDetectorError(f"Unknown trainable detector {name!r}; choose one of {TRAINABLE_DETECTORS}")


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def config_from_dict(config_class: type, data: Mapping[str, Any], *, strict: bool = True, what: str = "config") -> Any:
    """Build ``config_class`` from ``data``.

    Args:
        config_class: a dataclass whose fields all have defaults.
        data: field values.
        strict: every field must be given (a checkpoint sidecar); ``False`` fills missing
            fields with their defaults (training options). Unknown keys are refused always.
        what: how to name ``data`` in errors.

    Raises:
        DetectorConfigError: unknown, missing or wrongly typed keys, or a value the
            dataclass refuses; the message names them.
    """
    if not isinstance(data, Mapping):
        raise DetectorConfigError(f"{what} must be a JSON object of {config_class.__name__} fields")
    fields = {field.name: field for field in dataclasses.fields(config_class)}
    unknown = sorted(set(data) - set(fields))
    missing = sorted(set(fields) - set(data)) if strict else []
    wrong_type = [
        f"{name}={data[name]!r} (expected {type(fields[name].default).__name__})"
        for name in fields
        if name in data and not _type_ok(data[name], fields[name].default)
    ]
    if unknown or missing or wrong_type:
        problems = []
        if unknown:
            problems.append(f"unknown keys {unknown}")
        if missing:
            problems.append(f"missing keys {missing}")
        if wrong_type:
            problems.append(f"wrong types {wrong_type}")
        raise DetectorConfigError(
            f"{what} does not describe a {config_class.__name__}: {'; '.join(problems)} "
            f"(its fields: {sorted(fields)})"
        )
    values = {name: float(value) if isinstance(fields[name].default, float) else value for name, value in data.items()}
    try:
        return config_class(**values)
    except (TypeError, ValueError) as error:
        raise DetectorConfigError(f"{what}: {error}") from error


def create_scorer(
    name: str,
    backbone: ClipBackbone,
    layers: Sequence[int],
    image_size: int,
    options: Mapping[str, Any] | None = None,
    *,
    strict: bool = False,
) -> AnomalyScorer:
    """Build a scorer.

    Args:
        options: the trainable detector's config fields (see :func:`config_from_dict`);
            ignored by the baseline.
        strict: every config field must be in ``options`` (rebuilding from a sidecar).
    """
    if name == "baseline":
        from model.baseline import PromptEnsembleScorer

        return PromptEnsembleScorer(backbone, layers, image_size)
    scorer_class = trainable_class(name)
    config = config_from_dict(scorer_class.config_class, options or {}, strict=strict, what=f"{name} config")
    return scorer_class(backbone, layers, image_size, config)
