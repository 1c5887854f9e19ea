"""Upload validation and decoding (run off the event loop, in the API's thread pool).

Order of checks, cheapest first, nothing decoded before it is known to be safe:

1. request-level, before any body is parsed: the HTTP protocol (:mod:`service.http_server`:
   timeouts, body size) and the upload guard (:mod:`service.upload_guard`: API key,
   ``multipart/form-data``, per-route body size, admission);
2. the file part's declared content type (when given) must be an image type we take;
3. :func:`decode_image`: file size; ``Image.open(fp, formats=[JPEG, PNG, BMP, TIFF])`` reads
   only the header, from which come the pixel count (``max_image_pixels``), the decoded size
   (width x height x bands x bytes per sample: ``max_decoded_bytes``, 413) and the frame count
   (multi-frame TIFF / animated PNG: 422), all *before* decoding; then the decoded bytes are
   reserved in the process-wide budget (:mod:`service.limits`: 503 when spent); then a full
   decode (``load``), which is where a truncated or corrupt file fails; then the EXIF / TIFF
   orientation is applied, so the detector sees and the heatmap shows the image as displayed.

Multi-frame policy: a TIFF with several pages or an animated PNG is refused (422
``multi_frame``): which frame is the part is not ours to guess. A JPEG with a Multi-Picture
(MPO) extension is accepted: its first image is by definition the primary image (the others
are previews or stereo views), and it is what every viewer shows.
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageMode, UnidentifiedImageError

ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "TIFF")
ALLOWED_PART_TYPES = frozenset({
    "image/jpeg", "image/jpg", "image/pjpeg", "image/png", "image/x-png", "image/bmp",
    "image/x-bmp", "image/x-ms-bmp", "image/tiff", "image/tif", "image/x-tiff",
    "application/octet-stream",
})
# Formats whose extra frames are not alternatives to the image (see the module docstring).
PRIMARY_FRAME_FORMATS = frozenset({"MPO"})
# EXIF / TIFF orientation tag value -> the transposition that shows the image upright.
ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageRejected(Exception):
    """An upload we refuse: ``status`` is the HTTP status to answer (503s carry a retry delay)."""

    def __init__(self, status: int, code: str, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms


@dataclass(frozen=True)
class ImageProbe:
    """What the header says, before any pixel is decoded."""

    format: str
    width: int
    height: int
    mode: str
    bands: int
    bytes_per_sample: int
    orientation: int  # EXIF / TIFF orientation tag (1 = upright)
    multi_frame: bool

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decoded_bytes(self) -> int:
        """width x height x bands x bytes per sample of the file's own pixel mode."""
        return self.pixels * self.bands * self.bytes_per_sample

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) once the orientation is applied."""
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)


@dataclass
class DecodedImage:
    image: Image.Image  # RGB, in displayed orientation
    format: str
    width: int  # displayed width
    height: int  # displayed height
    decode_ms: float
    orientation: int = 1  # the orientation tag that was applied (1 = none)


def check_part_content_type(content_type: str | None) -> None:
    """415 unless the file part's declared type is an accepted image type (or absent)."""
    if not content_type:
        return
    base = content_type.split(";", 1)[0].strip().lower()
    if base not in ALLOWED_PART_TYPES:
        raise ImageRejected(
            415, "unsupported_media_type",
            f"file part content type {base!r} is not accepted: send JPEG, PNG, BMP or TIFF",
        )


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.float32) / 257.0
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.min(arr)), float(np.max(arr))
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.astype(np.uint8), mode="L").convert("RGB")
    return img.convert("RGB")


def probe_image(img: Image.Image) -> ImageProbe:
    """Read size, pixel mode, orientation and frame count of an opened (not loaded) image."""
    mode = ImageMode.getmode(img.mode)
    bytes_per_sample = max(1, np.dtype(mode.typestr).itemsize)
    try:
        orientation = int(img.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # unreadable EXIF is no reason to refuse the pixels
        orientation = 1
    if orientation not in ORIENTATION_TRANSPOSE:
        orientation = 1
    width, height = img.size
    return ImageProbe(
        format=img.format or "?", width=width, height=height, mode=img.mode, bands=len(mode.bands),
        bytes_per_sample=bytes_per_sample, orientation=orientation,
        multi_frame=bool(getattr(img, "is_animated", False)) and img.format not in PRIMARY_FRAME_FORMATS,
    )


def decode_image(
    data: bytes,
    *,
    max_bytes: int,
    max_pixels: int,
    max_decoded_bytes: int | None = None,
    reserve: Callable[[int], None] | None = None,
) -> DecodedImage:
    """Validate and decode an upload to RGB in displayed orientation, or raise :class:`ImageRejected`.

    Args:
        data: the file bytes.
        max_bytes: largest file (413).
        max_pixels: largest width x height from the header (413).
        max_decoded_bytes: largest width x height x bands x bytes per sample from the header (413).
        reserve: called with the decoded size before decoding; raises :class:`ImageRejected`
            (503) when the process-wide budget cannot hold it (:meth:`service.limits.ByteBudget.reserver`).
    """
    t0 = time.perf_counter()
    if not data:
        raise ImageRejected(415, "unsupported_media_type", "the image file is empty")
    if len(data) > max_bytes:
        raise ImageRejected(
            413, "payload_too_large", f"image file is {len(data)} bytes, the limit is {max_bytes}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageRejected(413, "image_too_large", f"image has too many pixels: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageRejected(
            415, "unsupported_media_type",
            "not a readable image: send a JPEG, PNG, BMP or TIFF file",
        ) from exc
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageRejected(415, "unsupported_media_type", "image has an empty size")
        if width * height > max_pixels:
            raise ImageRejected(
                413, "image_too_large",
                f"image is {width}x{height} = {width * height} pixels, the limit is {max_pixels}",
            )
        try:
            probe = probe_image(img)
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise ImageRejected(415, "unsupported_media_type", f"unsupported image header: {exc}") from exc
        if max_decoded_bytes is not None and probe.decoded_bytes > max_decoded_bytes:
            raise ImageRejected(
                413, "image_too_large",
                f"image decodes to {probe.decoded_bytes} bytes ({width}x{height}, {probe.bands} band(s) "
                f"of {probe.bytes_per_sample} byte(s), mode {probe.mode}), the limit is {max_decoded_bytes}",
            )
        if probe.multi_frame:
            raise ImageRejected(
                422, "multi_frame",
                f"the {probe.format} file holds several frames: send one image per request",
            )
        if reserve is not None:
            reserve(probe.decoded_bytes)
        fmt = probe.format
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.load()
                rgb = _to_rgb(img)
        except MemoryError as exc:
            raise ImageRejected(413, "image_too_large", "image too large to decode") from exc
        except Image.DecompressionBombError as exc:
            raise ImageRejected(413, "image_too_large", f"image has too many pixels: {exc}") from exc
        except Exception as exc:  # truncated / corrupt data: Pillow raises many types
            raise ImageRejected(
                415, "unsupported_media_type",
                f"the {fmt} image could not be decoded (truncated or corrupt): {exc}",
            ) from exc
        if rgb.size != (width, height):  # pragma: no cover - defensive
            raise ImageRejected(415, "unsupported_media_type", "image size changed while decoding")
        if probe.orientation != 1:
            rgb = rgb.transpose(ORIENTATION_TRANSPOSE[probe.orientation])
        elif rgb is img:
            rgb = img.copy()  # detach from the file object closed below
    finally:
        img.close()
    return DecodedImage(rgb, fmt, rgb.width, rgb.height, (time.perf_counter() - t0) * 1000.0, probe.orientation)
