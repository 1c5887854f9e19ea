"""A real uvicorn server (service.http_server.build_server) in a thread, and raw-socket HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from svc_helpers import free_port


@contextmanager
def live_server(settings, **app_kwargs):
    """Serve ``create_app(settings, **app_kwargs)`` on a free loopback port; yields (base url, app, server)."""
    from service.app import create_app
    from service.http_server import build_server

    settings = settings.model_copy(update={"host": "127.0.0.1", "port": free_port()})
    app = create_app(settings, **app_kwargs)
    server = build_server(app, settings, log_level="warning")
    thread = threading.Thread(target=server.run, name="live-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{settings.port}", app, server
    finally:
        server.should_exit = True
        thread.join(15)


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after the response
    elapsed: float
    raw: bytes = field(repr=False, default=b"")

    def json(self) -> dict:
        return json.loads(self.body)


def connect(base: str, timeout: float = 10.0) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_response(sock: socket.socket, started: float | None = None) -> RawResponse:
    """Read one response (Content-Length bodies), then whether the server closes the connection."""
    started = time.monotonic() if started is None else started
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    elapsed = time.monotonic() - started
    closed = False
    if headers.get("connection", "").lower() == "close":
        try:
            sock.settimeout(3.0)
            while sock.recv(65536):
                pass
            closed = True
        except (TimeoutError, ConnectionResetError):
            closed = False
    return RawResponse(status, headers, body[:length], closed, elapsed, data)


def raw_exchange(base: str, payload: bytes, timeout: float = 10.0) -> RawResponse:
    with connect(base, timeout) as sock:
        started = time.monotonic()
        sock.sendall(payload)
        return read_response(sock, started)


def multipart(fields: list[tuple[str, str | None, bytes, str | None]], boundary: str = "xYzBoUnDaRy") -> tuple[bytes, str]:
    """(body, content type) for [(name, filename or None, data, content type or None)]."""
    out = b""
    for name, filename, data, ctype in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return out, f"multipart/form-data; boundary={boundary}"


def post_head(path: str, content_type: str, length: int | None, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: {content_type}\r\n"
    if length is not None:
        head += f"Content-Length: {length}\r\n"
    return (head + extra + "\r\n").encode()
