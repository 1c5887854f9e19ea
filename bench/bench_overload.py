"""Overload benchmark: a real ``genclip serve`` (and ``genclip worker`` on Redis) at twice its
capacity, and through a Redis restart under load.

For each transport (in-process queue; Redis Streams with a separate worker process):

1. capacity: closed loop (``2 x max_batch`` clients back to back) -> answers/s;
2. overload: open loop at ``--factor`` (2) x capacity for ``--seconds`` (60), plus a few
   slowloris clients dribbling their bodies at 2 bytes/s. Printed: status counts (only
   200/503/504, and 408 for the slow bodies, are allowed), the slowest answer against the
   deadline + 1 s, latency p50/p99 per status (503s: target <= 50 ms p99), throughput of
   200s against capacity, and the API (and worker) RSS at start / peak / end;
3. Redis only: the same open loop for ``--restart-seconds`` with Redis killed (SIGKILL) at a
   third of it and started again on the same port one second later (no persistence: stream,
   group and heartbeats are gone). Printed: 200s per second before / around / after, the time
   from the restart until the 200 rate is back to >= 90% of the rate before the kill, and the
   status counts of the whole run.

The load generator is a minimal HTTP/1.1 client on raw asyncio streams (pre-encoded requests,
kept-alive connections), so that the client is not what saturates. Everything talks only to
127.0.0.1; the model is the tiny random backbone by default (``--backbone``), so figures are
about the service, never model quality. Timings on a shared machine are noisy: the script
prints the load average before and after, both event loops' lag (server and load generator)
and the kernel's TCP listen-overflow / retransmission counters, which show waits that happen
before any server code runs. Run: ``python bench/bench_overload.py``; it writes a JSON report
(``--report``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_service import free_port, make_images, redis_server_command, rss_mb  # noqa: E402

BOUNDARY = "genclipbenchboundary"


# ====================================================================== raw HTTP client
def inspect_request(port: int, image: bytes, heatmap: str) -> bytes:
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (f"POST /inspect?heatmap={heatmap} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


@dataclass
class Shot:
    sent: float  # seconds since the run started
    latency: float  # seconds; for -1 / -2 the time until the failure
    status: int  # HTTP status; -1 connection error, -2 no answer within the client timeout
    code: str = ""  # the JSON "error" of a non-200
    connected: bool = False  # the request opened a new connection (connect + accept in its latency)


class RawClient:
    """Kept-alive HTTP/1.1 connections to one port; one request per connection at a time."""

    def __init__(self, port: int, timeout: float) -> None:
        self.port = port
        self.timeout = timeout
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0
        self.stale_retries = 0

    async def _exchange(self, payload: bytes) -> tuple[int, bytes, bool]:
        """(status, body, whether a new connection was opened for it)."""
        while self.idle:  # a kept-alive connection the server closed meanwhile: retry on another,
            reader, writer = self.idle.pop()  # as HTTP clients do when nothing of the answer came
            try:
                return (*await self._on(reader, writer, payload), False)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                    raise
                self.stale_retries += 1
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=2**22)
        self.opened += 1
        return (*await self._on(reader, writer, payload), True)

    async def _on(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> tuple[int, bytes]:
        try:
            writer.write(payload)
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split()[1])
            length, close = 0, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and b"close" in value.lower():
                    close = True
            body = await reader.readexactly(length)
        except BaseException:
            writer.close()
            raise
        if close:
            writer.close()
        else:
            self.idle.append((reader, writer))
        return status, body

    async def send(self, payload: bytes, t0: float) -> Shot:
        sent = time.monotonic() - t0
        try:
            status, body, connected = await asyncio.wait_for(self._exchange(payload), self.timeout)
        except TimeoutError:
            return Shot(sent, time.monotonic() - t0 - sent, -2, "client timeout")
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            return Shot(sent, time.monotonic() - t0 - sent, -1, type(exc).__name__)
        code = ""
        if status != 200:
            try:
                code = json.loads(body).get("error", "")
            except ValueError:
                code = "not-json"
        return Shot(sent, time.monotonic() - t0 - sent, status, code, connected)

    def close(self) -> None:
        for _reader, writer in self.idle:
            writer.close()
        self.idle.clear()


async def closed_loop(port: int, payloads: list[bytes], clients: int, seconds: float, timeout: float) -> float:
    """200 answers per second with ``clients`` requests always in flight."""
    client = RawClient(port, timeout)
    t0 = time.monotonic()
    ok = 0

    async def runner(k: int) -> None:
        nonlocal ok
        i = k
        while time.monotonic() - t0 < seconds:
            shot = await client.send(payloads[i % len(payloads)], t0)
            ok += shot.status == 200
            i += clients

    await asyncio.gather(*(runner(k) for k in range(clients)))
    elapsed = time.monotonic() - t0
    client.close()
    return ok / elapsed


async def slow_client(port: int, payload: bytes, t0: float, give_up: float) -> Shot:
    """A client sending its body at 2 bytes/s (slowloris)."""
    sent = time.monotonic() - t0
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        return Shot(sent, 0.0, -1, type(exc).__name__)
    head_end = payload.index(b"\r\n\r\n") + 4
    writer.write(payload[:head_end])
    status, code = -2, "no answer"
    try:
        pos = head_end
        read = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
        while time.monotonic() - t0 - sent < give_up:
            done, _ = await asyncio.wait({read}, timeout=0.5)
            if done:
                head = read.result()
                status = int(head.split()[1])
                length = int(next((v for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
                                   if k.strip().lower() == b"content-length"), b"0"))
                body = await reader.readexactly(length)
                code = json.loads(body).get("error", "") if status != 200 else ""
                break
            if pos < len(payload):
                writer.write(payload[pos:pos + 1])
                pos += 1
        read.cancel()
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        status, code = -1, type(exc).__name__
    writer.close()
    return Shot(sent, time.monotonic() - t0 - sent, status, code)


async def open_loop(port: int, payloads: list[bytes], rate: float, seconds: float, timeout: float,
                    pids: dict[str, int], events: dict[float, object] | None = None, slow: int = 0
                    ) -> tuple[list[Shot], list[Shot], dict[str, list[float]], dict[str, int]]:
    """``rate`` requests/s for ``seconds`` (plus ``slow`` slowloris clients); RSS sampled every 0.25 s."""
    client = RawClient(port, timeout)
    rss: dict[str, list[float]] = {role: [rss_mb(pid)] for role, pid in pids.items()}
    pending_events = sorted((events or {}).items())
    stop = asyncio.Event()

    async def sampler() -> None:
        while not stop.is_set():
            for role, pid in pids.items():
                rss[role].append(rss_mb(pid))
            await asyncio.sleep(0.25)

    lags: dict[str, list[float]] = {"client": [], "server": []}

    async def lag_probe() -> None:
        """The client's own event-loop lateness (a starved client inflates every latency it
        measures) and the server's, from its ``genclip_event_loop_lag_seconds`` gauge."""
        probe = RawClient(port, 5.0)
        metrics_request = f"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        n = 0
        while not stop.is_set():
            due = time.monotonic() + 0.05
            await asyncio.sleep(0.05)
            lags["client"].append(max(0.0, time.monotonic() - due))
            n += 1
            if n % 10 == 0:
                try:
                    _status, body, _new = await asyncio.wait_for(probe._exchange(metrics_request), 5.0)
                    for line in body.decode().splitlines():
                        if line.startswith("genclip_event_loop_lag_seconds "):
                            lags["server"].append(float(line.split()[1]))
                except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                    pass
        probe.close()

    sampling = asyncio.create_task(sampler())
    probing = asyncio.create_task(lag_probe())
    tcp_before = tcp_counters()
    t0 = time.monotonic()
    slow_tasks = [asyncio.create_task(slow_client(port, payloads[0], t0, 60.0)) for _ in range(slow)]
    tasks, side = [], []
    i = 0
    while True:
        now = time.monotonic() - t0
        if now >= seconds:
            break
        while pending_events and pending_events[0][0] <= now:
            side.append(asyncio.create_task(asyncio.to_thread(pending_events.pop(0)[1])))
        tasks.append(asyncio.create_task(client.send(payloads[i % len(payloads)], t0)))
        i += 1
        delay = t0 + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    shots = list(await asyncio.gather(*tasks))
    slow_shots = list(await asyncio.gather(*slow_tasks))
    await asyncio.gather(*side)
    stop.set()
    await sampling
    await probing
    for role, pid in pids.items():
        rss[role].append(rss_mb(pid))
    client.close()
    tcp_after = tcp_counters()
    return shots, slow_shots, rss, {
        "connections_opened": client.opened, "stale_keepalive_retries": client.stale_retries,
        "kernel_tcp": {k: tcp_after[k] - tcp_before.get(k, 0) for k in tcp_after},
        "client_loop_lag_ms": {"p50": 1000 * pct(lags["client"], 50), "p99": 1000 * pct(lags["client"], 99)},
        "server_loop_lag_ms": {"p50": 1000 * pct(lags["server"], 50), "p99": 1000 * pct(lags["server"], 99),
                               "max": 1000 * max(lags["server"], default=float("nan"))},
    }


