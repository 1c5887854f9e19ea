"""Real processes for the fault tests: a redis-server that can be killed and restarted on the
same port, ``genclip serve`` and ``genclip worker`` subprocesses with the echo detector."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from svc_helpers import ROOT, free_port, subprocess_env


class RedisServer:
    """A private redis-server without persistence (a restart loses every key, as in production
    without AOF)."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not installed")
        self.exe = exe
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.kill()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


def genclip(command: str, log: Path, **env: str) -> subprocess.Popen:
    """``python -m service.cli_serve <command>`` with the echo detector and the given settings."""
    environment = subprocess_env(
        GENCLIP_DETECTOR_FACTORY="svc_fakes:echo_factory",
        GENCLIP_LOG_LEVEL="warning",
        GENCLIP_HEARTBEAT_INTERVAL_S="0.2",
        GENCLIP_HEARTBEAT_TTL_S="1.0",
        **env,
    )
    handle = open(log, "ab")  # noqa: SIM115 - closed by the caller through stop()
    proc = subprocess.Popen([sys.executable, "-m", "service.cli_serve", command], cwd=ROOT, env=environment,
                            stdout=handle, stderr=subprocess.STDOUT)
    proc.log_handle = handle  # type: ignore[attr-defined]
    proc.log_path = log  # type: ignore[attr-defined]
    return proc


def serve(log: Path, **env: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = genclip("serve", log, GENCLIP_HOST="127.0.0.1", GENCLIP_PORT=str(port), **env)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(base: str, proc: subprocess.Popen, timeout: float = 60.0, workers: int = 1) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}: {proc.log_path.read_text()[-3000:]}")
        try:
            r = httpx.get(base + "/ready", timeout=2)
            if r.status_code == 200 and len(r.json()["workers"]) >= workers:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base} never became ready")


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        handle = getattr(proc, "log_handle", None)
        if handle is not None:
            handle.close()
