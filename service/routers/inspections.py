"""The inspection records resource: list (filters, cursor pages), CSV export, one record, its
kept image and heatmap, and reviews.

``GET /inspections``, ``GET /inspections.csv``, ``GET /inspections/{id}``,
``GET /inspections/{id}/image``, ``GET /inspections/{id}/heatmap``,
``POST /inspections/{id}/review``. A record answered a moment ago may still wait in the
recorder's buffer: reading or reviewing it flushes the buffer first (up to 2 s).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import FileResponse, StreamingResponse

from service.auth import ApiKeyAuth
from service.db.base import utcnow
from service.db.inspections import ID_LENGTH, PART_ID_MAX_LENGTH, STATION_MAX_LENGTH, InspectionRecord
from service.errors import ApiError
from service.query_types import NO_CONTROL_CHARACTERS, IsoDateTime, has_control_characters
from service.records import queries
from service.records.media import MEDIA_TYPES
from service.records.queries import CursorError, InspectionFilter
from service.records.schemas import InspectionDetail, InspectionOut, InspectionPage, ReviewIn
from service.routers.db_access import run_db
from service.schemas import ErrorResponse
from service.settings import Settings

log = logging.getLogger(__name__)

PAGE_DEFAULT, PAGE_MAX = 50, 500
CSV_PAGE = 1000
PENDING_FLUSH_S = 2.0


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "The body is not valid JSON.",
        401: "API keys are configured and the key is missing or wrong.",
        404: "No such inspection record (or, for images, none kept; for a cursor, no such page).",
        422: "Bad query parameters, path or body.",
        500: "Unexpected error.",
        503: "The database is unavailable; see Retry-After.",
    }
    return {code: {"model": ErrorResponse, "description": text[code]} for code in codes}


def inspection_filter(
    product: Annotated[str | None, Query(max_length=64, pattern=NO_CONTROL_CHARACTERS,
                                         description="Registered product name.")] = None,
    station: Annotated[str | None, Query(max_length=STATION_MAX_LENGTH, pattern=NO_CONTROL_CHARACTERS)] = None,
    part_id: Annotated[str | None, Query(max_length=PART_ID_MAX_LENGTH, pattern=NO_CONTROL_CHARACTERS)] = None,
    since: Annotated[IsoDateTime | None, Query(description="From this time on (ISO 8601; UTC if no offset).")] = None,
    until: Annotated[IsoDateTime | None, Query(description="Before this time (ISO 8601; UTC if no offset).")] = None,
    decision: Annotated[Literal["anomalous", "good"] | None, Query()] = None,
    min_score: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
    max_score: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
    reviewed: Annotated[bool | None, Query(description="Only reviewed (true) or not reviewed (false) ones.")] = None,
    verdict: Annotated[Literal["defect", "good"] | None, Query(description="Only this review verdict.")] = None,
) -> InspectionFilter:
    for name, value in (("product", product), ("station", station), ("part_id", part_id)):
        if value is not None and has_control_characters(value):
            raise ApiError(422, "validation_error", f"{name}: control characters are not allowed")
    try:
        since, until = queries.as_utc(since), queries.as_utc(until)
    except OverflowError as exc:
        raise ApiError(422, "validation_error", "since / until: out of range") from exc
    return InspectionFilter(product=product, station=station, part_id=part_id, since=since,
                            until=until, decision=decision, min_score=min_score,
                            max_score=max_score, reviewed=reviewed, verdict=verdict)


RecordId = Annotated[str, Path(min_length=1, max_length=ID_LENGTH, pattern=r"^[A-Za-z0-9_-]+$",
                                description="The inspection's id (the `/inspect` answer's `id`).")]
Filters = Annotated[InspectionFilter, Depends(inspection_filter)]


async def load_record(request: Request, record_id: str) -> tuple[InspectionRecord, list]:
    """The record and its reviews; 404 when unknown. Flushes the recorder if it holds the id."""
    recorder = request.app.state.service.recorder
    if recorder.is_pending(record_id):
        await recorder.flush(PENDING_FLUSH_S)

    def work(session):
        record = queries.get_record(session, record_id)
        return (record, queries.get_reviews(session, record_id)) if record is not None else None

    found = await run_db(request, work)
    if found is None:
        raise ApiError(404, "not_found", f"no inspection record {record_id!r}")
    return found


def build_router(settings: Settings, auth: ApiKeyAuth) -> APIRouter:
    router = APIRouter(tags=["inspections"], dependencies=[Depends(auth.dependency())] if auth.enabled else [])
    auth_codes = (401,) if auth.enabled else ()

    @router.get("/inspections", response_model=InspectionPage, summary="List inspection records, newest first",
                responses=_errors(*auth_codes, 404, 422, 500, 503))
    async def list_inspections(
        request: Request,
        filters: Filters,
        limit: Annotated[int, Query(ge=1, le=PAGE_MAX, description="Records per page.")] = PAGE_DEFAULT,
        cursor: Annotated[str | None, Query(max_length=200, pattern=r"^[A-Za-z0-9_-]+$",
                                            description="`next_cursor` of the previous page.")] = None,
    ) -> InspectionPage:
        try:
            if cursor:
                queries.decode_cursor(cursor)
        except CursorError as exc:  # well-formed, but no page of ours: the page it names does not exist
            raise ApiError(404, "cursor_not_found", f"{exc}: start again without a cursor") from exc
        rows, next_cursor = await run_db(request, lambda s: queries.list_page(s, filters, limit, cursor))
        return InspectionPage(items=[InspectionOut.of(r) for r in rows], next_cursor=next_cursor)

    @router.get("/inspections.csv", summary="Export the records of a query as CSV",
                response_class=StreamingResponse,
                responses={200: {"content": {"text/csv": {"schema": {"type": "string"}}},
                                 "description": "One row per record, newest first."},
                           **_errors(*auth_codes, 422, 500, 503)})
    async def export_csv(
        request: Request,
        filters: Filters,
        limit: Annotated[int | None, Query(ge=1, le=10_000_000, description="At most this many rows.")] = None,
    ) -> StreamingResponse:
        first, cursor = await run_db(request, lambda s: queries.list_page(s, filters, CSV_PAGE))

        async def rows() -> AsyncIterator[str]:
            buf = io.StringIO()
            writer = csv.writer(buf)
            writer.writerow(queries.CSV_COLUMNS)
            page, next_cursor, sent = first, cursor, 0
            while True:
                for record in page:
                    if limit is not None and sent >= limit:
                        break
                    writer.writerow(queries.csv_row(record))
                    sent += 1
                yield buf.getvalue()
                buf.seek(0)
                buf.truncate()
                if next_cursor is None or (limit is not None and sent >= limit):
                    return
                try:
                    page, next_cursor = await run_db(
                        request, lambda s, c=next_cursor: queries.list_page(s, filters, CSV_PAGE, c))
                except ApiError:
                    log.warning("CSV export cut short after %d rows: database unavailable", sent)
                    return

        stamp = utcnow().strftime("%Y%m%dT%H%M%SZ")
        return StreamingResponse(rows(), media_type="text/csv; charset=utf-8",
                                 headers={"Content-Disposition": f'attachment; filename="inspections-{stamp}.csv"'})

    @router.get("/inspections/{record_id}", response_model=InspectionDetail, summary="One inspection record",
                responses=_errors(*auth_codes, 404, 422, 500, 503))
    async def get_inspection(request: Request, record_id: RecordId) -> InspectionDetail:
        record, reviews = await load_record(request, record_id)
        return InspectionDetail.with_reviews(record, reviews)

    def media_route(kind: str, thumb_key: str, full_key: str, what: str):
        async def serve(
            request: Request,
            record_id: RecordId,
            size: Annotated[Literal["auto", "thumb", "full"], Query(
                description="`thumb`: the thumbnail; `full`: the original (if kept); `auto`: full if kept, "
                "else thumb.")] = "auto",
        ) -> FileResponse:
            record, _ = await load_record(request, record_id)
            media = record.media or {}
            keys = {"thumb": [thumb_key], "full": [full_key], "auto": [full_key, thumb_key]}[size]
            store = request.app.state.service.recorder.media
            for key in keys:
                path = store.path(media.get(key)) if store is not None else None
                if path is not None:
                    return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"),
                                        headers={"Cache-Control": "private, max-age=86400"})
            raise ApiError(404, "not_retained", f"no {what} kept for inspection {record_id!r} "
                           f"(size={size}; see GENCLIP_RECORDS_KEEP_IMAGES)")

        serve.__name__ = f"get_inspection_{kind}"
        return serve

    router.add_api_route(
        "/inspections/{record_id}/image", media_route("image", "thumb", "image", "image"), methods=["GET"],
        response_class=FileResponse, summary="The kept image of an inspection (JPEG thumbnail or the original)",
        responses={200: {"content": {"image/jpeg": {}, "image/png": {}}, "description": "The image."},
                   **_errors(*auth_codes, 404, 422, 500, 503)})
    router.add_api_route(
        "/inspections/{record_id}/heatmap", media_route("heatmap", "heatmap", "heatmap-full", "heatmap"),
        methods=["GET"], response_class=FileResponse, summary="The kept heatmap PNG of an inspection",
        responses={200: {"content": {"image/png": {}}, "description": "The heatmap (jet colours, absolute scale)."},
                   **_errors(*auth_codes, 404, 422, 500, 503)})

    @router.post("/inspections/{record_id}/review", response_model=InspectionDetail,
                 summary="Review an inspection: what the part really is",
                 responses=_errors(400, *auth_codes, 404, 422, 500, 503))
    async def review_inspection(request: Request, record_id: RecordId, review: ReviewIn) -> InspectionDetail:
        recorder = request.app.state.service.recorder
        if recorder.is_pending(record_id):
            await recorder.flush(PENDING_FLUSH_S)
        note = " ".join(review.note.split()) if review.note else None
        reviewer = " ".join(review.reviewer.split()) if review.reviewer else None
        done = await run_db(request, lambda s: queries.add_review(s, record_id, review.verdict, note or None,
                                                                    reviewer or None))
        if done is None:
            raise ApiError(404, "not_found", f"no inspection record {record_id!r}")
        record, reviews = done
        return InspectionDetail.with_reviews(record, reviews)

    return router
