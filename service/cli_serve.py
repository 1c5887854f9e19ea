"""``genclip serve`` and ``genclip worker`` subcommands.

``service.cli`` (the lead's CLI) calls :func:`register` on its argparse subparsers; each
subcommand sets ``func`` so the caller runs ``args.func(args)``. Flags override the
``GENCLIP_*`` environment (see :mod:`service.settings`); unset flags leave it alone.

Standalone: ``python -m service.cli_serve serve --port 8000`` / ``... worker``.

* ``serve``: the HTTP API (uvicorn with the guarded protocol of :mod:`service.http_server`, one
  process). Without a Redis URL the detector runs
  inline (in-process queue); with one, jobs go to Redis Streams and ``--workers-inline`` also
  runs a detector worker in this process.
* ``worker``: one detector on one device (``cuda`` when present, else CPU) consuming the
  Redis stream; SIGTERM finishes the current batch, then exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from service.cli_settings import MODEL_SETTINGS, QUEUE_SETTINGS, add_settings_flags, settings_from_args
from service.settings import Settings

log = logging.getLogger("service")

SERVE_SETTINGS = ("host", "port", "workers_inline", "queue_max_depth", "job_timeout_s", "thresholds_file",
                  "max_inflight_requests", "http_max_requests", "http_max_loop_lag_ms", "http_backlog",
                  "http_listen_sockets",
                  "header_timeout_s", "body_timeout_s", "body_idle_timeout_s", "max_decoded_bytes",
                  "decoded_bytes_budget")
WORKER_SETTINGS = ("worker_id", "worker_metrics_port")

def register(subparsers: Any) -> None:
    """Add ``serve`` and ``worker`` to an argparse subparsers object."""
    serve = subparsers.add_parser(
        "serve", help="run the HTTP inspection API",
        description="Run the HTTP API (POST /inspect). Settings from GENCLIP_* env vars; flags override.",
    )
    add_settings_flags(serve, (*MODEL_SETTINGS, *QUEUE_SETTINGS, *SERVE_SETTINGS))
    serve.set_defaults(func=main_serve)

    worker = subparsers.add_parser(
        "worker", help="run one detector worker on the Redis queue",
        description="Consume jobs from Redis Streams with one detector on one device.",
    )
    add_settings_flags(worker, (*MODEL_SETTINGS, *QUEUE_SETTINGS, *WORKER_SETTINGS))
    worker.set_defaults(func=main_worker)


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _load_detector_or_exit(settings: Settings, command: str) -> Any:
    """Build the detector now so that a missing file stops start-up with a clear message."""
    from model.errors import DETECTOR_LOAD_ERRORS
    from service.worker import load_detector

    try:
        detector = load_detector(settings)
    except DETECTOR_LOAD_ERRORS as exc:
        print(f"genclip {command}: cannot load the detector: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    log.info("detector ready: %s on %s", detector.identity, getattr(detector, "device", "?"))
    return detector


def main_serve(args: argparse.Namespace) -> int:
    from service.app import create_app
    from service.gc_tuning import freeze_startup_heap
    from service.http_server import build_server

    settings = settings_from_args(args)
    _configure_logging(settings.log_level)
    detector = _load_detector_or_exit(settings, "serve") if settings.run_inline_worker else None
    app = create_app(settings, detector=detector)
    frozen = freeze_startup_heap()  # no full GC pass over the model's heap while serving
    log.info("start-up heap frozen: %d objects out of the collector's way", frozen)
    log.info(
        "serving on http://%s:%d (transport=%s, inline worker=%s)",
        settings.host, settings.port, settings.transport, settings.run_inline_worker,
    )
    build_server(app, settings).run()
    return 0


def main_worker(args: argparse.Namespace) -> int:
    from service.gc_tuning import freeze_startup_heap
    from service.worker import serve_worker

    settings = settings_from_args(args)
    _configure_logging(settings.log_level)
    if not settings.redis_url:
        print("genclip worker: set GENCLIP_REDIS_URL or --redis-url", file=sys.stderr)
        return 2
    detector = _load_detector_or_exit(settings, "worker")
    freeze_startup_heap()
    return asyncio.run(serve_worker(settings, detector))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genclip")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
