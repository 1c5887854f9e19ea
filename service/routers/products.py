"""The product resource: register a product, teach it from good photos, read its calibration.

* ``PUT /products/{name}`` - create or change settings (a change that calibration depends on
  queues a rebuild when the product has photos)
* ``GET /products``, ``GET /products/{name}`` - settings + calibration report + reference
* ``DELETE /products/{name}`` - the product, its photos and reference
* ``POST /products/{name}/good`` - add good photos (one transaction: all stored or none),
  rebuild the reference and recalibrate through the worker queue; answers with the report
* ``POST /products/{name}/calibrate`` - rebuild now (e.g. after changing the detector)

No ``from __future__ import annotations``: FastAPI reads these annotations at runtime.
"""

from typing import Annotated

from fastapi import APIRouter, Depends, File, Path, Request, UploadFile
from fastapi import status as http
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import IntegrityError

from service.auth import ApiKeyAuth
from service.db.database import Database
from service.db.products import NAME_PATTERN
from service.errors import ApiError
from service.image_input import ImageRejected, check_part_content_type, decode_image
from service.limits import RequestLeases
from service.products import repository
from service.products.models import GoodPhotosResult, ProductList, ProductOut, ProductSettings
from service.products.rebuilds import RebuildOutcome, queue_rebuild
from service.products.repository import GoodImage, ProductNotFound
from service.queue.base import ERROR_STATUS, QueueError
from service.schemas import ERROR_RESPONSES, ErrorResponse
from service.settings import Settings
from service.state import ServiceState

NamePath = Annotated[str, Path(pattern=NAME_PATTERN, description=f"Product name: `{NAME_PATTERN}`.")]
_ERRORS = {code: ERROR_RESPONSES[code] for code in (401, 422, 503)}
_NOT_FOUND = {404: {"model": ErrorResponse, "description": "No product of that name."}}


def _out(session, name: str) -> ProductOut:  # type: ignore[no-untyped-def]
    product = repository.get_product(session, name)
    count = repository.image_counts(session, [product.id]).get(product.id, 0)
    return ProductOut.of(product, count, repository.reference_of(session, product.id))


def _not_found(exc: ProductNotFound) -> ApiError:
    return ApiError(404, "product_not_found", f"unknown product {exc.name!r}: create it with PUT /products/{exc.name}")


