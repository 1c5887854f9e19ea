"""Upload validation and decoding (run off the event loop, in the API's thread pool).

Order of checks, cheapest first, nothing decoded before it is known to be safe:

1. request-level, in :class:`UploadGuard` (ASGI, before any body is parsed): API key,
   ``Content-Type: multipart/form-data``, ``Content-Length`` against the limit, then the
   bytes actually received are counted while streaming (chunked uploads have no length);
2. the file part's declared content type (when given) must be an image type we take;
3. :func:`decode_image`: file size; ``Image.open(fp, formats=[JPEG, PNG, BMP, TIFF])`` reads
   only the header; the pixel count from the header is checked against ``max_image_pixels``
   *before* decoding (decompression bombs); then a full decode (``load``), which is where a
   truncated or corrupt file fails.
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import HTTPException
from PIL import Image, UnidentifiedImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF")
ALLOWED_PART_TYPES = frozenset({
    "image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/x-png", "image/bmp",
    "image/x-bmp", "image/x-ms-bmp", "image/tiff", "image/tif", "image/x-tiff",
    "application/octet-stream",
})
# Room for multipart boundaries, part headers and the class_name field on top of the file.
MULTIPART_OVERHEAD = 64 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ImageRejected(Exception):
    """An upload we refuse: ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class DecodedImage:
    image: Image.Image  # RGB
    format: str
    width: int
    height: int
    decode_ms: float


