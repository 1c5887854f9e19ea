"""The review page at ``/ui``: server-rendered Jinja2 templates plus one small script.

Pages (all HTML, none in the OpenAPI schema):

* ``/ui`` - the live list of the latest inspections (overlay thumbnails, decisions), filters,
  and a form to inspect a photo; ``app.js`` polls ``/ui/partials/inspections`` every 2 s and
  inserts what is new, without a reload;
* ``/ui/inspections/{id}`` - one inspection: image, heatmap overlay with an opacity slider,
  defect boxes, score against threshold, model identity, timings, review buttons, history;
* ``/ui/products`` - registered (and recorded) products, a form to register one and to
  upload its good photos (through the products API);
* ``/ui/products/{name}`` - a product's statistics: score histogram with the threshold line,
  daily drift against the calibration median, review outcomes;
* ``/ui/login`` - only when API keys are configured: stores the key in a cookie.

Assets are served from the package (``/ui/static``): no CDN, works offline, no build step.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from pathlib import Path as FsPath
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import select

from service.auth import ApiKeyAuth
from service.db.base import utcnow
from service.db.inspections import InspectionRecord
from service.db.products import NAME_PATTERN, Product
from service.errors import ApiError
from service.records import queries
from service.records.charts import drift_chart, histogram_chart
from service.records.queries import InspectionFilter
from service.records.schemas import InspectionDetail, InspectionOut
from service.records.stats import product_stats
from service.routers.db_access import run_db
from service.routers.inspections import inspection_filter
from service.settings import Settings

PACKAGE = FsPath(__file__).resolve().parents[1]
TEMPLATES_DIR = PACKAGE / "templates"
STATIC_DIR = PACKAGE / "static" / "ui"
LIVE_PAGE = 48
RECORD_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
PRODUCT_NAME = re.compile(NAME_PATTERN)
POLL_MS = 2000

templates = Jinja2Templates(directory=str(TEMPLATES_DIR))
def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


templates.env.filters["score"] = lambda v: f"{v:.3f}" if _number(v) else "-"
templates.env.filters["pct"] = lambda v: f"{100 * v:.1f} %" if _number(v) else "-"
templates.env.filters["iso"] = lambda v: "" if v is None else queries.as_utc(v).isoformat()
templates.env.filters["short"] = lambda v, n=12: "" if not v else (v if len(v) <= n else v[:n] + "...")
templates.env.filters["tojson_compact"] = lambda v: json.dumps(v, separators=(",", ":"), default=str)


def mount_static(app: FastAPI) -> None:
    app.mount("/ui/static", StaticFiles(directory=str(STATIC_DIR)), name="ui-static")


def _html_error(request: Request, status: int, title: str, message: str) -> HTMLResponse:
    return templates.TemplateResponse(request, "ui/error.html", {"title": title, "message": message},
                                      status_code=status)


def build_router(settings: Settings, auth: ApiKeyAuth) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    def signed_in(request: Request) -> bool:
        return auth.check_headers(request.headers) is None

    def login_redirect(request: Request) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/ui/login?next={quote(target, safe='')}", status_code=303)

    async def page(request: Request, work, render) -> Response:
        """Run ``work`` on the database and ``render`` its result; HTML errors for the browser."""
        if not signed_in(request):
            return login_redirect(request)
        try:
            data = await run_db(request, work)
        except ApiError as exc:
            return _html_error(request, exc.status_code, "Database unavailable", str(exc.detail))
        return render(data)

    def filters_of(request: Request) -> InspectionFilter | HTMLResponse:
        params = request.query_params
        raw = {k: (params.get(k) or None) for k in ("product", "station", "part_id", "decision", "verdict")}
        try:
            if raw["decision"] not in (None, "anomalous", "good") or raw["verdict"] not in (None, "defect", "good"):
                raise ValueError("decision is anomalous or good; verdict is defect or good")
            for key, longest in (("product", 64), ("station", 64), ("part_id", 128)):
                if raw[key] is not None and len(raw[key]) > longest:
                    raise ValueError(f"{key}: at most {longest} characters")
            return inspection_filter(
                **raw,
                since=_dt(params.get("since")), until=_dt(params.get("until")),
                min_score=_float(params.get("min_score")), max_score=_float(params.get("max_score")),
                reviewed={"true": True, "false": False}.get(params.get("reviewed") or ""),
            )
        except (ApiError, ValueError) as exc:
            return _html_error(request, 422, "Bad filter", str(getattr(exc, "detail", exc)))

    def base_context(request: Request, **extra: Any) -> dict[str, Any]:
        return {"auth_enabled": auth.enabled, "nav": request.url.path, **extra}

    # ------------------------------------------------------------------ live list
    @router.get("/ui", response_class=HTMLResponse)
    async def live(request: Request) -> Response:
        flt = filters_of(request)
        if isinstance(flt, HTMLResponse):
            return flt

        def work(session):
            rows, cursor = queries.list_page(session, flt, LIVE_PAGE)
            registered = list(session.scalars(select(Product.name).order_by(Product.name)))
            return {
                "items": [InspectionOut.of(r) for r in rows], "next_cursor": cursor,
                "products": sorted(set(queries.distinct_values(session, InspectionRecord.product)) | set(registered)),
                "registered": registered,
                "stations": queries.distinct_values(session, InspectionRecord.station),
            }

        def render(data):
            query = urlencode(flt.query_params())
            return templates.TemplateResponse(request, "ui/live.html", base_context(
                request, **data, filters=flt, query=query, poll_ms=POLL_MS))

        return await page(request, work, render)

    @router.get("/ui/partials/inspections", response_class=HTMLResponse)
    async def live_partial(request: Request) -> Response:
        if not signed_in(request):
            return Response(status_code=401)
        flt = filters_of(request)
        if isinstance(flt, HTMLResponse):
            return flt
        cursor = request.query_params.get("cursor") or None
        try:
            if cursor:
                queries.decode_cursor(cursor)
        except queries.CursorError as exc:
            return _html_error(request, 422, "Bad cursor", str(exc))
        try:
            rows, next_cursor = await run_db(request, lambda s: queries.list_page(s, flt, LIVE_PAGE, cursor))
        except ApiError as exc:
            return Response(str(exc.detail), status_code=exc.status_code)
        response = templates.TemplateResponse(request, "ui/_cards.html",
                                              {"items": [InspectionOut.of(r) for r in rows]})
        if next_cursor:
            response.headers["X-Next-Cursor"] = next_cursor
        return response

    # ------------------------------------------------------------------ one inspection
    @router.get("/ui/inspections/{record_id}", response_class=HTMLResponse)
    async def detail(request: Request, record_id: str) -> Response:
        if not signed_in(request):
            return login_redirect(request)
        if not RECORD_ID.fullmatch(record_id):
            return _html_error(request, 404, "Not found", "No such inspection record.")
        recorder = request.app.state.service.recorder
        if recorder.is_pending(record_id):
            await recorder.flush(2.0)

        def work(session):
            record = queries.get_record(session, record_id)
            return None if record is None else InspectionDetail.with_reviews(record, queries.get_reviews(session, record_id))

        def render(item):
            if item is None:
                return _html_error(request, 404, "Not found", f"No inspection record {record_id!r}.")
            return templates.TemplateResponse(request, "ui/detail.html", base_context(request, item=item))

        return await page(request, work, render)

    # ------------------------------------------------------------------ products
    @router.get("/ui/products", response_class=HTMLResponse)
    async def products(request: Request) -> Response:
        def work(session):
            registered = list(session.scalars(select(Product).order_by(Product.name)))
            recorded = queries.distinct_values(session, InspectionRecord.product)
            names = {p.name for p in registered}
            return {"registered": registered, "unregistered": [n for n in recorded if n not in names]}

        def render(data):
            return templates.TemplateResponse(request, "ui/products.html", base_context(request, **data))

        return await page(request, work, render)

    @router.get("/ui/products/{name}", response_class=HTMLResponse)
    async def product_page(request: Request, name: str) -> Response:
        if not PRODUCT_NAME.fullmatch(name):
            return _html_error(request, 404, "Not found", "No such product.")
        try:
            days = min(366, max(1, int(request.query_params.get("days") or 30)))
        except ValueError:
            days = 30
        now = utcnow()

        def work(session):
            product = session.scalar(select(Product).where(Product.name == name))
            stats = product_stats(session, name, now - timedelta(days=days), now, now,
                                  settings.drift_limit, settings.drift_min_samples)
            return product, stats

        def render(data):
            product, stats = data
            if stats is None:
                return _html_error(request, 404, "Not found", f"No product {name!r} registered or recorded.")
            return templates.TemplateResponse(request, "ui/product.html", base_context(
                request, product=product, stats=stats, days=days, histogram=histogram_chart(stats),
                drift=drift_chart(stats), name=name))

        return await page(request, work, render)

    # ------------------------------------------------------------------ sign-in
    @router.get("/ui/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        target = request.query_params.get("next") or "/ui"
        if not target.startswith("/ui") or target.startswith("//"):
            target = "/ui"
        return templates.TemplateResponse(request, "ui/login.html", base_context(
            request, target=target, auth_enabled=auth.enabled))

    return router


def _dt(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _float(text: str | None) -> float | None:
    if not text:
        return None
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError("scores are between 0 and 1")
    return value
