"""On-disk cache of exported vision IRs, keyed by everything that changes their numbers.

An entry is a folder ``<root>/<model>-<S>px-<precision>-<key digest>/`` holding ``vision.xml``,
``vision.bin`` and ``meta.json``. The key (:class:`IrKey`) is the backbone's weights digest
(sha256 of the vision tower's tensors, so a new weight file, tag or random seed gives a new
entry), the architecture, the resolution, the tapped layers, the precision and, for int8, the
calibration set's digest: change any of them and a new IR is built.

Every load is verified: ``meta.json`` must hold the same key, the IR files the sha256 recorded at
export, and the IR the expected input shape and outputs. An entry that fails any check (edited,
truncated, copied from another setting) is **rebuilt**, with a warning naming what differed;
only when the rebuild itself fails (e.g. the cache folder is read-only) is it an error.

Concurrent builders of one entry (several workers starting at once) serialise on a lock file,
so the second finds the first one's IR instead of exporting again; entries are written to a
temporary folder and renamed into place, so a reader never sees half an entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.errors import RuntimeExportError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
XML_NAME = "vision.xml"
BIN_NAME = "vision.bin"
META_NAME = "meta.json"
_HASH_CHUNK = 16 * 1024 * 1024


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/genclip/openvino``, else ``~/.cache/genclip/openvino``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "genclip" / "openvino"


def weights_digest(module: nn.Module) -> str:
    """sha256 over a module's state dict (names, dtypes, shapes and bytes), in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(dtype=torch.uint8).numpy())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class IrKey:
    """Everything that determines an exported IR's outputs.

    Attributes:
        model_name: open_clip architecture (``ViT-L-14-336``).
        weights_digest: :func:`weights_digest` of the vision tower.
        quick_gelu: whether the blocks use QuickGELU (part of the architecture).
        image_size: serving resolution S (static in the IR).
        layers: 1-based tapped blocks.
        precision: ``fp32`` or ``int8``.
        calibration_digest: int8 only: sha256 of the preprocessed calibration images.
        format_version: bumped when the export itself changes.
    """

    model_name: str
    weights_digest: str
    quick_gelu: bool
    image_size: int
    layers: tuple[int, ...]
    precision: str
    calibration_digest: str | None = None
    format_version: int = FORMAT_VERSION

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = list(self.layers)
        return data

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()

    @property
    def entry_name(self) -> str:
        model = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model_name)
        return f"{model}-{self.image_size}px-{self.precision}-{self.digest[:16]}"


@dataclass(frozen=True)
class CachedIr:
    """A verified cache entry: the IR read back and its folder."""

    model: Any
    path: Path
    meta: dict[str, Any]


class IrCache:
    """The IR cache under ``root`` (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()

    def entry(self, key: IrKey) -> Path:
        return self.root / key.entry_name

    @contextlib.contextmanager
    def lock(self, key: IrKey) -> Iterator[None]:
        """Exclusive lock on one entry across processes (a ``flock`` on ``<entry>.lock``)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            handle = open(self.root / f"{key.entry_name}.lock", "a+b")
        except OSError as error:
            raise RuntimeExportError(
                f"cannot use the OpenVINO IR cache folder {self.root}: {error}. "
                "Set GENCLIP_OPENVINO_CACHE_DIR to a writable folder."
            ) from error
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def load(self, key: IrKey, expected_input: list[int], expected_outputs: list[str]) -> CachedIr | None:
        """The verified entry for ``key``, or ``None`` when absent or not matching (then removed).

        Args:
            expected_input: the IR input's static dims after the batch, e.g. ``[3, 518, 518]``.
            expected_outputs: the IR's output names, in order.
        """
        path = self.entry(key)
        if not path.exists():
            return None
        problem, cached = self._verify(path, key, expected_input, expected_outputs)
        if problem is None:
            return cached
        log.warning("cached OpenVINO IR %s does not match (%s): rebuilding it", path, problem)
        shutil.rmtree(path, ignore_errors=True)
        return None

    def _verify(
        self, path: Path, key: IrKey, expected_input: list[int], expected_outputs: list[str]
    ) -> tuple[str | None, CachedIr | None]:
        import openvino as ov

        try:
            meta = json.loads((path / META_NAME).read_text())
        except (OSError, ValueError) as error:
            return f"{META_NAME} unreadable: {error}", None
        recorded = meta.get("key") if isinstance(meta, dict) else None
        if recorded != key.as_dict():
            if not isinstance(recorded, dict):
                return f"{META_NAME} holds no key", None
            fields = sorted(name for name, value in key.as_dict().items() if recorded.get(name) != value)
            return "key differs in " + ", ".join(
                f"{name} (cached {recorded.get(name)!r}, wanted {key.as_dict()[name]!r})" for name in fields
            ), None
        for name in (XML_NAME, BIN_NAME):
            try:
                actual = file_digest(path / name)
            except OSError as error:
                return f"{name} unreadable: {error}", None
            if actual != meta.get("files", {}).get(name):
                return f"{name} changed since it was written (sha256 {actual[:12]}...)", None
        try:
            model = ov.Core().read_model(str(path / XML_NAME))
        except Exception as error:  # OpenVINO raises RuntimeError and friends
            return f"IR unreadable: {error}", None
        shape = model.inputs[0].get_partial_shape()
        dims = [int(dim.get_length()) if dim.is_static else -1 for dim in shape]
        if dims[1:] != expected_input:
            return f"input shape {dims[1:]} instead of {expected_input}", None
        names = [output.get_any_name() for output in model.outputs]
        if names != expected_outputs:
            return f"outputs {names} instead of {expected_outputs}", None
        return None, CachedIr(model, path, meta)

    def store(self, key: IrKey, model: Any, info: dict[str, Any]) -> Path:
        """Write ``model`` as the entry for ``key`` (replacing any), atomically; returns its folder.

        Raises:
            RuntimeExportError: the cache folder is not writable (or the disk is full).
        """
        import openvino as ov

        path = self.entry(key)
        temporary = self.root / f".{key.entry_name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            temporary.mkdir(parents=True)
            ov.save_model(model, str(temporary / XML_NAME), compress_to_fp16=False)
            meta = {
                "key": key.as_dict(),
                "files": {name: file_digest(temporary / name) for name in (XML_NAME, BIN_NAME)},
                "openvino_version": ov.get_version(),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                **info,
            }
            (temporary / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
            if path.exists():
                shutil.rmtree(path)
            os.rename(temporary, path)
        except OSError as error:
            shutil.rmtree(temporary, ignore_errors=True)
            raise RuntimeExportError(
                f"cannot write the OpenVINO IR to the cache folder {self.root}: {error}. "
                "Set GENCLIP_OPENVINO_CACHE_DIR to a writable folder with enough space."
            ) from error
        return path
