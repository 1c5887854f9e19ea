"""(De)serialisation of jobs and results for the Redis transport.

Job (stream entry fields):
    ``meta``: JSON {v, id, kind, class_name, product, deadline, enqueued_at, enc, mode, width,
    height}
    ``img``: the pixels: ``enc="raw"`` = decoded bytes of ``mode`` (RGB), ``enc="file"`` =
    the validated upload (JPEG/PNG/BMP/TIFF), decoded again by the worker exactly as the API
    did (:func:`service.image_input.decode_image`: same orientation), so ``width`` x ``height``
    is the displayed size either way. ``reference`` jobs carry no image (``enc="none"``, empty
    ``img``): the worker reads the good photos from the database.

Result (one value pushed to ``<prefix>:reply:<job id>``):
    ``b"GCR1"`` + 4-byte big-endian header length + JSON header + map bytes, where the map is
    the uint8 anomaly map (H, W), zlib-compressed (level 1) when large. Decoding checks every
    field and inflates at most H x W bytes (H x W itself bounded by the pixel limit): a
    malformed or hostile reply raises :class:`PayloadError`, never allocates without bound.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import numpy as np
from PIL import Image

from service.image_input import ImageRejected, decode_image
from service.queue.base import JOB_INSPECT, JOB_KINDS, Job, JobResult, ProductRef

JOB_VERSION = 2
RESULT_MAGIC = b"GCR1"
_COMPRESS_ABOVE = 256 * 1024


class PayloadError(ValueError):
    """A stream entry or reply that cannot be decoded."""


def encode_job(job: Job, *, raw_max_bytes: int, file_bytes: bytes | None = None) -> dict[str, bytes]:
    """Stream fields for ``job`` (whose ``image`` is the decoded RGB image).

    Decoded pixels go as-is when they fit in ``raw_max_bytes`` (worker does no decoding);
    larger images travel as the validated ``file_bytes`` (usually far smaller).
    """
    meta: dict[str, Any] = {
        "v": JOB_VERSION,
        "id": job.id,
        "kind": job.kind,
        "class_name": job.class_name,
        "product": job.product.as_dict() if job.product is not None else None,
        "deadline": job.deadline,
        "enqueued_at": job.enqueued_at,
    }
    if job.kind != JOB_INSPECT:
        meta.update(enc="none", mode="", width=0, height=0)
        return {"meta": json.dumps(meta).encode(), "img": b""}
    image = job.image
    if image is None:
        raise PayloadError("job has no decoded image")
    raw_size = image.width * image.height * len(image.getbands())
    if file_bytes is not None and raw_size > raw_max_bytes:
        enc, data = "file", file_bytes
    else:
        enc, data = "raw", image.tobytes()
    meta.update(enc=enc, mode=image.mode, width=image.width, height=image.height)
    return {"meta": json.dumps(meta).encode(), "img": data}


def decode_job(fields: dict[bytes, bytes], *, max_pixels: int) -> Job:
    """Rebuild a :class:`Job` from stream fields; the image loads lazily (worker thread)."""
    try:
        meta = json.loads(fields[b"meta"])
        data = fields[b"img"]
        if meta.get("v") != JOB_VERSION:
            raise PayloadError(f"unsupported job version {meta.get('v')!r} (API and worker versions differ?)")
        enc, mode = meta["enc"], meta["mode"]
        size = (int(meta["width"]), int(meta["height"]))
        kind = str(meta.get("kind", JOB_INSPECT))
        if kind not in JOB_KINDS:
            raise PayloadError(f"unknown job kind {kind!r}")
        product = meta.get("product")
        job = Job(
            id=str(meta["id"]),
            class_name=meta.get("class_name"),
            deadline=float(meta["deadline"]),
            enqueued_at=float(meta["enqueued_at"]),
            kind=kind,
            product=ProductRef.from_dict(product) if product else None,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise PayloadError(f"malformed job entry: {exc}") from exc
    if kind != JOB_INSPECT:
        return job
    if size[0] * size[1] > max_pixels:
        raise PayloadError(f"job {job.id}: image {size} over the pixel limit")

    def load() -> Image.Image:
        if enc == "raw":
            return Image.frombytes(mode, size, data)
        if enc == "file":
            try:
                image = decode_image(data, max_bytes=len(data), max_pixels=max_pixels).image
            except ImageRejected as exc:
                raise PayloadError(f"job {job.id}: {exc.message}") from exc
            if image.size != size:
                raise PayloadError(f"job {job.id}: image size {image.size} != {size}")
            return image
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
        "report": result.report,
        "reference_version": result.reference_version,
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


def decode_result(payload: bytes, *, max_pixels: int = 2**31) -> JobResult:
    """Rebuild a :class:`JobResult`; :class:`PayloadError` for anything malformed."""
    if not isinstance(payload, bytes | bytearray) or payload[:4] != RESULT_MAGIC or len(payload) < 8:
        raise PayloadError("not a result payload")
    (hlen,) = struct.unpack(">I", payload[4:8])
    if 8 + hlen > len(payload):
        raise PayloadError(f"result header length {hlen} passes the payload ({len(payload)} bytes)")
    try:
        header = json.loads(payload[8 : 8 + hlen])
    except ValueError as exc:
        raise PayloadError(f"malformed result header: {exc}") from exc
    if not isinstance(header, dict):
        raise PayloadError("result header is not an object")
    body = payload[8 + hlen :]
    try:
        amap = None
        if "map_shape" in header:
            shape = tuple(int(s) for s in header["map_shape"])
            if len(shape) != 2 or min(shape) <= 0 or shape[0] * shape[1] > max_pixels:
                raise PayloadError(f"bad anomaly map shape {header['map_shape']!r}")
            expected = shape[0] * shape[1]
            if header.get("map_zlib"):
                inflater = zlib.decompressobj()
                body = inflater.decompress(body, expected)  # never more than the map's size
                if inflater.unconsumed_tail or not inflater.eof:
                    raise PayloadError(f"compressed anomaly map inflates past {expected} bytes or is truncated")
            if len(body) != expected:
                raise PayloadError(f"anomaly map has {len(body)} bytes, its shape {shape} needs {expected}")
            amap = np.frombuffer(body, dtype=np.uint8).reshape(shape)
        score = float(header.get("score", 0.0))
        if not np.isfinite(score):
            raise PayloadError(f"non-finite score {score!r}")
        component_scores = header.get("component_scores") or {}
        identity = header.get("identity") or {}
        if not isinstance(component_scores, dict) or not isinstance(identity, dict):
            raise PayloadError("component_scores and identity must be objects")
        return JobResult(
            job_id=str(header["job_id"]),
            ok=bool(header["ok"]),
            score=score,
            class_label=str(header.get("class_label", "")),
            component_scores={str(k): float(v) for k, v in component_scores.items()},
            anomaly_map=amap,
            identity=identity,
            worker=str(header.get("worker", "")),
            batch_size=int(header.get("batch_size", 0)),
            queue_ms=float(header.get("queue_ms", 0.0)),
            model_ms=float(header.get("model_ms", 0.0)),
            error=None if header.get("error") is None else str(header["error"]),
            message=str(header.get("message", "")),
            report=_optional_dict(header.get("report")),
            reference_version=None if header.get("reference_version") is None else int(header["reference_version"]),
        )
    except PayloadError:
        raise
    except (KeyError, TypeError, ValueError, OverflowError, zlib.error) as exc:
        raise PayloadError(f"malformed result: {type(exc).__name__}: {exc}") from exc


def _optional_dict(value: Any) -> dict[str, Any] | None:
    if value is not None and not isinstance(value, dict):
        raise PayloadError("report must be an object")
    return value
