"""``POST /inspect``: one part's photo in, score + decision + heatmap out.

Request path::

    HTTP protocol (timeouts, body size, load shedding: service.http_server)
      -> UploadGuard (ASGI: API key, multipart content type, body size, admission - before parsing)
      -> multipart parse -> repeated fields (422) -> product lookup (cached; 404)
      -> part content type -> decode + validate within the decoded-bytes budget (thread pool;
         EXIF orientation applied)
      -> admission + enqueue (503) -> await the job's own result (deadline: 504, lost job: 503,
         malformed result: 502)
      -> thresholds (product / class / default) -> defect regions, heatmap PNG (thread pool)
      -> JSON or image/png
      -> recorder.record (queues the inspection record; written off the request path)

No ``from __future__ import annotations`` here: the form fields' annotations use the app's
settings (closure variables), which postponed (string) annotations could not resolve.
"""

import asyncio
import base64
import time
import uuid
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from service import heatmap as heatmap_mod
from service.auth import ApiKeyAuth
from service.db.inspections import PART_ID_MAX_LENGTH, STATION_MAX_LENGTH
from service.db.products import NAME_PATTERN
from service.decisions import DecisionPolicy, decision_policy, find_defects
from service.errors import ApiError
from service.form_fields import single_valued
from service.image_input import ImageRejected, check_part_content_type, decode_image
from service.products.repository import ProductNotFound
from service.products.resolver import DatabaseUnavailable, ProductView
from service.query_types import NO_CONTROL_CHARACTERS, has_control_characters
from service.queue.base import ERROR_STATUS, Job, JobResult, MalformedResult, QueueError
from service.records.client_fields import FieldRejected, clean_text_field
from service.schemas import ERROR_RESPONSES, ErrorResponse, HeatmapMode, InspectResponse, TimingMs
from service.settings import Settings
from service.state import ServiceState
from service.thresholds import Thresholds


def prefers_png(accept: str | None) -> bool:
    """Whether the Accept header ranks image/png above application/json (ties: JSON)."""
    if not accept:
        return False
    q: dict[str, float] = {}
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        weight = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        q[media.lower()] = max(weight, q.get(media.lower(), 0.0))

    def best(*names: str) -> float:
        for name in names:
            if name in q:
                return q[name]
        return 0.0

    return best("image/png", "image/*", "*/*") > best("application/json", "application/*", "*/*")


def _header_text(value: str) -> str:
    return quote(value, safe=" !#$&'()*+,-./:;<=>?@[]^_`{|}~")


