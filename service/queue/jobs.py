"""(De)serialisation of jobs and results for the Redis transport.

Job (stream entry fields):
    ``meta``: JSON {v, id, class_name, deadline, enqueued_at, enc, mode, width, height}
    ``img``: the pixels: ``enc="raw"`` = decoded bytes of ``mode`` (RGB), ``enc="file"`` =
    the validated upload (JPEG/PNG/BMP/TIFF), decoded again by the worker.

Result (one value pushed to ``<prefix>:reply:<job id>``):
    ``b"GCR1"`` + 4-byte big-endian header length + JSON header + map bytes, where the map is
    the uint8 anomaly map (H, W), zlib-compressed (level 1) when large.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image

from service.queue.base import Job, JobResult

JOB_VERSION = 1
RESULT_MAGIC = b"GCR1"
_COMPRESS_ABOVE = 256 * 1024
FILE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF")


class PayloadError(ValueError):
    """A stream entry or reply that cannot be decoded."""


def encode_job(job: Job, *, raw_max_bytes: int, file_bytes: bytes | None = None) -> dict[str, bytes]:
    """Stream fields for ``job`` (whose ``image`` is the decoded RGB image).

    Decoded pixels go as-is when they fit in ``raw_max_bytes`` (worker does no decoding);
    larger images travel as the validated ``file_bytes`` (usually far smaller).
    """
    image = job.image
    if image is None:
        raise PayloadError("job has no decoded image")
    raw_size = image.width * image.height * len(image.getbands())
    if file_bytes is not None and raw_size > raw_max_bytes:
        enc, data = "file", file_bytes
    else:
        enc, data = "raw", image.tobytes()
    meta = {
        "v": JOB_VERSION,
        "id": job.id,
        "class_name": job.class_name,
        "deadline": job.deadline,
        "enqueued_at": job.enqueued_at,
        "enc": enc,
        "mode": image.mode,
        "width": image.width,
        "height": image.height,
    }
    return {"meta": json.dumps(meta).encode(), "img": data}


def decode_job(fields: dict[bytes, bytes], *, max_pixels: int) -> Job:
    """Rebuild a :class:`Job` from stream fields; the image loads lazily (worker thread)."""
    try:
        meta = json.loads(fields[b"meta"])
        data = fields[b"img"]
        if meta.get("v") != JOB_VERSION:
            raise PayloadError(f"unsupported job version {meta.get('v')!r}")
        enc, mode = meta["enc"], meta["mode"]
        size = (int(meta["width"]), int(meta["height"]))
        job = Job(
            id=str(meta["id"]),
            class_name=meta.get("class_name"),
            deadline=float(meta["deadline"]),
            enqueued_at=float(meta["enqueued_at"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PayloadError(f"malformed job entry: {exc}") from exc
    if size[0] * size[1] > max_pixels:
        raise PayloadError(f"job {job.id}: image {size} over the pixel limit")

    def load() -> Image.Image:
        if enc == "raw":
            return Image.frombytes(mode, size, data)
        if enc == "file":
            with Image.open(io.BytesIO(data), formats=FILE_FORMATS) as img:
                if img.size != size:
                    raise PayloadError(f"job {job.id}: image size {img.size} != {size}")
                img.load()
                return img.convert("RGB")
        raise PayloadError(f"job {job.id}: unknown image encoding {enc!r}")

    job.loader = load
    return job


def encode_result(result: JobResult) -> bytes:
    header: dict[str, Any] = {
        "job_id": result.job_id,
        "ok": result.ok,
        "score": result.score,
        "class_label": result.class_label,
        "component_scores": result.component_scores,
        "identity": result.identity,
        "worker": result.worker,
        "batch_size": result.batch_size,
        "queue_ms": result.queue_ms,
        "model_ms": result.model_ms,
        "error": result.error,
        "message": result.message,
    }
    body = b""
    amap = result.anomaly_map
    if amap is not None:
        amap = np.ascontiguousarray(amap, dtype=np.uint8)
        body = amap.tobytes()
        header["map_shape"] = list(amap.shape)
        header["map_zlib"] = len(body) > _COMPRESS_ABOVE
        if header["map_zlib"]:
            body = zlib.compress(body, 1)
    head = json.dumps(header).encode()
    return RESULT_MAGIC + struct.pack(">I", len(head)) + head + body


def decode_result(payload: bytes) -> JobResult:
    if payload[:4] != RESULT_MAGIC or len(payload) < 8:
        raise PayloadError("not a result payload")
    (hlen,) = struct.unpack(">I", payload[4:8])
    try:
        header = json.loads(payload[8 : 8 + hlen])
    except ValueError as exc:
        raise PayloadError(f"malformed result header: {exc}") from exc
    body = payload[8 + hlen :]
    amap = None
    if "map_shape" in header:
        if header.get("map_zlib"):
            body = zlib.decompress(body)
        shape = tuple(int(s) for s in header["map_shape"])
        amap = np.frombuffer(body, dtype=np.uint8).reshape(shape)
    return JobResult(
        job_id=header["job_id"],
        ok=bool(header["ok"]),
        score=float(header.get("score", 0.0)),
        class_label=header.get("class_label", ""),
        component_scores={k: float(v) for k, v in (header.get("component_scores") or {}).items()},
        anomaly_map=amap,
        identity=header.get("identity") or {},
        worker=header.get("worker", ""),
        batch_size=int(header.get("batch_size", 0)),
        queue_ms=float(header.get("queue_ms", 0.0)),
        model_ms=float(header.get("model_ms", 0.0)),
        error=header.get("error"),
        message=header.get("message", ""),
    )