def build_router(settings: Settings, auth: ApiKeyAuth) -> APIRouter:
    router = APIRouter(prefix="/products", tags=["products"],
                       dependencies=[Depends(auth.dependency())] if auth.enabled else [])
    retry_after_ms = settings.retry_after_s * 1000

    def database(request: Request) -> Database:
        state: ServiceState = request.app.state.service
        assert state.database is not None
        return state.database

    async def rebuild(request: Request, name: str, wait_s: float) -> RebuildOutcome:
        state: ServiceState = request.app.state.service
        assert state.queue is not None and state.products is not None
        try:
            outcome = await queue_rebuild(state.queue, database(request), name,
                                          job_timeout_s=settings.calibration_job_timeout_s, wait_s=wait_s)
        except QueueError as exc:
            state.metrics.rejections.labels(exc.reason).inc()
            raise ApiError(503, exc.reason, f"the photos and settings are stored, but no rebuild could be queued "
                           f"({exc}); retry with POST /products/{name}/calibrate",
                           retry_after_ms=getattr(exc, "retry_after_ms", None) or retry_after_ms) from exc
        finally:
            state.products.forget(name)
        result = outcome.result
        if result is not None and not result.ok:
            status = ERROR_STATUS.get(result.error or "", 500)
            raise ApiError(status, result.error or "calibration_failed", result.message, job_id=outcome.job_id)
        return outcome

    @router.put("/{name}", response_model=ProductOut, status_code=http.HTTP_200_OK,
                responses={201: {"model": ProductOut, "description": "Created."}, **_ERRORS},
                summary="Create a product or change its settings")
    async def put_product(request: Request, name: NamePath, body: ProductSettings | None = None) -> Response:
        changes = body.changes() if body is not None else {}
        _, created, recalibrate = await database(request).run(lambda s: repository.upsert_product(s, name, changes))
        request.app.state.service.products.forget(name)
        if recalibrate:
            await rebuild(request, name, wait_s=0.0)
        out = await database(request).run(lambda s: _out(s, name))
        return JSONResponse(out.model_dump(mode="json"), status_code=201 if created else 200)

    @router.get("", response_model=ProductList, responses={401: ERROR_RESPONSES[401]}, summary="All products")
    async def list_products(request: Request) -> ProductList:
        def work(session) -> ProductList:  # type: ignore[no-untyped-def]
            products = repository.list_products(session)
            counts = repository.image_counts(session)
            return ProductList(products=[
                ProductOut.of(p, counts.get(p.id, 0), repository.reference_of(session, p.id)) for p in products
            ])

        return await database(request).run(work)

    @router.get("/{name}", response_model=ProductOut, responses={**_NOT_FOUND, **_ERRORS},
                summary="A product's settings, calibration report and reference")
    async def get_product(request: Request, name: NamePath) -> ProductOut:
        try:
            return await database(request).run(lambda s: _out(s, name))
        except ProductNotFound as exc:
            raise _not_found(exc) from None

    @router.delete("/{name}", status_code=204, response_class=Response, responses={**_NOT_FOUND, **_ERRORS},
                   summary="Delete a product with its photos and reference")
    async def delete_product(request: Request, name: NamePath) -> Response:
        try:
            await database(request).run(lambda s: repository.delete_product(s, name))
        except ProductNotFound as exc:
            raise _not_found(exc) from None
        request.app.state.service.products.forget(name)
        return Response(status_code=204)

    async def _respond(request: Request, name: str, outcome: RebuildOutcome, added: int, duplicates: int) -> Response:
        product = await database(request).run(lambda s: _out(s, name))
        body = GoodPhotosResult(product=product, added=added, duplicates=duplicates,
                                calibrated=outcome.result is not None)
        status = 200 if outcome.result is not None else 202
        headers = {"Location": f"/products/{name}"} if status == 202 else None
        return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)

    @router.post(
        "/{name}/good", response_model=GoodPhotosResult,
        responses={
            202: {"model": GoodPhotosResult, "description": "Photos stored; calibration still running."},
            **_NOT_FOUND,
            409: {"model": ErrorResponse, "description": "Another upload changed the same photos at the same time: retry."},
            413: ERROR_RESPONSES[413], 415: ERROR_RESPONSES[415], 500: ERROR_RESPONSES[500], **_ERRORS,
        },
        summary="Add good photos, rebuild the reference and recalibrate",
    )
    async def add_good_photos(
        request: Request,
        name: NamePath,
        images: Annotated[list[UploadFile], File(description="One or many photos of good parts (JPEG, PNG, BMP, TIFF).",
                                                 json_schema_extra={"minItems": 1})],
    ) -> Response:
        state: ServiceState = request.app.state.service
        if len(images) > settings.max_good_images_per_upload:
            raise ApiError(413, "too_many_files",
                           f"{len(images)} files, at most {settings.max_good_images_per_upload} per upload")
        try:
            await database(request).run(lambda s: repository.get_product(s, name))
        except ProductNotFound as exc:
            raise _not_found(exc) from None
        good: list[GoodImage] = []
        for upload in images:
            label = upload.filename or f"file {len(good) + 1}"
            try:
                check_part_content_type(upload.content_type)
                data = await upload.read(settings.max_upload_bytes + 1)
                if len(data) > settings.max_upload_bytes:
                    raise ImageRejected(413, "payload_too_large", f"over the limit of {settings.max_upload_bytes} bytes")
                leases = RequestLeases()  # the decoded photo is dropped once validated
                try:
                    decoded = await state.run_cpu(
                        decode_image, data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_image_pixels,
                        max_decoded_bytes=settings.max_decoded_bytes, reserve=state.decoded_budget.reserver_for(leases),
                    )
                finally:
                    leases.close()
            except ImageRejected as exc:
                raise ApiError(exc.status, exc.code, f"{label}: {exc.message}; nothing from this upload was stored",
                               retry_after_ms=exc.retry_after_ms) from exc
            finally:
                await upload.close()
            good.append(GoodImage(label, decoded.format, decoded.width, decoded.height, data))
            del decoded
        try:
            _, added, duplicates = await database(request).run(lambda s: repository.add_images(s, name, good))
        except ProductNotFound as exc:
            raise _not_found(exc) from None
        except IntegrityError as exc:  # the same photo stored by a concurrent upload: retry once
            try:
                _, added, duplicates = await database(request).run(lambda s: repository.add_images(s, name, good))
            except IntegrityError:
                raise ApiError(409, "conflict", "a concurrent upload stored the same photos; retry") from exc
        if added == 0:  # every photo was already stored: the calibration stands
            return await _respond_unchanged(request, name, duplicates)
        outcome = await rebuild(request, name, wait_s=settings.calibration_wait_s)
        return await _respond(request, name, outcome, added, duplicates)

    async def _respond_unchanged(request: Request, name: str, duplicates: int) -> Response:
        product = await database(request).run(lambda s: _out(s, name))
        body = GoodPhotosResult(product=product, added=0, duplicates=duplicates,
                                calibrated=product.calibration_status == "ready")
        return JSONResponse(body.model_dump(mode="json"))

    @router.post(
        "/{name}/calibrate", response_model=GoodPhotosResult,
        responses={202: {"model": GoodPhotosResult, "description": "Calibration still running."},
                   **_NOT_FOUND, 409: {"model": ErrorResponse, "description": "The reference does not fit the worker."},
                   500: ERROR_RESPONSES[500], **_ERRORS},
        summary="Rebuild the reference and recalibrate from the stored photos",
    )
    async def calibrate(request: Request, name: NamePath) -> Response:
        try:
            outcome = await rebuild(request, name, wait_s=settings.calibration_wait_s)
        except ProductNotFound as exc:
            raise _not_found(exc) from None
        return await _respond(request, name, outcome, 0, 0)

    return router