def build_router(settings: Settings, auth: ApiKeyAuth) -> APIRouter:
    """The inspection resource for one app (form limits come from ``settings``)."""
    router = APIRouter(tags=["inspection"])
    inspect_deps = [Depends(auth.dependency())] if auth.enabled else []
    inspect_deps.append(Depends(single_valued("image", "class_name", "product", "part_id", "station")))
    retry_after_ms = settings.retry_after_s * 1000

    @router.post(
        "/inspect",
        response_model=InspectResponse,
        responses={
            200: {
                "description": "Inspection result (JSON), or the heatmap PNG itself when "
                "`Accept: image/png` (fields in `X-Anomaly-*` headers).",
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            },
            404: {"model": ErrorResponse, "description": "Unknown product."},
            406: {"model": ErrorResponse, "description": "Accept: image/png with heatmap=none."},
            409: {"model": ErrorResponse, "description": "The product's reference does not fit the running "
                  "detector: rebuild it (POST /products/{name}/calibrate)."},
            **ERROR_RESPONSES,
        },
        dependencies=inspect_deps,
        summary="Inspect one part image",
        openapi_extra={"requestBody": {"content": {"multipart/form-data": {"encoding": {
            "image": {"contentType": "image/jpeg, image/png, image/bmp, image/tiff"}}}}}},
    )
    async def inspect(
        request: Request,
        image: Annotated[UploadFile, File(description="The part's photo: JPEG, PNG, BMP or TIFF (one frame).",
                                          json_schema_extra={"minLength": 1})],
        class_name: Annotated[
            str | None,
            Form(max_length=settings.max_class_name_length, pattern=NO_CONTROL_CHARACTERS,
                 description="Class name written in the prompts (e.g. `bottle`); optional; no control "
                 "characters. With `product`, leave it out (the product's class name is used)."),
        ] = None,
        product: Annotated[
            str | None,
            Form(pattern=NAME_PATTERN, description="Registered product (PUT /products/{name}): its class name, "
                 "few-shot reference and calibrated thresholds are used."),
        ] = None,
        heatmap: Annotated[
            HeatmapMode,
            Query(description="`png`: coloured map; `overlay`: map blended over the image; `none`."),
        ] = HeatmapMode.png,
        mask: Annotated[
            bool, Query(description="Also return `mask_png`, the binary mask of the defective pixels.")
        ] = False,
        part_id: Annotated[
            str | None,
            Form(max_length=PART_ID_MAX_LENGTH, pattern=NO_CONTROL_CHARACTERS,
                 description="The part's id (serial number), kept in its record."),
        ] = None,
        station: Annotated[
            str | None,
            Form(max_length=STATION_MAX_LENGTH, pattern=NO_CONTROL_CHARACTERS,
                 description="The station / camera that sent it, kept in its record."),
        ] = None,
    ) -> Response:
        state: ServiceState = request.app.state.service
        metrics = state.metrics
        t0 = request.scope.get("genclip.t0", time.perf_counter())
        want_png = prefers_png(request.headers.get("accept"))
        if want_png and heatmap is HeatmapMode.none:
            raise ApiError(406, "not_acceptable", "Accept: image/png needs a heatmap (heatmap=png or overlay)")
        if class_name is not None:
            if has_control_characters(class_name):
                raise ApiError(422, "validation_error", "class_name: control characters are not allowed")
            class_name = " ".join(class_name.split()) or None
        try:
            client = {"part_id": clean_text_field("part_id", part_id, PART_ID_MAX_LENGTH),
                      "station": clean_text_field("station", station, STATION_MAX_LENGTH)}
        except FieldRejected as exc:
            raise ApiError(422, "validation_error", str(exc)) from exc
        view: ProductView | None = None
        if product is not None:
            assert state.products is not None
            try:
                view = await state.products.resolve(product)
            except ProductNotFound:
                raise ApiError(404, "product_not_found",
                               f"unknown product {product!r}: register it with PUT /products/{product}") from None
            except DatabaseUnavailable as exc:
                raise ApiError(503, "database_unavailable", str(exc), retry_after_ms=retry_after_ms) from None
            if class_name is not None and class_name.casefold() != view.class_name.casefold():
                raise ApiError(422, "validation_error",
                               f"class_name {class_name!r} differs from product {product!r}'s class name "
                               f"{view.class_name!r}: send only the product")
            class_name = view.class_name
        data = await image.read()
        try:
            check_part_content_type(image.content_type)
            if len(data) > settings.max_upload_bytes:
                raise ImageRejected(413, "payload_too_large",
                                    f"image file is {len(data)} bytes, the limit is {settings.max_upload_bytes}")
            decoded = await state.run_cpu(
                decode_image, data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels,
                max_decoded_bytes=settings.max_decoded_bytes, reserve=state.decoded_budget.reserver(request.scope),
            )
        except ImageRejected as exc:
            raise ApiError(exc.status, exc.code, exc.message, retry_after_ms=exc.retry_after_ms) from exc
        finally:
            await image.close()

        # the deadline runs from the request's arrival: time spent uploading and decoding counts
        arrived = request.scope.get("genclip.t0_wall", time.time())
        job = Job(id=uuid.uuid4().hex, class_name=class_name,
                  deadline=arrived + settings.job_timeout_s, image=decoded.image,
                  product=view.job_ref() if view is not None else None)
        if job.expired():
            raise ApiError(504, "deadline_exceeded",
                           f"the request's deadline ({settings.job_timeout_s:g} s) passed before queueing",
                           job_id=job.id)
        pending = await state.admission.submit(job, file_bytes=data)  # ApiError 503 when refused
        original = data if state.recorder.wants_original else None  # kept in the record
        del data
        try:
            result = await pending.result(timeout=job.deadline - time.time())
        except TimeoutError:
            pending.cancel()
            raise ApiError(504, "deadline_exceeded",
                           f"no result within the job deadline ({settings.job_timeout_s:g} s)",
                           job_id=job.id) from None
        except QueueError as exc:  # job lost with the queue, worker dead and none left, Redis down
            metrics.rejections.labels(exc.reason).inc()
            raise ApiError(503, exc.reason, str(exc), retry_after_ms=retry_after_ms, job_id=job.id) from exc
        except MalformedResult as exc:
            raise ApiError(502, "bad_result", str(exc), job_id=job.id) from exc
        except asyncio.CancelledError:  # client went away
            pending.cancel()
            raise
        if not result.ok:
            status = ERROR_STATUS.get(result.error or "", 500)
            raise ApiError(status, result.error or "inference_failed", result.message, job_id=job.id)
        if result.job_id != job.id or (result.anomaly_map is not None and
                                       result.anomaly_map.shape != (decoded.height, decoded.width)):
            raise ApiError(502, "bad_result",
                           f"the worker's result does not fit job {job.id} (job id {result.job_id!r}, map shape "
                           f"{getattr(result.anomaly_map, 'shape', None)} for a {decoded.width}x{decoded.height} image)",
                           job_id=job.id)
        thresholds: Thresholds = request.app.state.thresholds
        policy = decision_policy(view, thresholds, class_name, result.class_label, settings.default_pixel_threshold)
        response, answer = await _respond(state, settings, policy, view, job, result, decoded.image, heatmap, mask,
                                          want_png, t0)
        state.recorder.record(job, result, answer, image=decoded.image, original=original,
                              product_version=view.version if view is not None else None, **client)
        return response

    return router