def check_part_content_type(content_type: str | None) -> None:
    """415 unless the file part's declared type is an accepted image type (or absent)."""
    if not content_type:
        return
    base = content_type.split(";", 1)[0].strip().lower()
    if base not in ALLOWED_PART_TYPES:
        raise ImageRejected(
            415, "unsupported_media_type",
            f"file part content type {base!r} is not accepted: send JPEG, PNG, BMP or TIFF",
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.float32) / 257.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.min(arr)), float(np.max(arr))
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> DecodedImage:
    """Validate and decode an upload to RGB, or raise :class:`ImageRejected`."""
    t0 = time.perf_counter()
    if not data:
        raise ImageRejected(415, "unsupported_media_type", "the image file is empty")
    if len(data) > max_bytes:
        raise ImageRejected(
            413, "payload_too_large", f"image file is {len(data)} bytes, the limit is {max_bytes}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageRejected(413, "image_too_large", f"image has too many pixels: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageRejected(
            415, "unsupported_media_type",
            "not a readable image: send a JPEG, PNG, BMP or TIFF file",
        ) from exc
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageRejected(415, "unsupported_media_type", "image has an empty size")
        if width * height > max_pixels:
            raise ImageRejected(
                413, "image_too_large",
                f"image is {width}x{height} = {width * height} pixels, the limit is {max_pixels}",
            )
        fmt = img.format or "?"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.load()
                rgb = _to_rgb(img)
        except MemoryError as exc:
            raise ImageRejected(413, "image_too_large", "image too large to decode") from exc
        except Image.DecompressionBombError as exc:
            raise ImageRejected(413, "image_too_large", f"image has too many pixels: {exc}") from exc
        except Exception as exc:  # truncated / corrupt data: Pillow raises many types
            raise ImageRejected(
                415, "unsupported_media_type",
                f"the {fmt} image could not be decoded (truncated or corrupt): {exc}",
            ) from exc
        if rgb.size != (width, height):  # pragma: no cover - defensive
            raise ImageRejected(415, "unsupported_media_type", "image size changed while decoding")
        if rgb is img:
            rgb = img.copy()  # detach from the file object closed below
    finally:
        img.close()
    return DecodedImage(rgb, fmt, width, height, (time.perf_counter() - t0) * 1000.0)


# ====================================================================== ASGI guard
def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes the limit (answered 413).

    An ``HTTPException`` so that FastAPI's body parsing re-raises it as is instead of turning
    it into a generic 400.
    """

    code = "payload_too_large"

    def __init__(self, message: str) -> None:
        super().__init__(status_code=413, detail=message)


async def send_json(send: Send, status: int, body: bytes, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:  # type: ignore[assignment]
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *extra_headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class UploadGuard:
    """ASGI middleware for ``POST /inspect``: checks that need no body, before any parsing.

    In order: API key (401), ``multipart/form-data`` (415), ``Content-Length`` (413), the
    in-flight request cap and queue admission (503 + ``Retry-After``: under overload a request
    is shed before its upload is parsed or decoded); then the received bytes are counted while
    the app streams the body (413 past the limit).

    A refused request's body is read and discarded (bounded in bytes and time) before the
    error is sent, so that an HTTP/1.1 client still uploading reads the 4xx instead of a reset.
    """

    def __init__(
        self,
        app: Any,
        *,
        path: str,
        max_body_bytes: int,
        authorize: Callable[[Scope], tuple[int, bytes, list] | None],
        error_body: Callable[[int, str, str], bytes],
        drain_bytes: int,
        drain_seconds: float = 3.0,
        admit: Callable[[], Awaitable[tuple[str, str] | None]] | None = None,
        max_inflight: int = 0,
        retry_after_s: int = 1,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.path = path
        self.max_body_bytes = max_body_bytes
        self.authorize = authorize
        self.error_body = error_body
        self.drain_bytes = drain_bytes
        self.drain_seconds = drain_seconds
        self.admit = admit
        self.max_inflight = max_inflight
        self.retry_after = [(b"retry-after", str(retry_after_s).encode())]
        self.on_reject = on_reject or (lambda reason: None)
        self.inflight = 0

    async def _drain(self, receive: Receive, already: int = 0) -> None:
        total, deadline = already, time.monotonic() + self.drain_seconds
        while total <= self.drain_bytes and time.monotonic() < deadline:
            message = await receive()
            if message["type"] != "http.request":
                return
            total += len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def _refuse(self, receive: Receive, send: Send, status: int, code: str, message: str,
                      headers: list | None = None) -> None:
        await self._drain(receive)
        await send_json(send, status, self.error_body(status, code, message), headers or [])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        denied = self.authorize(scope)
        if denied is not None:
            status, message, headers = denied
            await self._refuse(receive, send, status, "unauthorized", message.decode(), headers)
            return
        content_type = (_header(scope, b"content-type") or "").split(";", 1)[0].strip().lower()
        if content_type != "multipart/form-data":
            await self._refuse(
                receive, send, 415, "unsupported_media_type",
                f"request content type must be multipart/form-data, got {content_type or 'none'!r}",
            )
            return
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0:
                await send_json(send, 400, self.error_body(400, "bad_request", "invalid Content-Length"))
                return
            if declared > self.max_body_bytes:
                await self._refuse(
                    receive, send, 413, "payload_too_large",
                    f"request body is {declared} bytes, the limit is {self.max_body_bytes}",
                )
                return
        # load shedding before any parsing: in-flight cap (bounds memory), then queue admission
        if self.max_inflight and self.inflight >= self.max_inflight:
            self.on_reject("overloaded")
            await self._refuse(receive, send, 503, "overloaded",
                               f"{self.inflight} requests in progress, the limit is {self.max_inflight}",
                               self.retry_after)
            return
        if self.admit is not None:
            refusal = await self.admit()
            if refusal is not None:
                reason, message = refusal
                self.on_reject(reason)
                await self._refuse(receive, send, 503, reason, message, self.retry_after)
                return
        received = 0
        limit = self.max_body_bytes

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if message.get("more_body", False):
                        await self._drain(receive, received)
                    raise BodyTooLarge(f"request body passed the limit of {limit} bytes")
            return message

        self.inflight += 1
        try:
            await self.app(scope, counting_receive, send)
        finally:
            self.inflight -= 1
