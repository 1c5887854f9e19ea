"""Schemathesis hooks (``SCHEMATHESIS_HOOKS=st_hooks``): what the ``image`` part's declared
content types mean, as Hypothesis strategies: real single-frame images of that format.

The OpenAPI schema can say "a binary part of type image/png"; it cannot say "that decodes as a
PNG". Without these strategies, Schemathesis would count random bytes sent as ``image/png`` as
valid data that must be accepted.
"""

from __future__ import annotations

import io

import schemathesis
from hypothesis import strategies as st
from PIL import Image


def _encoded(fmt: str, width: int, height: int, grey: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (grey, 255 - grey, grey // 2)).save(buf, format=fmt)
    return buf.getvalue()


for _media_type, _fmt in (("image/jpeg", "JPEG"), ("image/png", "PNG"), ("image/bmp", "BMP"), ("image/tiff", "TIFF")):
    schemathesis.openapi.media_type(
        _media_type,
        st.builds(lambda w, h, g, f=_fmt: _encoded(f, w, h, g), st.integers(1, 32), st.integers(1, 32), st.integers(0, 255)),
    )


TEXT_FIELDS = ("class_name", "product", "part_id", "station")


@schemathesis.hook
def filter_case(context, case) -> bool:
    """Drop generated bodies whose text fields (``class_name``, ``product``, ``part_id``,
    ``station``) the wire turns into valid text.

    Multipart text parts carry no type: a generated boolean, number or object for
    ``class_name`` is sent as the text ``false`` / ``1.5`` / ``{...}``, a valid product name,
    and a single-element list as that element. Schemathesis 4.32 means to allow for this
    (its "valid as sent" re-check), but that re-check raises when the body also holds a file
    part (``jsonschema_rs`` cannot validate its ``Binary`` value), so it would report such
    requests as "schema-violating request accepted". Lists of two or more stay: they are
    repeated fields, which the API refuses (422).
    """
    body = case.body
    if not isinstance(body, dict):
        return True
    for name in TEXT_FIELDS:
        if name not in body:
            continue
        value = body[name]
        if isinstance(value, list):
            if len(value) <= 1:
                return False
        elif not (value is None or isinstance(value, str)):
            return False
    return True