def tcp_counters() -> dict[str, int]:
    """Kernel TCP counters of this network namespace (shared with whatever else runs here)."""
    wanted = {"ListenOverflows", "ListenDrops", "RetransSegs", "TCPSynRetrans", "TCPTimeouts", "TCPLostRetransmit"}
    out: dict[str, int] = {}
    for name in ("/proc/net/netstat", "/proc/net/snmp"):
        try:
            lines = Path(name).read_text().splitlines()
        except OSError:
            continue
        for head, values in zip(lines[::2], lines[1::2], strict=False):
            for key, value in zip(head.split()[1:], values.split()[1:], strict=False):
                if key in wanted:
                    out[key] = out.get(key, 0) + int(value)
    return out


# ====================================================================== the stack under test
@dataclass
class Stack:
    transport: str
    port: int
    api: subprocess.Popen
    worker: subprocess.Popen | None = None
    redis: subprocess.Popen | None = None
    redis_args: list[str] = field(default_factory=list)
    tmp: tempfile.TemporaryDirectory | None = None

    def pids(self) -> dict[str, int]:
        out = {"api": self.api.pid}
        if self.worker is not None:
            out["worker"] = self.worker.pid
        return out

    def kill_redis(self) -> None:
        assert self.redis is not None
        self.redis.send_signal(signal.SIGKILL)
        self.redis.wait(10)

    def start_redis(self) -> None:
        self.redis = subprocess.Popen(self.redis_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        for proc in (self.api, self.worker):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (self.api, self.worker):
            if proc is not None:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if self.redis is not None and self.redis.poll() is None:
            self.redis.kill()
            self.redis.wait(10)
        if self.tmp is not None:
            self.tmp.cleanup()


def start_stack(transport: str, args: argparse.Namespace) -> Stack:
    env = dict(os.environ)
    for key in [k for k in env if k.startswith("GENCLIP_")]:
        env.pop(key)
    env.update({
        "PYTHONPATH": str(ROOT),
        "GENCLIP_DETECTOR": "baseline",
        "GENCLIP_BACKBONE": args.backbone,
        "GENCLIP_BACKBONE_WEIGHTS": "random",
        "GENCLIP_DEVICE": "cpu",
        "GENCLIP_TORCH_THREADS": str(args.torch_threads),
        "GENCLIP_MAX_BATCH": str(args.max_batch),
        "GENCLIP_MAX_WAIT_MS": str(args.max_wait_ms),
        "GENCLIP_QUEUE_MAX_DEPTH": str(args.queue_depth),
        "GENCLIP_JOB_TIMEOUT_S": str(args.deadline),
        "GENCLIP_BODY_TIMEOUT_S": str(args.body_timeout),
        "GENCLIP_LOG_LEVEL": "warning",
        "OMP_NUM_THREADS": str(args.torch_threads),
    })
    if args.image_size:
        env["GENCLIP_IMAGE_SIZE"] = str(args.image_size)
    port = free_port()
    stack = Stack(transport, port, api=None)  # type: ignore[arg-type]
    # a fresh database and records folder each run (not the repository's ./genclip.db and
    # ./records, whose size would change what a run measures)
    stack.tmp = tempfile.TemporaryDirectory(prefix="bench-overload-")
    env["GENCLIP_DATABASE_URL"] = f"sqlite:///{stack.tmp.name}/genclip.db"
    env["GENCLIP_RECORDS_DIR"] = f"{stack.tmp.name}/records"
    if transport == "redis":
        rport = free_port()
        stack.redis_args = redis_server_command(rport, stack.tmp.name)
        stack.start_redis()
        env["GENCLIP_REDIS_URL"] = f"redis://127.0.0.1:{rport}/0"
        time.sleep(0.3)
        stack.worker = subprocess.Popen([sys.executable, "-m", "service.cli_serve", "worker"], cwd=ROOT,
                                        env=dict(env, GENCLIP_WORKER_ID="bench-worker"))
    stack.api = subprocess.Popen([sys.executable, "-m", "service.cli_serve", "serve", "--host", "127.0.0.1",
                                  "--port", str(port)], cwd=ROOT, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return stack
        except httpx.HTTPError:
            pass
        if stack.api.poll() is not None or (stack.worker is not None and stack.worker.poll() is not None):
            break
        time.sleep(0.25)
    stack.stop()
    raise SystemExit(f"{transport}: the service did not become ready")


# ====================================================================== figures
def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(shots: list[Shot], deadline: float) -> dict:
    statuses: dict[int, int] = {}
    codes: dict[str, int] = {}
    for s in shots:
        statuses[s.status] = statuses.get(s.status, 0) + 1
        if s.code:
            codes[s.code] = codes.get(s.code, 0) + 1
    lat = {st: [s.latency * 1000 for s in shots if s.status == st] for st in statuses}
    # where a 503's time goes: requests sent on a kept-alive connection against those that had
    # to connect first (connect + accept by a busy loop), and per refusal code
    split_503: dict[str, dict[str, float]] = {}
    for label, keep in (("kept-alive", lambda s: not s.connected), ("new connection", lambda s: s.connected)):
        v = [s.latency * 1000 for s in shots if s.status == 503 and keep(s)]
        if v:
            split_503[label] = {"n": len(v), "p50": pct(v, 50), "p99": pct(v, 99)}
    for code in sorted({s.code for s in shots if s.status == 503}):
        v = [s.latency * 1000 for s in shots if s.status == 503 and s.code == code]
        split_503[code] = {"n": len(v), "p50": pct(v, 50), "p99": pct(v, 99)}
    return {
        "latency_503_ms_by": split_503,
        "requests": len(shots),
        "statuses": dict(sorted(statuses.items())),
        "codes": dict(sorted(codes.items())),
        "latency_ms": {st: {"p50": pct(v, 50), "p99": pct(v, 99), "max": max(v)} for st, v in sorted(lat.items())},
        "slowest_s": max((s.latency for s in shots), default=0.0),
        "within_deadline_plus_1s": all(s.latency <= deadline + 1.0 for s in shots),
        "slowest": [(round(s.sent, 2), round(s.latency, 2), s.status, s.code)
                    for s in sorted(shots, key=lambda s: -s.latency)[:5]],
        "only_allowed_statuses": set(statuses) <= {200, 503, 504},
    }


def per_second(shots: list[Shot], seconds: float) -> list[int]:
    """200 answers per second, by the second they were answered in."""
    counts = [0] * (int(seconds) + 30)
    for s in shots:
        if s.status == 200:
            k = int(s.sent + s.latency)
            if k < len(counts):
                counts[k] += 1
    return counts[: int(seconds)]


def print_lags(summary: dict) -> None:
    c, v = summary["client_loop_lag_ms"], summary["server_loop_lag_ms"]
    print(f"  event-loop lag: server p50 {v['p50']:.0f} ms / p99 {v['p99']:.0f} ms / max {v['max']:.0f} ms; "
          f"load generator p50 {c['p50']:.0f} ms / p99 {c['p99']:.0f} ms (a late client inflates what it measures)")
    print(f"  kernel TCP counters during the run (whole network namespace, other work included): "
          f"{summary['kernel_tcp']} (listen overflows and retransmissions are waits no server sees)")


def print_overload(transport: str, capacity: float, rate: float, summary: dict, slow: dict,
                   rss: dict[str, list[float]], seconds: float, deadline: float) -> None:
    ok = summary["statuses"].get(200, 0)
    print(f"\n[{transport}] capacity {capacity:.1f} req/s; offered {rate:.1f} req/s for {seconds:.0f} s "
          f"({summary['requests']} requests), deadline {deadline:g} s")
    print(f"  statuses {summary['statuses']}  codes {summary['codes']}  (client: {summary['connections_opened']} "
          f"connections, {summary['stale_keepalive_retries']} retried after a kept-alive connection closed)")
    for st, lat in summary["latency_ms"].items():
        print(f"  {st}: p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms")
    if summary["latency_503_ms_by"]:
        print("  503 latency by " + "; ".join(f"{k}: n {v['n']}, p50 {v['p50']:.1f} ms, p99 {v['p99']:.1f} ms"
                                              for k, v in summary["latency_503_ms_by"].items()))
    print_lags(summary)
    p99_503 = summary["latency_ms"].get(503, {}).get("p99", float("nan"))
    print(f"  200s {ok / seconds:.1f}/s = {ok / seconds / capacity:.2f} x capacity; slowest answer "
          f"{summary['slowest_s']:.2f} s (deadline + 1 s = {deadline + 1:g} s): "
          f"{'OK' if summary['within_deadline_plus_1s'] else 'EXCEEDED'}; 503 p99 {p99_503:.1f} ms "
          f"(target <= 50 ms: {'OK' if p99_503 <= 50 else 'MISSED'}); only 200/503/504: "
          f"{'OK' if summary['only_allowed_statuses'] else 'NO'}")
    if slow["requests"]:
        print(f"  slow-body clients (2 bytes/s): statuses {slow['statuses']} after "
              f"{slow['latency_ms'].get(408, {}).get('p50', float('nan')) / 1000:.1f} s (p50)")
    for role, values in rss.items():
        print(f"  RSS {role}: start {values[0]:.0f} MB, peak {max(values):.0f} MB, end {values[-1]:.0f} MB")


def run_transport(transport: str, args: argparse.Namespace, images: list[bytes]) -> dict:
    stack = start_stack(transport, args)
    try:
        payloads = [inspect_request(stack.port, im, args.heatmap) for im in images]
        asyncio.run(closed_loop(stack.port, payloads, 2 * args.max_batch, 3.0, args.deadline + 5))  # warm-up
        capacity = asyncio.run(closed_loop(stack.port, payloads, 2 * args.max_batch, args.capacity_seconds,
                                           args.deadline + 5))
        rate = args.factor * capacity
        shots, slow_shots, rss, conns = asyncio.run(open_loop(stack.port, payloads, rate, args.seconds,
                                                              args.deadline + 5, stack.pids(), slow=args.slow_clients))
        summary, slow = summarize(shots, args.deadline), summarize(slow_shots, args.deadline)
        summary.update(conns)
        print_overload(transport, capacity, rate, summary, slow, rss, args.seconds, args.deadline)
        result = {"transport": transport, "capacity": capacity, "rate": rate, "overload": summary,
                  "slow_clients": slow, "rss_mb": {r: {"start": v[0], "peak": max(v), "end": v[-1]} for r, v in rss.items()}}
        if transport == "redis" and args.restart_seconds > 0:
            result["restart"] = run_restart(stack, payloads, rate, args)
        return result
    finally:
        stack.stop()


def run_restart(stack: Stack, payloads: list[bytes], rate: float, args: argparse.Namespace) -> dict:
    seconds = args.restart_seconds
    kill_at = round(seconds / 3)
    restart_at = kill_at + 1.0
    shots, _, rss, conns = asyncio.run(open_loop(stack.port, payloads, rate, seconds, args.deadline + 5, stack.pids(),
                                                 events={kill_at: stack.kill_redis, restart_at: stack.start_redis}))
    counts = per_second(shots, seconds)
    before = counts[1:kill_at]  # skip the first second (ramp)
    baseline = sum(before) / max(1, len(before))
    recovered_after = None
    for k in range(int(restart_at), len(counts)):
        if counts[k] >= 0.9 * baseline:
            recovered_after = k + 1 - restart_at  # end of the first full second back at >= 90%
            break
    summary = summarize(shots, args.deadline)
    summary.update(conns)
    print(f"\n[redis restart] offered {rate:.1f} req/s for {seconds:.0f} s; Redis SIGKILLed at {kill_at:.1f} s, "
          f"started again at {restart_at:.1f} s")
    print(f"  200s per second: {counts}")
    print(f"  before the kill {baseline:.1f}/s; back to >= 90% "
          + (f"{recovered_after:.1f} s after the restart (target <= 5 s: {'OK' if recovered_after <= 5 else 'MISSED'})"
             if recovered_after is not None else "NEVER"))
    print(f"  statuses {summary['statuses']}  codes {summary['codes']}; slowest answer {summary['slowest_s']:.2f} s "
          f"(deadline + 1 s: {'OK' if summary['within_deadline_plus_1s'] else 'EXCEEDED'}); slowest "
          f"(sent s, latency s, status, code): {summary['slowest'][:3]}")
    print_lags(summary)
    for role, values in rss.items():
        print(f"  RSS {role}: start {values[0]:.0f} MB, peak {max(values):.0f} MB, end {values[-1]:.0f} MB")
    return {"kill_at": kill_at, "restart_at": restart_at, "per_second": counts, "baseline_per_s": baseline,
            "recovered_after_s": recovered_after, "summary": summary}


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop servers
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transports", default="inprocess,redis")
    parser.add_argument("--backbone", default="tiny-clip-random")
    parser.add_argument("--image-size", type=int, default=0, help="model input side (default: the backbone's)")
    parser.add_argument("--request-size", type=int, default=224, help="side of the JPEGs sent")
    parser.add_argument("--heatmap", default="png", choices=["png", "overlay", "none"])
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--queue-depth", type=int, default=64)
    parser.add_argument("--deadline", type=float, default=5.0, help="job_timeout_s of the service")
    parser.add_argument("--body-timeout", type=float, default=10.0, help="body_timeout_s of the service")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--factor", type=float, default=2.0, help="offered load / capacity")
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--slow-clients", type=int, default=8, help="slowloris clients during the overload run")
    parser.add_argument("--restart-seconds", type=float, default=30.0, help="0 = no Redis restart run")
    parser.add_argument("--report", default="bench_overload_report.json")
    args = parser.parse_args()

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (shared machines make these "
          f"figures noisy)")
    images = make_images(16, args.request_size)
    results = [run_transport(t, args, images) for t in args.transports.split(",")]
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    report = {"args": vars(args), "results": results, "load_average_end": os.getloadavg()[0]}
    Path(args.report).write_text(json.dumps(report, indent=1, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))
    print(f"report: {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
