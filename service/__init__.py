"""HTTP inspection service: FastAPI app, job queue (in-process or Redis Streams), batching worker.

Entry points: :func:`service.app.create_app` (ASGI app factory), ``genclip serve`` /
``genclip worker`` (:mod:`service.cli_serve`), ``python -m service.worker``.
Configuration: :class:`service.settings.Settings` (environment variables ``GENCLIP_*``).
"""

__all__ = ["create_app", "Settings"]


def __getattr__(name: str):  # lazy: importing ``service`` must not pull FastAPI / torch
    if name == "create_app":
        from service.app import create_app

        return create_app
    if name == "Settings":
        from service.settings import Settings

        return Settings
    raise AttributeError(name)
