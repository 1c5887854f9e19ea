"""CLI flags derived from :class:`service.settings.Settings`: the settings are the one source.

A command names the settings it exposes; each becomes ``--field-name`` (underscores to
dashes) with the field's description as help, its type (int, float, path, bool, a choice
list for ``Literal`` fields) and default ``None``, so a flag that is not given leaves the
``GENCLIP_*`` environment (or the field's default) in force.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from service.settings import Settings

# Groups of settings that several commands expose.
RUNTIME_SETTINGS = ("runtime", "precision", "openvino_cache_dir", "calibration_images", "calibration_product", "calibration_size")
MODEL_SETTINGS = (
    "detector", "backbone", "backbone_weights", "clip_cache_dir", "allow_download", "checkpoint",
    "vip2clip_checkpoint", "image_size", "device", "torch_threads", *RUNTIME_SETTINGS,
)
BACKBONE_SETTINGS = ("backbone", "backbone_weights", "clip_cache_dir", "allow_download", "device", "torch_threads")
QUEUE_SETTINGS = ("redis_url", "redis_prefix", "max_batch", "max_wait_ms", "log_level")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _argparse_kwargs(name: str) -> dict[str, Any]:
    field = Settings.model_fields[name]
    annotation = field.annotation
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    kwargs: dict[str, Any] = {"dest": name, "default": None, "help": field.description}
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(annotation) is typing.Literal:
        kwargs["choices"] = list(typing.get_args(annotation))
    elif annotation in (int, float):
        kwargs["type"] = annotation
    elif annotation is Path:
        kwargs["type"] = Path
    if kwargs.get("help"):
        kwargs["help"] = kwargs["help"].replace("%", "%%") + f" [env GENCLIP_{name.upper()}]"
    return kwargs


def add_settings_flags(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """Add one flag per named setting (see the module docstring)."""
    for name in names:
        if name not in Settings.model_fields:
            raise KeyError(f"{name!r} is not a setting of service.settings.Settings")
        parser.add_argument(_flag(name), **_argparse_kwargs(name))


def settings_from_args(args: argparse.Namespace, **extra: Any) -> Settings:
    """Environment settings with the flags that were given (and ``extra``) on top."""
    overrides = {
        name: value
        for name in Settings.model_fields
        if (value := getattr(args, name, None)) is not None
    }
    overrides.update(extra)
    return Settings(**overrides)
