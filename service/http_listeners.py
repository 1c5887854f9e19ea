"""The listening sockets of ``genclip serve``: several on one port, so that a burst of new
connections is accepted as fast as it arrives.

uvloop (libuv underneath) accepts **one** connection per listening socket per event-loop
iteration. Under load an iteration takes a few milliseconds, so a burst of new connections
(cameras reconnecting after a network blip, clients that open a connection per request, the
first second of an overload) waits in the kernel's accept queue: measured with
``bench/bench_overload.py`` on Redis at 2x capacity, about 250 connections opened within 0.7 s
waited 0.5-0.8 s there before the server saw their first byte (strace: one ``accept4`` per
iteration, never ``EAGAIN``), while requests on kept-alive connections were answered in
milliseconds. With ``http_listen_sockets`` sockets bound to the same port with
``SO_REUSEPORT``, the kernel spreads new connections over them and the loop accepts one per
socket per iteration: the same run's new-connection 503s fell to p50 43 ms.

Only this server's own sockets join the group: the port is first bound once without
``SO_REUSEPORT``, so that a port already held by another process (another ``genclip serve``
left running, whatever its options) fails with "address in use" instead of being silently
shared (Linux also requires the same user for a ``SO_REUSEPORT`` group).
"""

from __future__ import annotations

import logging
import socket
import sys

import uvicorn

log = logging.getLogger("service")

__all__ = ["ListenerServer", "bind_listeners", "reuseport_supported"]


def reuseport_supported() -> bool:
    """Whether this platform spreads new connections over ``SO_REUSEPORT`` sockets: Linux does
    (BSD and macOS have the option but hand connections to one socket of the group)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def _socket_for(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET  # as uvicorn binds
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


def bind_listeners(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` sockets bound to ``host:port`` with ``SO_REUSEPORT``, not yet listening (the
    server listens once the app has started, as uvicorn does). ``[]`` when ``count <= 1`` or the
    platform has no ``SO_REUSEPORT``: the caller lets uvicorn bind its single socket.

    ``port`` 0 picks a free port shared by all. Raises :class:`OSError` when the port is in use.
    """
    if count <= 1 or not reuseport_supported():
        return []
    probe = _socket_for(host)
    try:
        probe.bind((host, port))  # no SO_REUSEPORT: fails if anything else holds the port
        port = probe.getsockname()[1]
    finally:
        probe.close()
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = _socket_for(host)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class ListenerServer(uvicorn.Server):
    """``uvicorn.Server`` listening on :func:`bind_listeners` sockets (one plain uvicorn socket
    when ``listen_sockets`` is 1). Sockets passed to :meth:`run` explicitly are used as given."""

    def __init__(self, config: uvicorn.Config, listen_sockets: int) -> None:
        super().__init__(config)
        self.listen_sockets = listen_sockets
        self._own: list[socket.socket] = []

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if sockets is None and self.listen_sockets > 1:
            try:
                self._own = bind_listeners(self.config.host, self.config.port, self.listen_sockets)
            except OSError as exc:
                log.error("cannot listen on %s:%d: %s", self.config.host, self.config.port, exc)
                raise SystemExit(1) from None
            sockets = self._own or None
        await super().startup(sockets=sockets)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets=sockets if sockets is not None else (self._own or None))

    @property
    def bound_sockets(self) -> list[socket.socket]:
        """The listening sockets this server bound itself (empty with a single uvicorn socket)."""
        return list(self._own)
