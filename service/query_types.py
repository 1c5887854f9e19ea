"""Parameter types that accept exactly what the OpenAPI spec says they accept.

pydantic parses a datetime leniently (``0.5`` is read as seconds since 1970); a query parameter
documented as ``format: date-time`` must take ISO 8601 text only, so that what the spec calls
invalid is refused (422) and what it calls valid is accepted.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from pydantic import BeforeValidator

_ISO_8601 = re.compile(r"^\d{4}-\d{2}-\d{2}([Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?([Zz]|[+-]\d{2}:?\d{2})?)?$")


def _iso_8601_only(value: Any) -> Any:
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _ISO_8601.match(value.strip()):
        raise ValueError("expected an ISO 8601 date-time, e.g. 2026-11-23T08:00:00Z")
    return value


IsoDateTime = Annotated[datetime, BeforeValidator(_iso_8601_only)]

# Text fields (form, query, JSON) refuse control characters (C0, DEL and C1); their schema says
# so with these patterns, so that the spec and the server agree on what is valid.
NO_CONTROL_CHARACTERS = r"^[^\x00-\x1f\x7f-\x9f]*$"
# Single-line text with at least one character that is neither a control character nor white
# space (the white space listed explicitly: regex engines disagree on what \s means).
NOT_BLANK_TEXT = (
    r"^[^\x00-\x1f\x7f-\x9f]*"
    r"[^\x00-\x20\x7f-\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff]"
    r"[^\x00-\x1f\x7f-\x9f]*$"
)
# Multi-line notes: tab, line feed and carriage return allowed.
NO_CONTROL_CHARACTERS_MULTILINE = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]*$"


def has_control_characters(value: str, *, multiline: bool = False) -> bool:
    """Whether ``value`` holds a character the patterns above refuse."""
    allowed = "\t\n\r" if multiline else ""
    return any((ord(ch) < 32 and ch not in allowed) or 127 <= ord(ch) < 160 for ch in value)
