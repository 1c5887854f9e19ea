"""ASGI middleware for the upload routes: checks that need no body, before any parsing.

The guard serves several upload paths (``POST /inspect``; any other multipart upload route is
one more :class:`UploadRoute`, path templates such as ``/products/{name}/good`` included).
For a request to one of them, in order:

1. API key (401) and ``multipart/form-data`` (415);
2. ``Content-Length`` against the route's limit (413, connection closed: nothing is read);
3. admission before the body is read (503 + ``Retry-After``: under overload a request is shed
   before its upload is parsed or decoded), for routes that queue detector work;
4. while the app streams the body, the bytes received are counted (413 past the limit);
5. once the whole body has arrived, the request takes an in-flight slot (503 ``overloaded``
   when all ``slots.limit`` are held by requests being processed). Uploads still arriving hold no slot: slow
   clients cannot starve the others (the HTTP protocol times them out, see
   :mod:`service.http_server`). The slots (:class:`UploadSlots`) are shared with the HTTP
   protocol's early gate, which refuses an upload from its headers while none is free; an
   upload it let through carries an :class:`UploadTicket` and counts against the slots from the
   moment its body has arrived until it takes (or is refused) a slot here, so that a burst
   arriving faster than the app runs sees the slots it will need;
6. a route with a deadline is answered by then whatever it waits for (queues, thread pools,
   Redis): past it (plus a short grace) the route is cancelled and the guard answers 504, or
   408 (connection closed) when the client had not finished sending its body.

A request refused before its body was read is answered at once; the HTTP server reads and
discards the rest of the body on the kept-alive connection (bounded by the protocol's body
timeouts), so a client still uploading reads the answer instead of a reset.

For every HTTP request, upload route or not, the memory the request reserved for decoded
images (:mod:`service.limits`) is released when the app returns.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.errors import ApiError, retry_after_headers
from service.limits import release_request

# The guard's 504 backstop fires this long after a route's deadline.
DEADLINE_GRACE_S = 0.5

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class Refusal:
    """Why a request is not admitted (answered ``status`` with ``code``)."""

    code: str
    message: str
    status: int = 503
    retry_after_ms: int | None = None


class UploadSlots:
    """The in-flight slots of the upload routes of one API process (``limit``; 0 = no limit).

    ``held``: uploads being processed (whole body arrived, slot taken by the guard);
    ``arrived``: uploads whose body has arrived but whose app has not reached the guard's slot
    check yet (counted by their :class:`UploadTicket`).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.arrived = 0

    def full(self) -> bool:
        """No slot left for one more upload (held and on their way to one)."""
        return self.limit > 0 and self.held + self.arrived >= self.limit

    def refusal(self, retry_after_ms: int) -> Refusal:
        return Refusal("overloaded", f"{self.held} uploads in progress and {self.arrived} arrived, "
                       f"the limit is {self.limit}", retry_after_ms=retry_after_ms)

    def ticket(self) -> UploadTicket:
        return UploadTicket(self)


class UploadTicket:
    """An upload the early gate let through (see :class:`UploadSlots`). The HTTP protocol calls
    :meth:`arrived` once the body is in, and :meth:`done` for a pipelined request whose connection
    ended before it ran; the guard calls :meth:`done` when the request takes or is refused its
    slot, and when it ends. Both are idempotent."""

    __slots__ = ("_slots", "_state")

    def __init__(self, slots: UploadSlots) -> None:
        self._slots = slots
        self._state = 0  # 0 let through, 1 body arrived (counted), 2 done

    def arrived(self) -> None:
        if self._state == 0:
            self._state = 1
            self._slots.arrived += 1

    def done(self) -> None:
        if self._state == 1:
            self._slots.arrived -= 1
        self._state = 2


# where the HTTP protocol puts the request's UploadTicket in the ASGI scope
TICKET_KEY = "genclip.upload_ticket"


@dataclass(frozen=True)
class UploadRoute:
    """One multipart upload route the guard protects.

    Attributes:
        method: HTTP method (``POST``).
        path: path template as in the router (``/inspect``, ``/products/{name}/good``).
        max_body_bytes: largest request body (file + multipart overhead).
        admit: run queue admission before the body is read (routes that queue detector jobs).
        deadline_s: the request is answered within this many seconds of its arrival: if the
            route has not started its response by then (plus :data:`DEADLINE_GRACE_S`, so that
            the route's own 504 comes first), it is cancelled and answered 504. ``None``: no bound.
    """

    method: str
    path: str
    max_body_bytes: int
    admit: bool = True
    deadline_s: float | None = None

    def pattern(self) -> re.Pattern[str]:
        parts = re.split(r"(\{[^}/]+\})", self.path)
        return re.compile("^" + "".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts) + "$")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class BodyTooLarge(ApiError):
    """Raised from ``receive`` when a streamed body passes the limit (answered 413).

    An ``HTTPException`` so that FastAPI's body parsing re-raises it as is instead of turning
    it into a generic 400.
    """

    def __init__(self, message: str) -> None:
        super().__init__(413, "payload_too_large", message, headers={"Connection": "close"})


