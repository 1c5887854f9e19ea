"""``genclip serve`` and ``genclip worker`` subcommands.

``service.cli`` (the lead's CLI) calls :func:`register` on its argparse subparsers; each
subcommand sets ``func`` so the caller runs ``args.func(args)``. Flags override the
``GENCLIP_*`` environment (see :mod:`service.settings`); unset flags leave it alone.

Standalone: ``python -m service.cli_serve serve --port 8000`` / ``... worker``.

* ``serve``: the HTTP API (uvicorn, one process). Without a Redis URL the detector runs
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

from service.settings import Settings

log = logging.getLogger("service")

# flag dest -> Settings field
_MODEL_FLAGS = {
    "detector": ("--detector", {"choices": ["auto", "genclip", "vip2clip", "baseline", "ensemble"]}),
    "backbone": ("--backbone", {"help": "open_clip model name (default ViT-L-14-336)"}),
    "backbone_weights": ("--backbone-weights", {"help": "pretrained tag, file path or 'random'"}),
    "clip_cache_dir": ("--clip-cache-dir", {}),
    "checkpoint": ("--checkpoint", {"help": "GenCLIP prompt checkpoint (.safetensors)"}),
    "vip2clip_checkpoint": ("--vip2clip-checkpoint", {}),
    "image_size": ("--image-size", {"type": int}),
    "device": ("--device", {"help": "auto | cpu | cuda | cuda:N"}),
}
_QUEUE_FLAGS = {
    "redis_url": ("--redis-url", {"help": "Redis URL; unset = in-process queue (serve only)"}),
    "max_batch": ("--max-batch", {"type": int}),
    "max_wait_ms": ("--max-wait-ms", {"type": float}),
    "log_level": ("--log-level", {"choices": ["critical", "error", "warning", "info", "debug"]}),
}


def _add(parser: argparse.ArgumentParser, flags: dict[str, tuple[str, dict]]) -> None:
    for dest, (flag, kwargs) in flags.items():
        parser.add_argument(flag, dest=dest, default=None, **kwargs)


def register(subparsers: Any) -> None:
    """Add ``serve`` and ``worker`` to an argparse subparsers object."""
    serve = subparsers.add_parser(
        "serve", help="run the HTTP inspection API",
        description="Run the HTTP API (POST /inspect). Settings from GENCLIP_* env vars; flags override.",
    )
    _add(serve, _MODEL_FLAGS)
    _add(serve, _QUEUE_FLAGS)
    serve.add_argument("--host", dest="host", default=None)
    serve.add_argument("--port", dest="port", type=int, default=None)
    serve.add_argument(
        "--workers-inline", dest="workers_inline", action="store_true", default=None,
        help="with --redis-url: also run a detector worker in this process",
    )
    serve.set_defaults(func=main_serve)

    worker = subparsers.add_parser(
        "worker", help="run one detector worker on the Redis queue",
        description="Consume jobs from Redis Streams with one detector on one device.",
    )
    _add(worker, _MODEL_FLAGS)
    _add(worker, _QUEUE_FLAGS)
    worker.add_argument("--worker-id", dest="worker_id", default=None)
    worker.add_argument("--metrics-port", dest="worker_metrics_port", type=int, default=None,
                        help="serve Prometheus metrics of this worker on this port")
    worker.set_defaults(func=main_worker)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Environment settings with the flags that were given on top."""
    overrides = {
        name: value
        for name in Settings.model_fields
        if (value := getattr(args, name, None)) is not None
    }
    return Settings(**overrides)


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
    import uvicorn

    from service.app import create_app

    settings = settings_from_args(args)
    _configure_logging(settings.log_level)
    detector = _load_detector_or_exit(settings, "serve") if settings.run_inline_worker else None
    app = create_app(settings, detector=detector)
    log.info(
        "serving on http://%s:%d (transport=%s, inline worker=%s)",
        settings.host, settings.port, settings.transport, settings.run_inline_worker,
    )
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s) or None,
    )
    return 0


def main_worker(args: argparse.Namespace) -> int:
    from service.worker import serve_worker

    settings = settings_from_args(args)
    _configure_logging(settings.log_level)
    if not settings.redis_url:
        print("genclip worker: set GENCLIP_REDIS_URL or --redis-url", file=sys.stderr)
        return 2
    detector = _load_detector_or_exit(settings, "worker")
    return asyncio.run(serve_worker(settings, detector))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="genclip")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
