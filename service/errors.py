"""HTTP errors as JSON: one body shape for every error the service answers.

Every error is ``{"error": code, "message": text, "status": status}`` (plus ``id`` when a job
had been admitted, ``detail`` for validation errors and ``retry_after_ms`` on 503), whichever
layer raised it: a route (:class:`ApiError`), FastAPI's request validation, Starlette's routing
(404 / 405), an unexpected exception (500, logged with its traceback), the upload guard
(:mod:`service.upload_guard`) or the HTTP protocol itself (:mod:`service.http_server`: malformed
HTTP, slow or oversized requests, load shedding).

Retry advice on 503: ``Retry-After`` is whole seconds (RFC 9110 allows nothing finer), so the
value in milliseconds travels as ``Retry-After-Ms`` and as ``retry_after_ms`` in the body.
"""

from __future__ import annotations

import logging
import re
import math
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from sqlalchemy.exc import DBAPIError, TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.schemas import ErrorResponse

log = logging.getLogger(__name__)

STATUS_CODES = {
    400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
    406: "not_acceptable", 408: "request_timeout", 409: "conflict", 413: "payload_too_large",
    415: "unsupported_media_type", 422: "validation_error", 431: "headers_too_large", 500: "internal_error",
    502: "bad_gateway", 503: "service_unavailable", 504: "deadline_exceeded",
}


def retry_after_headers(retry_after_ms: int) -> dict[str, str]:
    """``Retry-After`` (whole seconds, rounded up) and ``Retry-After-Ms`` for a 503."""
    retry_after_ms = max(0, int(retry_after_ms))
    return {"Retry-After": str(math.ceil(retry_after_ms / 1000)), "Retry-After-Ms": str(retry_after_ms)}


class ApiError(HTTPException):
    """An HTTP error with a machine-readable code (rendered as :class:`ErrorResponse`).

    ``retry_after_ms`` (503s) adds ``Retry-After`` / ``Retry-After-Ms`` headers and the body field.
    """

    def __init__(self, status: int, code: str, message: str, *, headers: dict | None = None,
                 job_id: str | None = None, retry_after_ms: int | None = None) -> None:
        if retry_after_ms is not None:
            headers = {**(headers or {}), **retry_after_headers(retry_after_ms)}
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code
        self.job_id = job_id
        self.retry_after_ms = retry_after_ms


def error_body(status: int, code: str, message: str, job_id: str | None = None, detail: Any = None,
               retry_after_ms: int | None = None) -> bytes:
    return ErrorResponse(error=code, message=message, status=status, id=job_id, detail=detail,
                         retry_after_ms=retry_after_ms).model_dump_json(exclude_none=True).encode()


def error_response(status: int, code: str, message: str, *, headers: dict | None = None,
                   job_id: str | None = None, detail: Any = None, retry_after_ms: int | None = None) -> Response:
    if retry_after_ms is not None:
        headers = {**(headers or {}), **retry_after_headers(retry_after_ms)}
    return Response(error_body(status, code, message, job_id, detail, retry_after_ms), status_code=status,
                    media_type="application/json", headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Render every error the app can raise as JSON :class:`ErrorResponse`."""

    allowed = _AllowedMethods(app)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = getattr(exc, "code", None) or STATUS_CODES.get(exc.status_code, "error")
        headers = exc.headers
        if exc.status_code == 405:  # every method of the path, not only those of the first route matched
            methods = allowed.of(request.url.path)
            if methods:
                headers = {**(headers or {}), "Allow": ", ".join(methods)}
        return error_response(exc.status_code, code, str(exc.detail), headers=headers,
                              job_id=getattr(exc, "job_id", None),
                              retry_after_ms=getattr(exc, "retry_after_ms", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        message = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:] or e['loc'])}: {e['msg']}" for e in errors
        ) or "invalid request"
        return error_response(422, "validation_error", message, detail=jsonable_encoder(errors))

    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeout)
    async def database_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, DBAPIError) and not exc.connection_invalidated and not _is_connection_error(exc):
            log.exception("database error on %s", request.url.path)
            return error_response(500, "internal_error", f"database error: {type(exc.orig).__name__}")
        log.warning("database unavailable on %s: %s", request.url.path, exc)
        retry_after_ms = request.app.state.settings.retry_after_s * 1000
        return error_response(503, "database_unavailable", "the database is unreachable; retry later",
                              retry_after_ms=retry_after_ms)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal_error", f"internal error: {type(exc).__name__}")


class _AllowedMethods:
    """The methods a path supports, from the OpenAPI paths (one route per method and path)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self._table: list[tuple[re.Pattern[str], list[str]]] | None = None

    def of(self, path: str) -> list[str]:
        if self._table is None:
            table = []
            for template, operations in self.app.openapi().get("paths", {}).items():
                parts = re.split(r"(\{[^}/]+\})", template)
                pattern = re.compile("^" + "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts) + "$")
                methods = sorted(m.upper() for m in operations if m.upper() in _HTTP_METHODS)
                if "GET" in methods:
                    methods.append("HEAD")
                table.append((pattern, methods))
            self._table = table
        return next((methods for pattern, methods in self._table if pattern.match(path)), [])


_HTTP_METHODS = {"GET", "PUT", "POST", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE"}


def _is_connection_error(exc: Exception) -> bool:
    from sqlalchemy.exc import InterfaceError, OperationalError

    return isinstance(exc, (OperationalError, InterfaceError))
