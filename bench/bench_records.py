"""Recording benchmark: ``/inspect`` throughput with inspection records on against off.

Two real ``genclip serve`` processes (in-process queue, baseline detector on ViT-B-16 at
224 px with random weights, CPU) that differ only in ``GENCLIP_RECORDS_ENABLED``; the one that
records keeps thumbnails and heatmaps (``GENCLIP_RECORDS_KEEP_IMAGES=all``, the default) in a
SQLite database (or ``--database-url``). Both are driven to saturation by the same closed-loop
client (``bench_service.closed_loop``), in interleaved A/B windows so that other load on the
machine falls on both sides alike. Prints each side's requests/s, the ratio (target >= 0.95),
and checks that every answer of the recording side was written (none dropped).

On a shared, loaded machine wall-clock windows are noisy; so the script also measures CPU
time (``time.process_time``, all threads) in this process: the detector per image against
the recorder's whole work per record (row, thumbnail JPEG, heatmap PNG, batched insert), and
prints the ratio those costs imply, ``model / (model + record)``, which other load barely moves.

Run: ``python bench/bench_records.py`` (``--help`` for options). Only talks to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_service as bs  # noqa: E402  (same folder: servers and load generators)


def metric(base: str, name: str, *labels: str) -> float:
    """Sum of the samples of ``name`` whose label text contains every one of ``labels``."""
    total = 0.0
    for line in httpx.get(base + "/metrics", timeout=10).text.splitlines():
        if line.startswith("#") or line.split("{")[0].split(" ")[0] != name:
            continue
        if all(label in line for label in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


def start(model: str, records: bool, args: argparse.Namespace, folder: str) -> bs.Stack:
    saved = dict(os.environ)
    os.environ.update({
        "GENCLIP_RECORDS_ENABLED": "true" if records else "false",
        "GENCLIP_DATABASE_URL": args.database_url or f"sqlite:///{folder}/{'on' if records else 'off'}.db",
        "GENCLIP_RECORDS_DIR": f"{folder}/records-{'on' if records else 'off'}",
        "GENCLIP_RECORDS_KEEP_IMAGES": args.keep_images,
    })
    try:
        return bs.start_stack(model, "inprocess", args, depth=args.queue_depth, timeout=args.job_timeout)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def cpu_costs(model: str, image_size: int, max_batch: int, folder: str, database_url: str | None) -> tuple[float, float]:
    """(detector CPU ms per image at ``max_batch``, recorder CPU ms per record), this process."""
    import io

    from PIL import Image

    from service.db.database import open_database
    from service.queue.base import Job, JobResult
    from service.records.media import MediaStore
    from service.records.recorder import build_row, insert_rows
    from service.settings import Settings
    from service.worker import load_detector, map_to_uint8

    spec = bs.MODELS[model]
    settings = Settings(_env_file=None, detector="baseline", backbone=spec["backbone"], backbone_weights="random",
                        image_size=spec["image_size"], device="cpu")
    detector = load_detector(settings)
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in bs.make_images(max_batch, image_size, seed=1)]
    detector.inspect(images, [None] * len(images))  # warm-up
    reps = 3
    t0 = time.process_time()
    for _ in range(reps):
        out = detector.inspect(images, [None] * len(images))
    model_ms = (time.process_time() - t0) * 1000 / (reps * len(images))

    database = open_database(database_url or f"sqlite:///{folder}/cpu.db", migrate=True)
    media = MediaStore(Path(folder) / "cpu-records", keep="all", originals=False, thumbnail_px=320,
                       max_bytes=0, retention_days=0)
    maps = [map_to_uint8(o.anomaly_map, img.size) for o, img in zip(out, images, strict=True)]
    n, batch = 512, 256
    t0 = time.process_time()
    rows = []
    for k in range(n):
        i = k % len(images)
        job = Job(id=f"{k:032x}", class_name=None, deadline=time.time() + 60)
        result = JobResult(job_id=job.id, ok=True, score=out[i].score, class_label=out[i].class_label,
                           anomaly_map=maps[i], identity=detector.identity.as_dict(), worker="bench", batch_size=8)
        answer = {"id": job.id, "score": out[i].score, "is_anomalous": out[i].score >= 0.5, "threshold": 0.5,
                  "class_label": out[i].class_label, "class_name": None,
                  "timing_ms": {"queue": 1.0, "model": 2.0, "total": 3.0}}
        row = build_row(job, result, answer, image=images[i], part_id=f"SN-{k}", station="bench")
        row["media"] = media.save(row["id"], row["created_at"], images[i], maps[i], None)
        rows.append(row)
        if len(rows) == batch:
            database.transaction(lambda s, r=rows: insert_rows(s, r))
            rows = []
    record_ms = (time.process_time() - t0) * 1000 / n
    database.close()
    return model_ms, record_ms


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks: stop servers
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit-b-16", choices=sorted(bs.MODELS))
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--queue-depth", type=int, default=64)
    parser.add_argument("--job-timeout", type=float, default=120.0)
    parser.add_argument("--concurrency", type=int, default=0, help="closed-loop clients (default 2 x max batch)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--heatmap", default="none", choices=["png", "overlay", "none"],
                        help="heatmap the clients ask for (the recorder keeps its own either way)")
    parser.add_argument("--keep-images", default="all", choices=["none", "anomalous", "all"])
    parser.add_argument("--database-url", default=None, help="default: a SQLite file per server in a temp dir")
    parser.add_argument("--rounds", type=int, default=4, help="A/B rounds (off window, on window)")
    parser.add_argument("--cpu-only", action="store_true", help="only the CPU-time comparison (no servers)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="length of one window (at least 6 batches' time)")
    args = parser.parse_args()
    conc = args.concurrency or 2 * args.max_batch

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (other work on this box counts: "
          "the two sides are measured in alternating windows)")
    images = bs.make_images(64, args.image_size)
    with tempfile.TemporaryDirectory(prefix="bench-records-") as folder:
        model_ms, record_ms = cpu_costs(args.model, args.image_size, args.max_batch, folder, args.database_url)
        print(f"CPU time in one process: detector {model_ms:.1f} ms per image (batch {args.max_batch}), recorder "
              f"{record_ms:.2f} ms per record (row + thumbnail + heatmap + batched insert) -> implied throughput "
              f"ratio {model_ms / (model_ms + record_ms):.3f} (target >= 0.95)")
        if args.cpu_only:
            return 0
        stacks = {}
        try:
            stacks["off"] = start(args.model, False, args, folder)
            stacks["on"] = start(args.model, True, args, folder)
            # warm both, and size the gap that separates answer batches from the first rate seen
            rates = {}
            for side, stack in stacks.items():  # warm-up, then a rough rate from 4 batches' worth of requests
                asyncio.run(bs.closed_loop(stack.base, images, conc, 2 * args.max_batch, 0.0, args.heatmap))
                t0 = time.perf_counter()
                asyncio.run(bs.closed_loop(stack.base, images, conc, 4 * args.max_batch, 0.0, args.heatmap))
                rates[side] = 4 * args.max_batch / (time.perf_counter() - t0)
            slowest = max(min(rates.values()), 1e-3)
            gap = max(0.002, 0.3 * args.max_batch / slowest)  # well under one batch period
            window = max(args.seconds, 6 * args.max_batch / slowest)  # at least ~6 batches a window
            print(f"  first estimate: off {rates['off']:.2f} req/s, on {rates['on']:.2f} req/s; windows of {window:.0f} s")
            written_before = metric(stacks["on"].base, "genclip_records_written_total")
            totals = {side: [0.0, 0.0, 0] for side in stacks}  # answers, seconds, non-200
            per_round = []
            for r in range(args.rounds):
                order = ("off", "on") if r % 2 == 0 else ("on", "off")
                row = {}
                for side in order:
                    n, t, outs = asyncio.run(bs.closed_loop(stacks[side].base, images, conc, 0, window,
                                                            args.heatmap, gap))
                    totals[side][0] += n
                    totals[side][1] += t
                    totals[side][2] += sum(1 for o in outs if o.status != 200)
                    row[side] = n / max(t, 1e-9)
                per_round.append(row)
                print(f"  round {r + 1}: off {row['off']:.2f} req/s, on {row['on']:.2f} req/s, "
                      f"ratio {row['on'] / max(row['off'], 1e-9):.3f} (load average {os.getloadavg()[0]:.2f})")
            # every answer of the recording side must reach the database
            answered = metric(stacks["on"].base, "genclip_http_requests_total", 'endpoint="/inspect"', 'status="200"')
            deadline = time.monotonic() + 30
            while metric(stacks["on"].base, "genclip_records_buffered") > 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            written = metric(stacks["on"].base, "genclip_records_written_total")
            dropped = metric(stacks["on"].base, "genclip_records_dropped_total")
            media = metric(stacks["on"].base, "genclip_records_media_bytes")
        finally:
            for stack in stacks.values():
                stack.stop()
    off, on = (totals[s][0] / max(totals[s][1], 1e-9) for s in ("off", "on"))
    print(f"\n[{args.model} at {args.image_size} px, batch {args.max_batch}, {conc} clients, heatmap={args.heatmap}, "
          f"records keep_images={args.keep_images}, database {args.database_url or 'sqlite (temp file)'}]")
    print(f"  records off: {off:.2f} req/s over {totals['off'][1]:.0f} s (non-200: {totals['off'][2]})")
    print(f"  records on:  {on:.2f} req/s over {totals['on'][1]:.0f} s (non-200: {totals['on'][2]})")
    print(f"  ratio on / off: {on / off:.3f} (target >= 0.95)")
    print(f"  recording side: {written - written_before:.0f} records written during the windows, {written:.0f} in all "
          f"for {answered:.0f} answers (200) of /inspect, {dropped:.0f} dropped, {media / 1e6:.1f} MB of kept images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
