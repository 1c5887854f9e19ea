"""Building prompt token sequences with slots for learned vectors."""

from __future__ import annotations

import re

from model.detector import OBJECT_LABEL

PLACEHOLDER = "X"


def placeholder_prompt(num_slots: int, suffix: str, full_stop: bool = True) -> str:
    """``"X X ... X <suffix>."`` (no ``.`` when ``full_stop`` is false): each ``X`` is one
    token whose embedding gets replaced.

    Position 0 of the tokenized prompt is start-of-text, so slots occupy 1..num_slots.
    """
    words = [PLACEHOLDER] * num_slots + [suffix.strip()]
    return " ".join(words).strip() + ("." if full_stop else "")


def normalise_class_name(name: str | None) -> str:
    """``"metal_nut"`` -> ``"metal nut"``; empty or missing -> ``object``."""
    if name is None:
        return OBJECT_LABEL
    cleaned = re.sub(r"[_\-]+", " ", name).strip().lower()
    cleaned = re.sub(r"\s+", " ", cleaned)
    return cleaned or OBJECT_LABEL
