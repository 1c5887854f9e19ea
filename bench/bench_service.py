"""Service benchmark: HTTP + queue overhead against the bare detector, on this machine.

For each backbone (tiny random test config; ViT-B-16 at 224 px with random weights) and each
transport (in-process queue; Redis Streams with a separate ``genclip worker`` process):

1. bare detector throughput (images/s) at batch size ``--max-batch``, in this process;
2. a real ``genclip serve`` under uvicorn on loopback, driven by an httpx async client:
   saturated throughput (closed loop, ``2 x max_batch`` concurrent requests) -> ratio to bare;
3. latency p50 / p99 at half the saturated throughput (open loop, constant rate);
4. overload at 2x the saturated throughput (open loop): status counts (only 200/503/504
   allowed), the slowest answer, and the server processes' RSS (start / peak / end).

Plus the heatmap PNG encode time at 518 px. Every loop is bounded in count and time and only
talks to 127.0.0.1. Run: ``python bench/bench_service.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {
    "tiny": {"backbone": "tiny-clip-random", "image_size": None},
    "vit-b-16": {"backbone": "ViT-B-16", "image_size": 224},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_command(port: int, folder: str) -> list[str]:
    """A private redis-server on 127.0.0.1:``port`` that keeps nothing on disk."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not installed")
    return [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", folder]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def make_images(n: int, size: int, seed: int = 0) -> list[bytes]:
    """Distinct smooth JPEGs (camera-like), ``size`` x ``size``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


# ====================================================================== bare detector
def bare_child(model: str, max_batch: int, image_size: int) -> int:
    """``--bare-child``: the detector alone in its own process, driven over stdin/stdout.

    It is loaded and run exactly as a service worker runs it (``load_detector`` with the same
    settings, one dedicated thread), so that bare and served figures differ only by HTTP + queue.
    Commands: ``RUN <seconds>`` -> ``<images> <seconds>``; ``EXIT``.
    """
    from service.settings import Settings
    from service.worker import load_detector

    spec = MODELS[model]
    settings = Settings(_env_file=None, detector="baseline", backbone=spec["backbone"],
                        backbone_weights="random", image_size=spec["image_size"], device="cpu")
    detector = load_detector(settings)
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in make_images(64, image_size)[:max_batch]]
    thread = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def warm() -> None:
        warm_until, warm = time.perf_counter() + 3.0, 0
        while warm < 3 or (warm < 20 and time.perf_counter() < warm_until):  # allocator / kernel warm-up
            detector.inspect(pil, [None] * len(pil))
            warm += 1

    def window(seconds: float) -> tuple[int, float]:
        n, t0 = 0, time.perf_counter()
        while n < 2 or time.perf_counter() - t0 < seconds:
            detector.inspect(pil, [None] * len(pil))
            n += 1
        return n * len(pil), time.perf_counter() - t0

    thread.submit(warm).result()
    print("READY", flush=True)
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "RUN":
            n, t = thread.submit(window, float(rest[0])).result()
            print(n, t, flush=True)
        else:
            break
    return 0


class Bare:
    """Parent side of :func:`bare_child`."""

    def __init__(self, model: str, max_batch: int, image_size: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--bare-child", model, str(max_batch), str(image_size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        if self.proc.stdout.readline().strip() != "READY":
            raise SystemExit(f"bare detector for {model} failed to start")

    def window(self, seconds: float) -> tuple[int, float]:
        """(images, seconds) for whole batches run during about ``seconds`` (at least 2)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"RUN {seconds}\n")
        self.proc.stdin.flush()
        n, t = self.proc.stdout.readline().split()
        return int(n), float(t)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write("EXIT\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def png_encode_ms() -> tuple[float, float]:
    from service.heatmap import heatmap_png, overlay_png

    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 256, (37, 37), dtype=np.uint8))
    amap = np.asarray(coarse.resize((518, 518), Image.BILINEAR))  # smooth, like a real anomaly map
    photo = Image.fromarray(rng.integers(0, 256, (518, 518, 3), dtype=np.uint8))
    timings, overlay = [], []
    for _ in range(30):
        t0 = time.perf_counter()
        heatmap_png(amap)
        timings.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        overlay_png(amap, photo)
        overlay.append((time.perf_counter() - t0) * 1000)
    return statistics.median(timings), statistics.median(overlay)


