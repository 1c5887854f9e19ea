"""Request-field rules FastAPI does not enforce by itself.

* :func:`single_valued`: a form field sent twice is an error, not "the last one wins".
* :func:`reject_unknown_fields` (every route, installed app-wide): a query parameter or form
  field the route does not declare is an error, not silently ignored (``?heatmpa=none`` would
  otherwise return a heatmap nobody asked for). The route's declared parameters, those of its
  dependencies included, are the contract its OpenAPI operation publishes.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from service.errors import ApiError

_FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def single_valued(*names: str) -> Callable[[Request], Coroutine[Any, Any, None]]:
    """A route dependency answering 422 when one of ``names`` appears more than once in the form.

    FastAPI binds a repeated multipart field to its last value and drops the others silently:
    two ``image`` parts would inspect one of them and say nothing about the other.
    """

    async def reject_repeated_fields(request: Request) -> None:
        form = await request.form()  # parsed once by FastAPI already; this is its cached copy
        repeated = [name for name in names if len(form.getlist(name)) > 1]
        if repeated:
            raise ApiError(422, "validation_error",
                           f"field(s) sent more than once: {', '.join(repeated)}; send each once")

    return reject_repeated_fields


def _declared(dependant: Any) -> tuple[set[str] | None, set[str] | None, set[str]]:
    """(query names, body field names, required body field names) declared by a route and its
    dependencies; ``None`` for a location whose fields cannot be listed (a model-typed
    parameter): that location is not checked."""
    query: set[str] | None = set()
    body: set[str] | None = set()
    required: set[str] = set()
    stack = [dependant]
    while stack:
        current = stack.pop()
        for field in current.query_params:
            if isinstance(field.field_info.annotation, type) and issubclass(field.field_info.annotation, BaseModel):
                query = None
            elif query is not None:
                query.add(field.alias)
        for field in current.body_params:
            if body is not None:
                body.add(field.alias)
            if field.field_info.is_required():
                required.add(field.alias)
        stack.extend(current.dependencies)
    return query, body, required


_DECLARED_CACHE: dict[int, tuple[set[str] | None, set[str] | None, set[str]]] = {}


async def reject_unknown_fields(request: Request) -> None:
    """App-wide dependency: 422 for query parameters or form fields the route does not declare."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    key = id(route)
    if key not in _DECLARED_CACHE:
        _DECLARED_CACHE[key] = _declared(dependant)
    query, body, required = _DECLARED_CACHE[key]
    unknown = [f"query parameter {name!r}" for name in dict.fromkeys(request.query_params.keys())
               if query is not None and name not in query]
    missing: list[str] = []
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if body and content_type in _FORM_TYPES:
        form = await request.form()  # FastAPI parsed it already: the cached copy
        unknown += [f"form field {name!r}" for name in dict.fromkeys(form.keys()) if name not in body]
        missing = sorted(name for name in required if name not in form)
    if unknown:
        message = f"not part of this operation: {', '.join(unknown)}"
        if missing:  # this check runs before FastAPI reports missing fields: say it here too
            message += f"; missing required field(s): {', '.join(missing)}"
        raise ApiError(422, "validation_error", message)


def forbid_undeclared_form_fields(openapi: dict[str, Any]) -> dict[str, Any]:
    """Publish :func:`reject_unknown_fields` in an OpenAPI document: every form body schema
    (``multipart/form-data``, ``application/x-www-form-urlencoded``) gets
    ``additionalProperties: false``. Mutates and returns ``openapi``."""
    components = openapi.get("components", {}).get("schemas", {})
    for path_item in openapi.get("paths", {}).values():
        for operation in path_item.values():
            content = (operation.get("requestBody") or {}).get("content", {}) if isinstance(operation, dict) else {}
            for media_type, body in content.items():
                if media_type not in _FORM_TYPES:
                    continue
                schema = body.get("schema", {})
                ref = schema.get("$ref", "")
                target = components.get(ref.rsplit("/", 1)[-1]) if ref.startswith("#/components/schemas/") else schema
                if isinstance(target, dict) and target.get("type", "object") == "object":
                    target["additionalProperties"] = False
    return openapi
