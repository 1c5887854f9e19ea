"""Several listening sockets on one port (service.http_listeners): bound as a SO_REUSEPORT group
of this server only, all serving, all closed at shutdown."""

from __future__ import annotations

import errno
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from live_server import live_server
from svc_fakes import EchoDetector
from svc_helpers import settings_for

from service.http_listeners import bind_listeners, reuseport_supported

pytestmark = pytest.mark.skipif(not reuseport_supported(), reason="SO_REUSEPORT is Linux's")


def listening_sockets_on(port: int) -> int:
    """Sockets of this network namespace in state LISTEN on ``port`` (/proc/net/tcp)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def test_bind_listeners_binds_one_port_for_all_and_refuses_a_port_in_use() -> None:
    sockets = bind_listeners("127.0.0.1", 0, 4)
    try:
        ports = {sock.getsockname()[1] for sock in sockets}
        assert len(sockets) == 4 and len(ports) == 1
        assert all(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for sock in sockets)
        port = ports.pop()
        for sock in sockets:
            sock.listen(16)
        # the port is held: a second server (whatever its options) must not join or share it
        with pytest.raises(OSError) as held:
            bind_listeners("127.0.0.1", port, 4)
        assert held.value.errno == errno.EADDRINUSE
    finally:
        for sock in sockets:
            sock.close()
    assert bind_listeners("127.0.0.1", 0, 1) == []  # one socket: uvicorn binds its own


def test_server_listens_on_all_its_sockets_serves_through_them_and_closes_them() -> None:
    settings = settings_for(http_listen_sockets=4)
    with live_server(settings, detector=EchoDetector()) as (base, _app, srv):
        port = int(base.rsplit(":", 1)[1])
        assert listening_sockets_on(port) == 4
        assert len(srv.bound_sockets) == 4

        def fresh_connection(_: int) -> int:  # a new connection each: the kernel spreads them
            with httpx.Client(timeout=10) as client:
                return client.get(base + "/health").status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(fresh_connection, range(64)))
        assert statuses == [200] * 64
        with pytest.raises(OSError):  # a second server on the same port fails, never shares it
            bind_listeners("127.0.0.1", port, 4)
    assert listening_sockets_on(port) == 0


def test_one_listen_socket_is_plain_uvicorn() -> None:
    settings = settings_for(http_listen_sockets=1)
    with live_server(settings, detector=EchoDetector()) as (base, _app, srv):
        port = int(base.rsplit(":", 1)[1])
        assert listening_sockets_on(port) == 1 and srv.bound_sockets == []
        assert httpx.get(base + "/health", timeout=10).status_code == 200
