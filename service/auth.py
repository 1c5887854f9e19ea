"""API-key authentication for ``/inspect``.

Keys come from ``GENCLIP_API_KEYS``; none configured = open service. A client sends
``X-API-Key: <key>`` or ``Authorization: Bearer <key>``. The check runs in the upload guard,
before the body is read (an unauthenticated client cannot make us parse 20 MB), and again as
a FastAPI security dependency, which is also what puts the "Authorize" button in ``/docs``.
``/health``, ``/ready``, ``/metrics`` and ``/docs`` stay open (probes, scrapers).

The review page (``/ui``) runs in a browser, which cannot add headers to a page load or an
``<img>``: it signs in by storing the key in the cookie ``genclip_api_key`` (``SameSite=Strict``,
so no other site's page can send it), which every check here accepts as well.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from http.cookies import CookieError, SimpleCookie
from urllib.parse import unquote
from typing import Any

from fastapi import HTTPException, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="API key")
bearer = HTTPBearer(auto_error=False, description="API key as a bearer token")

CHALLENGE = [(b"www-authenticate", b'Bearer realm="genclip", X-API-Key')]
COOKIE_NAME = "genclip_api_key"


class ApiKeyAuth:
    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def _valid(self, candidate: str | None) -> bool:
        if not candidate:
            return False
        given = candidate.encode()
        ok = False
        for key in self._keys:  # constant time per key, and no early exit
            ok |= hmac.compare_digest(given, key)
        return ok

    @staticmethod
    def extract(headers: Mapping[str, str]) -> str | None:
        key = headers.get("x-api-key")
        if key:
            return key.strip()
        authorization = headers.get("authorization", "")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        cookie_header = headers.get("cookie")
        if cookie_header:
            try:
                morsel = SimpleCookie(cookie_header).get(COOKIE_NAME)
            except CookieError:
                return None
            if morsel is not None and unquote(morsel.value).strip():
                return unquote(morsel.value).strip()
        return None

    def check_headers(self, headers: Mapping[str, str]) -> str | None:
        """``None`` when allowed, else the reason for a 401."""
        if not self.enabled:
            return None
        key = self.extract(headers)
        if key is None:
            return "missing API key: send X-API-Key or Authorization: Bearer"
        if not self._valid(key):
            return "invalid API key"
        return None

    def check_scope(self, scope: Mapping[str, Any]) -> tuple[int, bytes, list] | None:
        """ASGI-level check for :class:`service.image_input.UploadGuard`."""
        if not self.enabled:
            return None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        reason = self.check_headers(headers)
        if reason is None:
            return None
        return 401, reason.encode(), list(CHALLENGE)

    def dependency(self):
        """FastAPI dependency; declares both schemes in OpenAPI, neither mandatory by itself."""

        async def require_api_key(
            request: Request,
            _key: str | None = Security(api_key_header),
            _token: HTTPAuthorizationCredentials | None = Security(bearer),
        ) -> None:
            reason = self.check_headers(request.headers)
            if reason is not None:
                raise HTTPException(401, reason, headers={"WWW-Authenticate": 'Bearer realm="genclip"'})

        return require_api_key