# ====================================================================== servers
@dataclass
class Stack:
    base: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    worker_metrics: str | None = None
    tmp: tempfile.TemporaryDirectory | None = None

    def pids(self) -> dict[int, str]:
        return {p.pid: ("worker" if "worker" in p.args else "api") for p in self.procs
                if p.poll() is None and p.args[0] == sys.executable}

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if self.tmp is not None:
            self.tmp.cleanup()


def start_stack(model: str, transport: str, args: argparse.Namespace, depth: int, timeout: float) -> Stack:
    spec = MODELS[model]
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": str(ROOT),
        "GENCLIP_DETECTOR": "baseline",
        "GENCLIP_BACKBONE": spec["backbone"],
        "GENCLIP_BACKBONE_WEIGHTS": "random",
        "GENCLIP_DEVICE": "cpu",
        "GENCLIP_MAX_BATCH": str(args.max_batch),
        "GENCLIP_MAX_WAIT_MS": str(args.max_wait_ms),
        "GENCLIP_QUEUE_MAX_DEPTH": str(depth),
        "GENCLIP_JOB_TIMEOUT_S": str(timeout),
        "GENCLIP_LOG_LEVEL": "warning",
    })
    if spec["image_size"]:
        env["GENCLIP_IMAGE_SIZE"] = str(spec["image_size"])
    for key in ("GENCLIP_REDIS_URL", "GENCLIP_API_KEYS", "GENCLIP_WORKERS_INLINE"):
        env.pop(key, None)
    stack = Stack(base="")
    log = subprocess.DEVNULL
    # a fresh database and records folder each run (not the repository's defaults)
    stack.tmp = tempfile.TemporaryDirectory(prefix="bench-service-")
    env["GENCLIP_DATABASE_URL"] = f"sqlite:///{stack.tmp.name}/genclip.db"
    env["GENCLIP_RECORDS_DIR"] = f"{stack.tmp.name}/records"
    if transport == "redis":
        rport = free_port()
        stack.procs.append(subprocess.Popen(redis_server_command(rport, stack.tmp.name), stdout=log, stderr=log))
        env["GENCLIP_REDIS_URL"] = f"redis://127.0.0.1:{rport}/0"
        mport = free_port()
        wenv = dict(env, GENCLIP_WORKER_METRICS_PORT=str(mport), GENCLIP_WORKER_ID="bench-worker")
        time.sleep(0.3)
        stack.procs.append(subprocess.Popen([sys.executable, "-m", "service.cli_serve", "worker"],
                                            cwd=ROOT, env=wenv, stdout=log, stderr=None))
        stack.worker_metrics = f"http://127.0.0.1:{mport}/metrics"
    port = free_port()
    stack.procs.append(subprocess.Popen(
        [sys.executable, "-m", "service.cli_serve", "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=None))
    stack.base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(stack.base + "/ready", timeout=1).status_code == 200:
                return stack
        except httpx.HTTPError:
            pass
        if any(p.poll() is not None for p in stack.procs):
            break
        time.sleep(0.25)
    stack.stop()
    raise SystemExit(f"{model}/{transport}: service did not become ready")


# ====================================================================== load generators
@dataclass
class Outcome:
    status: int
    latency: float
    server_ms: float = float("nan")  # the service's own timing_ms.total (200 only)
    error: str = ""  # client-side exception (status -1)


async def one(client: httpx.AsyncClient, body: bytes, heatmap: str) -> Outcome:
    t0 = time.perf_counter()
    try:
        r = await client.post(f"/inspect?heatmap={heatmap}", files={"image": ("part.jpg", body, "image/jpeg")})
        server_ms = float("nan")
        if r.status_code == 200:
            server_ms = r.json()["timing_ms"]["total"]
        status = r.status_code
    except httpx.HTTPError as exc:
        return Outcome(-1, time.perf_counter() - t0, float("nan"), type(exc).__name__)
    return Outcome(status, time.perf_counter() - t0, server_ms)


async def closed_loop(base: str, images: list[bytes], concurrency: int, warmup: int, seconds: float,
                      heatmap: str, gap: float = 0.002) -> tuple[float, float, list[Outcome]]:
    """``concurrency`` clients back to back for ``seconds``.

    Answers come in batches (clusters of close completion times): the throughput is taken
    between batch completions, see :func:`batch_rate`. Returns (answers, seconds, outcomes).
    """
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        await asyncio.gather(*(one(client, images[i % len(images)], heatmap) for i in range(warmup)))
        outcomes: list[Outcome] = []
        done_at: list[float] = []
        if seconds <= 0:
            return 0.0, 0.0, outcomes
        t_end = time.perf_counter() + seconds

        async def runner(k: int) -> None:
            i = k
            while time.perf_counter() < t_end:
                outcome = await one(client, images[i % len(images)], heatmap)
                now = time.perf_counter()
                if now <= t_end:
                    outcomes.append(outcome)
                    if outcome.status == 200:
                        done_at.append(now)
                i += concurrency

        await asyncio.wait_for(asyncio.gather(*(runner(k) for k in range(concurrency))), timeout=seconds + 600)
    return batch_rate(done_at, gap) + (outcomes,)


def batch_rate(done_at: list[float], gap: float) -> tuple[float, float]:
    """(answers, seconds) from answer times that arrive in batch clusters.

    A cluster (one batch) starts where the gap to the previous answer exceeds ``gap``. The
    answers of clusters 2..k divided by the time from the start of cluster 1 to the start of
    cluster k is the throughput, free of partial batches at the window's edges.
    """
    if len(done_at) < 2:
        return 0.0, 0.0
    times = sorted(done_at)
    starts, sizes = [times[0]], [1]
    for prev, t in zip(times, times[1:], strict=False):
        if t - prev > gap:
            starts.append(t)
            sizes.append(1)
        else:
            sizes[-1] += 1
    if len(starts) < 2:
        return float(len(times) - 1), times[-1] - times[0]
    return float(sum(sizes[1:])), starts[-1] - starts[0]


async def open_loop(base: str, images: list[bytes], rate: float, count: int, heatmap: str,
                    sample_pids: dict[int, str] | None = None) -> tuple[list[Outcome], dict[int, list[float]], float]:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=200)
    rss: dict[int, list[float]] = {pid: [rss_mb(pid)] for pid in sample_pids or []}
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        stop = asyncio.Event()

        async def sampler() -> None:
            while not stop.is_set():
                for pid in rss:
                    rss[pid].append(rss_mb(pid))
                await asyncio.sleep(0.25)

        sampling = asyncio.create_task(sampler())
        tasks = []
        t0 = time.perf_counter()
        for i in range(count):
            target = t0 + i / rate
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(client, images[i % len(images)], heatmap)))
        sent = time.perf_counter() - t0
        outcomes = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - t0
        stop.set()
        await sampling
        for pid in rss:
            rss[pid].append(rss_mb(pid))
    return list(outcomes), rss, (elapsed, count / max(sent, 1e-9))