async def _respond(state: ServiceState, settings: Settings, policy: DecisionPolicy, view: ProductView | None,
                   job: Job, result: JobResult, image: Any, mode: HeatmapMode, want_mask: bool, want_png: bool,
                   t0: float) -> tuple[Response, dict[str, Any]]:
    """The response, and the answer's fields (the JSON body, heatmap aside) for the record."""
    threshold = policy.threshold
    defects: list[dict] = []
    mask_png: bytes | None = None
    if result.anomaly_map is not None:
        defects = await state.run_cpu(find_defects, result.anomaly_map, policy.pixel_threshold,
                                      settings.defect_min_area_px, settings.max_defects)
        if want_mask:
            mask_png = await state.run_cpu(heatmap_mod.mask_png, result.anomaly_map, policy.pixel_threshold)
    png: bytes | None = None
    if mode is not HeatmapMode.none and result.anomaly_map is not None:
        r0 = time.perf_counter()
        if mode is HeatmapMode.overlay:
            png = await state.run_cpu(heatmap_mod.overlay_png, result.anomaly_map, image)
        else:
            png = await state.run_cpu(heatmap_mod.heatmap_png, result.anomaly_map)
        state.metrics.heatmap_render.observe(time.perf_counter() - r0)
    identity = result.identity
    total_ms = (time.perf_counter() - t0) * 1000.0
    timing = TimingMs(queue=round(result.queue_ms, 3), model=round(result.model_ms, 3),
                      total=round(total_ms, 3))
    is_anomalous = result.score >= threshold
    if want_png:
        if png is None:
            raise ApiError(500, "internal_error", "the worker returned no anomaly map", job_id=job.id)
        headers = {
            "X-Anomaly-Id": job.id,
            "X-Anomaly-Score": repr(result.score),
            "X-Anomaly-Is-Anomalous": "true" if is_anomalous else "false",
            "X-Anomaly-Threshold": repr(threshold),
            "X-Anomaly-Threshold-Source": policy.threshold_source,
            "X-Anomaly-Pixel-Threshold": repr(policy.pixel_threshold),
            "X-Anomaly-Defects": str(len(defects)),
            "X-Anomaly-Class-Label": _header_text(result.class_label),
            "X-Anomaly-Detector": str(identity.get("name", "")),
            "X-Anomaly-Backbone": str(identity.get("backbone", "")),
            "X-Anomaly-Runtime": str(identity.get("runtime", "")),
            "X-Anomaly-Precision": str(identity.get("precision", "")),
            "X-Anomaly-Checkpoint": str(identity.get("checkpoint") or ""),
            "X-Anomaly-Timing-Queue-Ms": f"{timing.queue:.3f}",
            "X-Anomaly-Timing-Model-Ms": f"{timing.model:.3f}",
            "X-Anomaly-Timing-Total-Ms": f"{timing.total:.3f}",
            "X-Worker-Id": result.worker,
        }
        if job.class_name is not None:
            headers["X-Anomaly-Class-Name"] = _header_text(job.class_name)
        if view is not None:
            headers["X-Anomaly-Product"] = view.name
        if result.reference_version is not None:
            headers["X-Anomaly-Reference-Version"] = str(result.reference_version)
        if result.component_scores:
            headers["X-Anomaly-Component-Scores"] = ",".join(
                f"{_header_text(k)}={v!r}" for k, v in result.component_scores.items()
            )
    body: dict[str, Any] = {
        "id": job.id,
        "score": result.score,
        "is_anomalous": is_anomalous,
        "threshold": threshold,
        "threshold_source": policy.threshold_source,
        "product": view.name if view is not None else None,
        "reference_version": result.reference_version,
        "pixel_threshold": policy.pixel_threshold,
        "defects": defects,
        "class_label": result.class_label,
        "class_name": job.class_name,
        "heatmap_png": None,
        "detector": identity.get("name", ""),
        "backbone": identity.get("backbone", ""),
        "runtime": identity.get("runtime", ""),
        "precision": identity.get("precision", ""),
        "checkpoint": identity.get("checkpoint"),
        "timing_ms": timing.model_dump(),
    }
    if mask_png is not None:
        body["mask_png"] = base64.b64encode(mask_png).decode("ascii")
    if result.component_scores:
        body["component_scores"] = result.component_scores
    if want_png:
        return Response(png, media_type="image/png", headers=headers), body
    answer = dict(body)
    body["heatmap_png"] = base64.b64encode(png).decode("ascii") if png is not None else None
    return JSONResponse(body, headers={"X-Worker-Id": result.worker}), answer
