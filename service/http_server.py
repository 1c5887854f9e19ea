"""The HTTP server of ``genclip serve``: uvicorn with a guarded HTTP/1.1 protocol.

:func:`build_server` is the one place that turns the settings into a ``uvicorn.Server`` (the
CLI, the tests and the benchmarks all use it). Its protocol, :class:`GuardedHttpProtocol`, is
uvicorn's ``httptools`` protocol with the guards that only the protocol can apply, because they
act before an ASGI app exists for the request or after it stopped reading:

* **timeouts**: the headers must arrive within ``header_timeout_s`` (of the connection, or of
  the first byte of a kept-alive request); the body within ``body_timeout_s`` of the headers,
  with no silence longer than ``body_idle_timeout_s`` (also between the headers and the first
  body byte). A slow request is answered 408 and its connection closed; a connection that
  never sent a byte is just closed. The body timer also covers a body the app did not read
  (uvicorn discards it after the response), so a refused slow client cannot hold a connection.
* **sizes**: ``Content-Length`` over the largest body any route takes (``max_body_bytes``)
  is answered 413 before the app sees it (``Content-Length: 10 GB`` with nothing sent gets
  its answer at once); a chunked body is counted as it arrives; request line + headers are
  capped at 64 KiB (431).
* **load shedding**: over ``http_request_limit`` requests being processed (body received),
  over 4 x as many still receiving their body (slow uploads hold no processing slot, so they
  cannot starve the others), or while the event loop runs more than
  ``http_max_loop_lag_ms`` late, a request is answered 503 ``overloaded``
  (with ``Retry-After`` / ``Retry-After-Ms``) without running the app: the cheapest answer
  there is, so that shedding itself cannot overload the process. ``/health``, ``/ready`` and
  ``/metrics`` are never shed. This replaces uvicorn's ``limit_concurrency``, which counts
  idle kept-alive connections as load and answers in plain text.
* **early admission**: the app may hand the protocol a ``gate`` (its upload slots and its
  admission control's last known verdict, :meth:`service.admission.Admission.peek`): while no
  upload slot is free (:class:`service.upload_guard.UploadSlots`) or the queue is known to be
  full, an upload is refused from its headers alone, without an ASGI task, middleware or
  multipart parsing, so that refusing twice the capacity costs little CPU.
* **arrival time**: each request is stamped when its first byte is parsed, minus the loop's
  current lag (bytes that waited in the kernel while the loop was busy), in
  ``scope["genclip.t0"]`` / ``scope["genclip.t0_wall"]``: deadlines and admission run from
  there, so queueing in front of the app counts against the request's deadline.
* **JSON everywhere**: every answer the protocol gives itself, including the 400 for malformed
  HTTP that uvicorn writes in plain text, is the service's JSON error body.

A request refused from its headers (shedding, early admission) keeps its connection when it
can (HTTP/1.1 keep-alive, a ``Content-Length`` body, no ``100-continue``): the answer goes out
at once and the body is read and dropped as it arrives, so a shed client neither gets a reset
nor has to reconnect (reconnecting at the overload rate is what overflows the kernel's accept
queue). Other answers given by the protocol close the connection gracefully ("lingering
close": the response is written, the write side shut down, and what the client still sends is
read and discarded for up to :data:`LINGER_S`). The backlog of connections the kernel holds
before the server accepts them is bounded (``http_backlog``), and the server listens on several
sockets so that it accepts them as fast as they arrive (:mod:`service.http_listeners`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.errors import error_body, retry_after_headers
from service.http_listeners import ListenerServer
from service.settings import Settings
from service.upload_guard import TICKET_KEY, Refusal, UploadTicket

PROBE_PATHS = frozenset({b"/health", b"/ready", b"/metrics"})
MAX_HEADER_BYTES = 64 * 1024
LINGER_S = 2.0
# Requests still receiving their body are capped separately, at this many per processing slot:
# a slow upload costs a socket and a small buffer, not the CPU and memory of a decode.
UPLOADS_PER_REQUEST_SLOT = 4


@dataclass(frozen=True)
class HttpLimits:
    """What the protocol enforces (see the module docstring); built from the settings."""

    header_timeout_s: float
    body_timeout_s: float
    body_idle_timeout_s: float
    max_body_bytes: int
    max_requests: int
    max_uploads: int
    max_loop_lag_s: float
    retry_after_ms: int
    max_header_bytes: int = MAX_HEADER_BYTES
    exempt_paths: frozenset[bytes] = PROBE_PATHS

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        return cls(
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            body_idle_timeout_s=settings.body_idle_timeout_s,
            max_body_bytes=settings.max_body_bytes,
            max_requests=settings.http_request_limit,
            max_uploads=UPLOADS_PER_REQUEST_SLOT * settings.http_request_limit,
            max_loop_lag_s=settings.http_max_loop_lag_ms / 1000.0,
            retry_after_ms=settings.retry_after_s * 1000,
        )


class LoopLag:
    """How late the event loop runs: a timer every ``interval_s`` measures its own lateness.

    :meth:`current` is the lateness of the last tick (decaying by half each tick), or how
    overdue the next tick already is, whichever is larger.
    """

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = 0.0
        self._last = 0.0

    def ensure_started(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is not loop:
            self._loop = loop
            self._last = 0.0
            self._schedule(loop.time())

    def _schedule(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + self.interval_s
        self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self._last = max(now - self._due, self._last * 0.5, 0.0)
        if not self._loop.is_closed():
            self._schedule(now)

    def current(self) -> float:
        """Seconds the loop is running late now."""
        if self._loop is None:
            return 0.0
        return max(self._last, self._loop.time() - self._due, 0.0)


class _Rejected(Exception):
    """Raised from a parser callback to stop parsing after the protocol answered itself."""


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus timeouts, size caps, shedding and JSON answers.

    Configured per server by :func:`protocol_class` (class attributes ``limits`` and
    ``loop_lag``).
    """

    limits: ClassVar[HttpLimits]
    loop_lag: ClassVar[LoopLag]
    observer: ClassVar[Callable[[str, str, int, str], None] | None] = None
    gate: ClassVar[Callable[[str, str], Refusal | UploadTicket | None] | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._rejected = False
        self._received_any = False
        self._in_headers = False
        self._header_bytes = 0
        self._expect_body = False
        self._body_bytes = 0
        self._body_deadline = 0.0
        self._last_body = 0.0
        self._discarding = False  # answered from the headers; the body is read and dropped

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.loop_lag.ensure_started(self.loop)
        self._arm(self.limits.header_timeout_s, self._on_header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        # requests that ran release their upload ticket in the upload guard; pipelined ones
        # still queued never will run: release theirs here
        for cycle, _app in self.pipeline:
            ticket = cycle.scope.get(TICKET_KEY)
            if ticket is not None:
                ticket.done()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return  # lingering close: read and discard
        self._received_any = True
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            if not self._rejected:  # else a callback of ours answered and stopped the parser
                self.logger.info("malformed HTTP request: %s", exc)
                self._bad_request(str(exc) or "invalid HTTP request")

    def _arm(self, delay: float, callback: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ------------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        lag = self.loop_lag.current()
        self.scope["genclip.t0"] = time.perf_counter() - lag  # type: ignore[typeddict-unknown-key]
        self.scope["genclip.t0_wall"] = time.time() - lag  # type: ignore[typeddict-unknown-key]
        self.scope["genclip.loop_lag_s"] = lag  # type: ignore[typeddict-unknown-key]
        self._in_headers = True
        self._header_bytes = 0
        if self._timer is None:  # kept-alive connection: the headers' clock starts now
            self._arm(self.limits.header_timeout_s, self._on_header_timeout)

    def on_url(self, url: bytes) -> None:
        self._count_header_bytes(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header_bytes(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count_header_bytes(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.limits.max_header_bytes:
            self._reject(431, "headers_too_large",
                         f"request line and headers are over {self.limits.max_header_bytes} bytes")
            raise _Rejected

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm()
        length, chunked = self._declared_body()
        if length is not None and length > self.limits.max_body_bytes:
            self._reject(413, "payload_too_large",
                         f"request body is {length} bytes, the limit is {self.limits.max_body_bytes}")
            raise _Rejected
        path = httptools.parse_url(self.url).path
        if path not in self.limits.exempt_paths:
            refusal = self._overload(chunked or bool(length))
            if refusal is None and type(self).gate is not None:
                # the app's admission: free upload slots, the last known queue state
                early = type(self).gate(self.parser.get_method().decode("ascii", "replace"), path.decode("latin-1"))
                if isinstance(early, Refusal):
                    refusal = (early.status, early.code, early.message, early.retry_after_ms)
                elif early is not None:  # let through: counted against the slots once its body is in
                    self.scope[TICKET_KEY] = early  # type: ignore[literal-required]
            elif refusal is not None:
                refusal = (503, "overloaded", refusal, self.limits.retry_after_ms)
            if refusal is not None:
                status, code, message, retry_after_ms = refusal
                if self._can_answer_and_keep(chunked):
                    self._answer(status, code, message, retry_after_ms=retry_after_ms, keep_alive=True)
                    self._discarding = True
                    self._start_body_clock(chunked or bool(length))
                    return  # no ASGI task: the parser goes on, dropping the body, then the next request
                self._reject(status, code, message, retry_after_ms=retry_after_ms)
                raise _Rejected
        super().on_headers_complete()
        self._start_body_clock(chunked or bool(length))

    def _can_answer_and_keep(self, chunked: bool) -> bool:
        """Whether an answer given from the headers can keep the connection: a plain HTTP/1.1
        keep-alive request whose body (if any) has a length and is not waiting for 100-continue,
        and no earlier request of the connection still being answered (responses stay in order)."""
        previous = self.cycle
        return (not chunked and not self.expect_100_continue and self.parser.should_keep_alive()
                and (previous is None or previous.response_complete))

    def _start_body_clock(self, expect_body: bool) -> None:
        self._expect_body = expect_body
        if expect_body:
            now = self.loop.time()
            self._body_bytes = 0
            self._body_deadline = now + self.limits.body_timeout_s
            self._last_body = now
            self._arm(min(self.limits.body_idle_timeout_s, self.limits.body_timeout_s), self._on_body_timer)

    def on_body(self, body: bytes) -> None:
        if self._rejected:
            return
        self._last_body = self.loop.time()
        if self._discarding:
            return
        self._body_bytes += len(body)
        if self._body_bytes > self.limits.max_body_bytes:
            self._abort_cycle(413, "payload_too_large",
                              f"request body passed the limit of {self.limits.max_body_bytes} bytes")
            raise _Rejected
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._rejected:
            return
        if self._expect_body:
            self._expect_body = False
            self._disarm()
        ticket = self.scope.get(TICKET_KEY)
        if ticket is not None:
            ticket.arrived()
        if self._discarding:  # the request answered from its headers is fully read: next one
            self._discarding = False
            self.server_state.total_requests += 1
            self.flow.resume_reading()
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
            return
        super().on_message_complete()

    def _declared_body(self) -> tuple[int | None, bool]:
        length: int | None = None
        chunked = False
        for name, value in self.headers:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        return length, chunked

    def _in_progress(self) -> tuple[int, int]:
        """(requests being processed, requests still receiving their body) on this server."""
        busy = uploading = 0
        for conn in self.connections:
            cycle = getattr(conn, "cycle", None)
            if cycle is None or cycle.response_complete or conn is self:
                continue
            if getattr(conn, "_expect_body", False):
                uploading += 1
            else:
                busy += 1
        return busy, uploading

    def _overload(self, with_body: bool) -> str | None:
        limits = self.limits
        busy, uploading = self._in_progress()
        if busy >= limits.max_requests:
            return f"{busy} requests in progress, the limit is {limits.max_requests}"
        if with_body and uploading >= limits.max_uploads:
            return f"{uploading} uploads arriving, the limit is {limits.max_uploads}"
        if limits.max_loop_lag_s > 0:
            lag = self.loop_lag.current()
            if lag > limits.max_loop_lag_s:
                return f"the server is {lag * 1000:.0f} ms behind (limit {limits.max_loop_lag_s * 1000:.0f} ms)"
        return None

    # ------------------------------------------------------------------ timers
    def _on_header_timeout(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self._rejected:
            return
        if self._in_headers or self._received_any:
            self._reject(408, "request_timeout",
                         f"request headers not received within {self.limits.header_timeout_s:g} s")
        else:  # connected and never sent a byte: nothing to answer
            self.transport.close()

    def _on_body_timer(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self._rejected or not self._expect_body:
            return
        limits = self.limits
        now = self.loop.time()
        if now >= self._body_deadline:
            self._abort_cycle(408, "request_timeout",
                              f"request body not received within {limits.body_timeout_s:g} s "
                              f"({self._body_bytes} bytes arrived)")
            return
        if self.flow.read_paused:  # the app is not reading yet: the silence is not the client's
            self._last_body = now
        idle_until = self._last_body + limits.body_idle_timeout_s
        if now >= idle_until:
            self._abort_cycle(408, "request_timeout",
                              f"no request body bytes for {limits.body_idle_timeout_s:g} s "
                              f"({self._body_bytes} bytes arrived)")
            return
        self._arm(min(idle_until, self._body_deadline) - now, self._on_body_timer)

    # ------------------------------------------------------------------ answers
    def _abort_cycle(self, status: int, code: str, message: str) -> None:
        """Answer ``status`` for a request whose app is running (its ``receive`` now sees a
        disconnect and what it sends is dropped), or just close once a response started."""
        if self._discarding:  # answered from its headers already: a second answer would be garbage
            self._rejected = True
            self.transport.close()
            return
        cycle = self.cycle
        if cycle is not None:
            answered = cycle.response_started
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
            if answered:  # the client has (or is getting) its answer: a second one would be garbage
                self._rejected = True
                self.transport.close()
                return
        self._reject(status, code, message)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's plain-text 400, answered as JSON (in case uvicorn code paths still call it)."""
        if not self._rejected:
            self._bad_request(msg)

    def _bad_request(self, detail: str) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                self._rejected = True
                self.transport.close()
                return
        self._reject(400, "bad_request", f"malformed HTTP request: {detail}")

    def _answer(self, status: int, code: str, message: str, *, retry_after_ms: int | None = None,
                keep_alive: bool = False) -> None:
        """Write a JSON error response (``connection: close`` unless ``keep_alive``)."""
        body = error_body(status, code, message, retry_after_ms=retry_after_ms)
        headers = [*self.server_state.default_headers,
                   (b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        if not keep_alive:
            headers.append((b"connection", b"close"))
        if retry_after_ms is not None:
            headers += [(k.lower().encode(), v.encode()) for k, v in retry_after_headers(retry_after_ms).items()]
        out = [STATUS_LINE[status]]
        for name, value in headers:
            out += [name, b": ", value, b"\r\n"]
        out += [b"\r\n", body]
        self.transport.write(b"".join(out))
        self._observe(status, code)

    def _reject(self, status: int, code: str, message: str, *, retry_after_ms: int | None = None) -> None:
        """Write a JSON error, then close gracefully (see :data:`LINGER_S`)."""
        if self._rejected or self.transport.is_closing():
            self._rejected = True
            return
        self._rejected = True
        self._disarm()
        self._answer(status, code, message, retry_after_ms=retry_after_ms)
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self._timer = self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()


    def _observe(self, status: int, code: str) -> None:
        observer = type(self).observer
        if observer is None:
            return
        try:
            method = self.parser.get_method().decode("ascii", "replace")
        except Exception:
            method = "?"
        try:
            path = httptools.parse_url(self.url).path.decode("latin-1")
        except Exception:
            path = ""
        try:
            observer(method, path, status, code)
        except Exception:  # metrics must never break the connection handling
            self.logger.exception("request observer failed")


def protocol_class(limits: HttpLimits, observer: Callable[[str, str, int, str], None] | None = None,
                   gate: Callable[[str, str], Refusal | UploadTicket | None] | None = None
                   ) -> type[GuardedHttpProtocol]:
    """A :class:`GuardedHttpProtocol` subclass bound to ``limits`` (one per server).

    ``observer(method, path, status, code)`` is told of every answer the protocol gives itself;
    ``gate(method, path)`` may refuse a request from its headers (a
    :class:`service.upload_guard.Refusal`), or let an upload through with a
    :class:`service.upload_guard.UploadTicket` (put in the scope; told when its body has
    arrived, and released here if the request was still queued behind a pipelined one when
    the connection ended), or ``None``.
    """
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {
        "limits": limits, "loop_lag": LoopLag(),
        "observer": staticmethod(observer) if observer is not None else None,
        "gate": staticmethod(gate) if gate is not None else None,
    })


def build_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn configuration for ``app`` from ``settings`` (``overrides`` go to ``uvicorn.Config``)."""
    app_state = getattr(app, "state", None)
    protocol = protocol_class(HttpLimits.from_settings(settings), getattr(app_state, "record_early_answer", None),
                              getattr(app_state, "early_admission", None))
    if app_state is not None:
        app_state.loop_lag = protocol.loop_lag  # reported by /metrics
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "http": protocol,
        "backlog": settings.http_backlog,
        "timeout_graceful_shutdown": int(settings.graceful_shutdown_s) or None,
        "lifespan": "on",
    }
    options.update(overrides)
    return uvicorn.Config(app, **options)


def build_server(app: Any, settings: Settings, **overrides: Any) -> ListenerServer:
    """The ``uvicorn.Server`` that ``genclip serve`` runs (``server.run()`` blocks), listening on
    ``http_listen_sockets`` sockets (:mod:`service.http_listeners`)."""
    return ListenerServer(build_config(app, settings, **overrides), settings.http_listen_sockets)