def scrape_batches(url: str) -> tuple[float, float]:
    text = httpx.get(url, timeout=5).text
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("genclip_batch_size_sum"):
            total = float(line.split()[-1])
        elif line.startswith("genclip_batch_size_count"):
            count = float(line.split()[-1])
    return total, count


# ====================================================================== main
def run_case(model: str, transport: str, bare: Bare, images: list[bytes], args: argparse.Namespace) -> dict:
    # a first bare estimate sizes the windows and the admission settings
    n, t = bare.window(2.0)
    bare_rate = n / t
    # admission sized like a deployment: about 2 s of work queued, deadlines well above it
    depth = args.queue_depth or max(2 * args.max_batch, int(2 * bare_rate))
    timeout = args.job_timeout or max(10.0, 4 * depth / bare_rate)
    stack = start_stack(model, transport, args, depth, timeout)
    try:
        metrics_url = stack.worker_metrics or stack.base + "/metrics"
        conc = args.concurrency or 2 * args.max_batch
        # A/B rounds (bare window, service window, ...): other load on this box drifts, so both
        # sides are sampled across the same stretch of time
        window = min(max(args.sat_seconds / args.rounds, 5 * args.max_batch / bare_rate), 60.0)
        asyncio.run(closed_loop(stack.base, images, conc, 2 * args.max_batch, 0.0, args.heatmap))  # warm
        s0, c0 = scrape_batches(metrics_url)
        bare_imgs = bare_time = served = served_time = 0.0
        outs: list[Outcome] = []
        for _ in range(args.rounds):
            n, t = bare.window(window)
            bare_imgs, bare_time = bare_imgs + n, bare_time + t
            gap = max(0.002, 0.3 * args.max_batch / bare_rate)  # well under one batch period
            count_k, span_k, outs_k = asyncio.run(
                closed_loop(stack.base, images, conc, 0, window, args.heatmap, gap))
            served, served_time = served + count_k, served_time + span_k
            outs += outs_k
        s1, c1 = scrape_batches(metrics_url)
        bare_rate, rate = bare_imgs / bare_time, served / max(served_time, 1e-9)
        bad = sum(1 for o in outs if o.status != 200)
        mean_batch = (s1 - s0) / (c1 - c0) if c1 > c0 else float("nan")
        half = max(0.25, rate / 2)
        n_half = int(max(20, min(args.half_requests, half * args.half_seconds)))
        half_outs, _, (_, half_sent) = asyncio.run(open_loop(stack.base, images, half, n_half, args.heatmap))
        lat = [o.latency * 1000 for o in half_outs if o.status == 200]
        over = 2 * rate
        n_over = int(max(40, min(args.over_requests, over * args.over_seconds)))
        over_outs, rss, (over_elapsed, over_sent) = asyncio.run(
            open_loop(stack.base, images, over, n_over, args.heatmap, sample_pids=stack.pids()))
        statuses: dict[int, int] = {}
        for o in over_outs:
            statuses[o.status] = statuses.get(o.status, 0) + 1
        roles = stack.pids()
        server_ms = [o.server_ms for o in over_outs if o.status == 200]
        by_status = {
            st: (percentile([o.latency for o in over_outs if o.status == st], 50),
                 max(o.latency for o in over_outs if o.status == st))
            for st in statuses
        }
        return {
            "model": model, "transport": transport, "bare": bare_rate, "rate": rate, "ratio": rate / bare_rate,
            "window": window * args.rounds, "clients": conc, "queue_depth": depth, "job_timeout": timeout,
            "non200_at_saturation": bad, "mean_batch": mean_batch, "half_rate": half,
            "p50": percentile(lat, 50), "p99": percentile(lat, 99), "half_ok": len(lat), "half_n": n_half,
            "over_rate": over, "over_n": n_over, "over_elapsed": over_elapsed, "statuses": statuses,
            "over_sent": over_sent, "half_sent": half_sent,
            "by_status": by_status,
            "client_errors": sorted({o.error for o in over_outs + outs + half_outs if o.error}),
            "over_server_p50": percentile(server_ms, 50),
            "over_server_max": max(server_ms) if server_ms else float("nan"),
            "rss": {f"{roles.get(pid, '?')} pid {pid}": (v[0], max(v), v[-1]) for pid, v in rss.items()},
        }
    finally:
        stack.stop()


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--bare-child":
        return bare_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop servers
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,vit-b-16")
    parser.add_argument("--transports", default="inprocess,redis")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--queue-depth", type=int, default=0, help="default: ~2 s of bare throughput")
    parser.add_argument("--job-timeout", type=float, default=0.0, help="default: 4 x full-queue time")
    parser.add_argument("--concurrency", type=int, default=0, help="closed-loop clients (default 2 x max batch)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--heatmap", default="png", choices=["png", "overlay", "none"])
    parser.add_argument("--rounds", type=int, default=3, help="A/B rounds of bare vs service windows")
    parser.add_argument("--sat-seconds", type=float, default=18.0,
                        help="service time at saturation, over all rounds (at least 2 batches a round)")
    parser.add_argument("--half-seconds", type=float, default=10.0)
    parser.add_argument("--half-requests", type=int, default=600)
    parser.add_argument("--over-seconds", type=float, default=8.0)
    parser.add_argument("--over-requests", type=int, default=1200)
    args = parser.parse_args()

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} "
          f"(other work on this box counts: bare and served runs are interleaved A/B)")
    png_ms, overlay_ms = png_encode_ms()
    print(f"heatmap PNG encode at 518x518: {png_ms:.2f} ms (overlay {overlay_ms:.2f} ms); target <= 40 ms")
    images = make_images(64, args.image_size)
    print(f"requests: {len(images)} distinct {args.image_size}x{args.image_size} JPEGs "
          f"(~{statistics.mean(map(len, images)) / 1024:.1f} KB), heatmap={args.heatmap}, "
          f"max_batch={args.max_batch}, max_wait_ms={args.max_wait_ms}")
    results = []
    for model in args.models.split(","):
        bare = Bare(model, args.max_batch, args.image_size)
        for transport in args.transports.split(","):
            r = run_case(model, transport, bare, images, args)
            results.append(r)
            target = 0.85 if transport == "inprocess" else 0.80
            print(f"\n[{model} / {transport}] load average now {os.getloadavg()[0]:.2f}")
            print(f"  bare detector at batch {args.max_batch}: {r['bare']:.2f} images/s")
            print(f"  saturated ({r['clients']} clients, {r['window']:.0f} s interleaved with the bare runs, "
                  f"queue depth {r['queue_depth']}, deadline {r['job_timeout']:.0f} s): {r['rate']:.2f} req/s "
                  f"= {r['ratio']:.2f} x bare (target >= {target}), mean batch {r['mean_batch']:.2f}, "
                  f"non-200 {r['non200_at_saturation']}")
            print(f"  half load {r['half_rate']:.2f} req/s (client managed {r['half_sent']:.2f}): "
                  f"p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms ({r['half_ok']}/{r['half_n']} ok)")
            lat = ", ".join(f"{st}: p50 {p50 * 1000:.0f} ms / max {mx * 1000:.0f} ms"
                            for st, (p50, mx) in sorted(r["by_status"].items()))
            print(f"  2x load {r['over_rate']:.2f} req/s (client managed {r['over_sent']:.2f}) x {r['over_n']} "
                  f"({r['over_elapsed']:.1f} s): "
                  f"statuses {dict(sorted(r['statuses'].items()))}; {lat} (client side); 200 server side "
                  f"p50 {r['over_server_p50']:.0f} ms / max {r['over_server_max']:.0f} ms")
            for pid, (start, peak, end) in r["rss"].items():
                print(f"    RSS {pid}: start {start:.0f} MB, peak {peak:.0f} MB, end {end:.0f} MB")
            bad = set(r["statuses"]) - {200, 503, 504}
            if bad:
                print(f"  !! unexpected statuses under overload: {sorted(bad)} "
                      f"(-1 = no HTTP answer: {', '.join(r['client_errors'])})")
        bare.close()
    print("\nsummary (req/s through HTTP + queue / bare detector images/s):")
    for r in results:
        print(f"  {r['model']:9s} {r['transport']:9s} ratio {r['ratio']:.2f}  "
              f"p50 {r['p50']:.1f} ms  p99 {r['p99']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