async def send_json(send: Send, status: int, body: bytes, extra_headers: Sequence[tuple[bytes, bytes]] = (),
                    *, close: bool = False) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra_headers,
    ]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class UploadGuard:
    """ASGI middleware guarding the :class:`UploadRoute` s (see the module docstring)."""

    def __init__(
        self,
        app: Any,
        *,
        routes: Sequence[UploadRoute],
        authorize: Callable[[Scope], tuple[int, bytes, list] | None],
        error_body: Callable[..., bytes],
        admit: Callable[[Scope], Awaitable[Refusal | None]] | None = None,
        slots: UploadSlots | None = None,
        retry_after_ms: int = 1000,
        on_reject: Callable[[str], None] | None = None,
        drain_seconds: float = 3.0,
    ) -> None:
        self.app = app
        self.routes = [(route, route.pattern()) for route in routes]
        self.authorize = authorize
        self.error_body = error_body
        self.admit = admit
        self.slots = slots or UploadSlots(0)
        self.retry_after_ms = retry_after_ms
        self.on_reject = on_reject or (lambda reason: None)
        self.drain_seconds = drain_seconds

    def _route(self, scope: Scope) -> UploadRoute | None:
        for route, pattern in self.routes:
            if scope["method"] == route.method and pattern.match(scope["path"]):
                return route
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            route = self._route(scope)
            if route is None:
                await self.app(scope, receive, send)
            else:
                await self._guarded(route, scope, receive, send)
        finally:
            ticket = scope.get(TICKET_KEY)
            if ticket is not None:  # refused before its slot (auth, type, size, admission) or done
                ticket.done()
            release_request(scope)

    async def _refuse(self, send: Send, status: int, code: str, message: str, headers: Sequence = (),
                      *, retry_after_ms: int | None = None, close: bool = False) -> None:
        extra = list(headers)
        if retry_after_ms is not None:
            extra += [(k.lower().encode(), v.encode()) for k, v in retry_after_headers(retry_after_ms).items()]
        body = self.error_body(status, code, message, retry_after_ms=retry_after_ms)
        await send_json(send, status, body, extra, close=close)

    async def _guarded(self, route: UploadRoute, scope: Scope, receive: Receive, send: Send) -> None:
        denied = self.authorize(scope)
        if denied is not None:
            status, message, headers = denied
            await self._refuse(send, status, "unauthorized", message.decode(), headers)
            return
        content_type = (_header(scope, b"content-type") or "").split(";", 1)[0].strip().lower()
        if content_type != "multipart/form-data":
            await self._refuse(
                send, 415, "unsupported_media_type",
                f"request content type must be multipart/form-data, got {content_type or 'none'!r}",
            )
            return
        limit = route.max_body_bytes
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0:
                await self._refuse(send, 400, "bad_request", "invalid Content-Length", close=True)
                return
            if declared > limit:
                await self._refuse(send, 413, "payload_too_large",
                                   f"request body is {declared} bytes, the limit is {limit}", close=True)
                return
        if route.admit and self.admit is not None:
            budget = None
            if route.deadline_s is not None:
                budget = scope.get("genclip.t0_wall", time.time()) + route.deadline_s - time.time()
                if budget <= 0:  # it waited in front of the app (kernel, busy loop) for its whole deadline
                    self.on_reject("deadline_exceeded")
                    await self._refuse(send, 504, "deadline_exceeded",
                                       f"the request's deadline ({route.deadline_s:g} s) passed before it was admitted")
                    return
            try:  # bounded like everything else the request waits for
                refusal = await asyncio.wait_for(self.admit(scope), budget)
            except TimeoutError:
                refusal = Refusal("overloaded", "the admission check did not finish within the request deadline",
                                  retry_after_ms=self.retry_after_ms)
            if refusal is not None:
                self.on_reject(refusal.code)
                await self._refuse(send, refusal.status, refusal.code, refusal.message,
                                   retry_after_ms=refusal.retry_after_ms)
                return

        received = 0
        holding = False
        body_done = False
        ticket: UploadTicket | None = scope.get(TICKET_KEY)

        async def guarded_receive() -> Message:
            nonlocal received, holding, body_done
            message = await receive()
            if message["type"] != "http.request":
                return message
            body_done = not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > limit:
                if message.get("more_body", False):
                    await self._drain(receive, received, 2 * limit)
                raise BodyTooLarge(f"request body passed the limit of {limit} bytes")
            if not message.get("more_body", False) and not holding:
                # the whole body is here: from now on the request costs memory and CPU
                slots = self.slots
                if ticket is not None:
                    ticket.done()
                if slots.limit and slots.held >= slots.limit:
                    self.on_reject("overloaded")
                    raise ApiError(503, "overloaded",
                                   f"{slots.held} uploads in progress, the limit is {slots.limit}",
                                   retry_after_ms=self.retry_after_ms)
                slots.held += 1
                holding = True
            return message

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        deadline = None
        if route.deadline_s is not None:
            arrived = scope.get("genclip.t0_wall", time.time())
            deadline = asyncio.get_running_loop().time() + (arrived + route.deadline_s + DEADLINE_GRACE_S - time.time())
        try:
            async with asyncio.timeout_at(deadline) as bound:
                await self.app(scope, guarded_receive, tracking_send)
        except TimeoutError:
            if not bound.expired():
                raise
            if started:
                pass  # the answer is on its way: nothing better to send
            elif not body_done:  # the client's upload was slower than the deadline
                await self._refuse(send, 408, "request_timeout",
                                   f"request body not received within the request deadline ({route.deadline_s:g} s, "
                                   f"{received} bytes arrived)", close=True)
            else:  # queues and thread pools behind the route were slower than the deadline
                self.on_reject("deadline_exceeded")
                await self._refuse(send, 504, "deadline_exceeded",
                                   f"no answer within the request deadline ({route.deadline_s:g} s)")
        finally:
            if holding:
                self.slots.held -= 1

    async def _drain(self, receive: Receive, already: int, max_bytes: int) -> None:
        """Read and discard a body that passed the limit (bounded in bytes and time), so the
        client reads the 413 rather than a reset."""
        total, deadline = already, time.monotonic() + self.drain_seconds
        while total <= max_bytes:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                message = await asyncio.wait_for(receive(), remaining)
            except TimeoutError:
                return
            if message["type"] != "http.request":
                return
            total += len(message.get("body", b""))
            if not message.get("more_body", False):
                return
