"""The client's optional free-text form fields of ``/inspect`` (``part_id``, ``station``)."""

from __future__ import annotations

from service.query_types import has_control_characters


class FieldRejected(ValueError):
    """A form field we refuse (answered 422)."""


def clean_text_field(name: str, value: str | None, max_length: int) -> str | None:
    """Strip and collapse white space; ``None`` when empty; refuse control characters and
    values longer than ``max_length`` characters (after cleaning)."""
    if value is None:
        return None
    if has_control_characters(value):
        raise FieldRejected(f"{name}: control characters are not allowed")
    cleaned = " ".join(value.split())
    if len(cleaned) > max_length:
        raise FieldRejected(f"{name}: at most {max_length} characters")
    return cleaned or None
