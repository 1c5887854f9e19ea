"""Kept images and heatmaps of inspection records, on disk, with a size cap and an age limit.

Layout: ``<root>/<YYYY-MM-DD>/<id>.<kind>.<ext>`` (UTC day of the inspection), kinds:

* ``thumb.jpg`` - the image, longest side ``thumbnail_px`` (JPEG, quality 85);
* ``heatmap.png`` - the anomaly map at the thumbnail's size (jet palette PNG, absolute scale);
* ``image.<png|jpg|bmp|tif>`` - the uploaded file byte for byte (``keep_originals`` only);
* ``heatmap-full.png`` - the anomaly map at the image's resolution (``keep_originals`` only).

Retention: whole day directories older than ``retention_days`` go first; then, while the
directory holds more than ``max_bytes``, the oldest files are deleted down to 90 % of the cap.
The rows stay in the database; their images answer 404 once deleted. Every method here
blocks (file I/O, encoding): the recorder runs them on a thread of its own.
"""

from __future__ import annotations

import heapq
import io
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from PIL import Image

from service.heatmap import heatmap_png

log = logging.getLogger(__name__)

KEEP_NONE, KEEP_ANOMALOUS, KEEP_ALL = "none", "anomalous", "all"
THUMB_JPEG_QUALITY = 85
CAP_LOW_WATER = 0.9  # after the cap is passed, delete down to this fraction of it
# enforce_cap orders a day's files oldest first in sorted runs of this many, merged lazily: one
# sort of a whole day (160 000 files in a measured run) is a single C call that held the GIL,
# and so the API's event loop, for 180 ms (found with perf under bench/bench_overload.py)
SORT_RUN = 4096

MEDIA_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp", ".tif": "image/tiff"}


def sniff_extension(data: bytes) -> str:
    """File extension of an uploaded image from its magic bytes (the formats /inspect takes)."""
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    if data.startswith(b"BM"):
        return ".bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return ".tif"
    return ".bin"


def thumbnail_size(width: int, height: int, longest: int) -> tuple[int, int]:
    scale = min(1.0, longest / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


class MediaStore:
    """Writes, finds and expires the kept files of inspection records."""

    def __init__(self, root: Path, *, keep: str, originals: bool, thumbnail_px: int,
                 max_bytes: int, retention_days: float) -> None:
        if keep not in (KEEP_NONE, KEEP_ANOMALOUS, KEEP_ALL):
            raise ValueError(f"keep must be none, anomalous or all, not {keep!r}")
        self.root = Path(root).resolve()
        self.keep = keep
        self.originals = originals
        self.thumbnail_px = thumbnail_px
        self.max_bytes = max_bytes
        self.retention_days = retention_days
        self._lock = threading.Lock()
        self._bytes = 0

    # ------------------------------------------------------------------ policy
    def wants(self, is_anomalous: bool) -> bool:
        return self.keep == KEEP_ALL or (self.keep == KEEP_ANOMALOUS and is_anomalous)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    # ------------------------------------------------------------------ write
    def save(self, record_id: str, created_at: datetime, image: Image.Image, map_u8: np.ndarray | None,
             original: bytes | None) -> dict[str, str]:
        """Write the kept files of one record; returns ``{kind: path relative to root}``."""
        day = created_at.astimezone(UTC).strftime("%Y-%m-%d")
        folder = self.root / day
        folder.mkdir(parents=True, exist_ok=True)
        files: dict[str, bytes] = {}
        size = thumbnail_size(image.width, image.height, self.thumbnail_px)
        thumb = image if image.size == size else image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)
        buf = io.BytesIO()
        thumb.convert("RGB").save(buf, format="JPEG", quality=THUMB_JPEG_QUALITY)
        files["thumb.jpg"] = buf.getvalue()
        if map_u8 is not None:
            small = map_u8
            if map_u8.shape[::-1] != size:
                small = np.asarray(Image.fromarray(map_u8, mode="L").resize(size, Image.Resampling.BILINEAR))
            files["heatmap.png"] = heatmap_png(small)
        if self.originals:
            if original is not None:
                files["image" + sniff_extension(original)] = original
            if map_u8 is not None:
                files["heatmap-full.png"] = heatmap_png(map_u8) if map_u8.shape[::-1] != size else files["heatmap.png"]
        written: dict[str, str] = {}
        added = 0
        for suffix, data in files.items():
            final = folder / f"{record_id}.{suffix}"
            tmp = folder / f".{record_id}.{suffix}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, final)
            kind = suffix.split(".", 1)[0]
            written[kind] = f"{day}/{final.name}"
            added += len(data)
        with self._lock:
            self._bytes += added
            over = self.max_bytes and self._bytes > self.max_bytes
        if over:
            self.enforce_cap()
        return written

    # ------------------------------------------------------------------ read
    def path(self, relative: str | None) -> Path | None:
        """The file of a stored relative path, or ``None`` when gone (or not under the root)."""
        if not relative:
            return None
        candidate = (self.root / relative).resolve()
        if candidate.parent.parent != self.root or not candidate.is_file():
            return None
        return candidate

    # ------------------------------------------------------------------ retention
    def _day_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and len(p.name) == 10 and p.name[4] == "-")

    def scan(self) -> int:
        """Recount the bytes under the root (other processes may share it)."""
        total = 0
        for folder in self._day_dirs():
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
        with self._lock:
            self._bytes = total
        return total

    def expire(self, now: datetime | None = None) -> int:
        """Delete day directories older than ``retention_days``; returns how many."""
        if not self.retention_days:
            return 0
        now = now or datetime.now(UTC)
        cutoff = (now - timedelta(days=self.retention_days)).strftime("%Y-%m-%d")
        removed = 0
        for folder in self._day_dirs():
            if folder.name < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
                removed += 1
        if removed:
            log.info("records media: deleted %d day folder(s) older than %g days", removed, self.retention_days)
        return removed

    def enforce_cap(self) -> int:
        """Delete the oldest files while over ``max_bytes`` (down to 90 %); returns bytes freed."""
        if not self.max_bytes:
            return 0
        total = self.scan()
        if total <= self.max_bytes:
            return 0
        target = int(self.max_bytes * CAP_LOW_WATER)
        freed = 0
        for folder in self._day_dirs():
            with os.scandir(folder) as listing:
                files = [(stat.st_mtime_ns, e.name, e.path, stat.st_size) for e in listing
                         if e.is_file(follow_symlinks=False) and (stat := e.stat(follow_symlinks=False))]
            for _mtime, _name, path, size in _oldest_first(files):
                if total - freed <= target:
                    break
                try:
                    os.unlink(path)
                except OSError:
                    continue
                freed += size
            if total - freed <= target:
                break
            if not any(folder.iterdir()):
                folder.rmdir()
        with self._lock:
            self._bytes = max(0, total - freed)
        log.warning("records media over its cap (%d bytes > %d): deleted the oldest %d bytes",
                    total, self.max_bytes, freed)
        return freed

    def sweep(self, now: datetime | None = None) -> None:
        """Age limit, then size cap (run at start-up and periodically)."""
        self.expire(now)
        self.scan()
        if self.max_bytes and self._bytes > self.max_bytes:
            self.enforce_cap()


def _oldest_first(files: list[tuple[int, str, str, int]]) -> Iterator[tuple[int, str, str, int]]:
    """``files`` (mtime_ns, name, path, size) in ascending order: sorted in runs of :data:`SORT_RUN`,
    merged lazily, so that the thread holds the GIL for one short sort at a time."""
    runs = [sorted(files[i:i + SORT_RUN]) for i in range(0, len(files), SORT_RUN)]
    return heapq.merge(*runs)
