"""The review page in a real browser: Playwright drives Debian's headless Chromium against a
real ``genclip serve`` (uvicorn, in-process queue, tiny random backbone: scores are meaningless,
the pipeline is real).

Register a product and upload its good photos through the page; inspect photos through the
page and see each new inspection appear in the live list without a reload, with its heatmap;
open one, move the opacity slider, review it; see the product's statistics change. Screenshots go to ``test-artifacts/screenshots/`` (gitignored; override with
``GENCLIP_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw
from svc_helpers import ROOT, free_port, subprocess_env, wait_until_ready

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("GENCLIP_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "screenshots"

pytestmark = pytest.mark.slow


def part_photo(path: Path, seed: int, scratch: bool) -> Path:
    """A machined-looking part: a shaded disc on a dark table, optionally a bright scratch."""
    rng = np.random.default_rng(seed)
    w, h = 320, 240
    yy, xx = np.mgrid[0:h, 0:w]
    disc = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) < (0.4 * h) ** 2
    base = 60 + 120 * disc * (1 - 0.3 * (xx / w)) + rng.normal(0, 6, (h, w))
    img = Image.fromarray(np.clip(np.stack([base, base * 0.97, base * 0.92], -1), 0, 255).astype(np.uint8))
    if scratch:
        ImageDraw.Draw(img).line([(130, 90), (190, 140)], fill=(245, 245, 240), width=5)
    img.save(path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ui")
    port = free_port()
    log = open(folder / "serve.log", "w")  # noqa: SIM115
    env = subprocess_env(
        GENCLIP_DETECTOR="baseline", GENCLIP_BACKBONE="tiny-clip-random", GENCLIP_BACKBONE_WEIGHTS="random",
        GENCLIP_DEVICE="cpu", GENCLIP_TORCH_THREADS="1", GENCLIP_RECORDS_FLUSH_MS="50", GENCLIP_LOG_LEVEL="warning",
    )
    proc = subprocess.Popen([sys.executable, "-m", "service.cli_serve", "serve", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    if not wait_until_ready(base, proc):
        proc.kill()
        pytest.fail("genclip serve did not become ready: " + (folder / "serve.log").read_text()[-3000:])
    yield base, env["GENCLIP_DATABASE_URL"], folder
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} missing: bash scripts/setup.sh --test installs it (apt-get install chromium)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def image_loaded(page, selector: str) -> bool:
    return page.eval_on_selector(selector, "img => img.complete && img.naturalWidth > 0")


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def kpi(page, name: str) -> int:
    return int(page.inner_text(f"#kpi-{name}").strip())


def test_register_upload_inspect_review_and_see_the_stats_change(server, browser, tmp_path) -> None:
    from playwright.sync_api import expect

    base, _db, _folder = server
    page = browser.new_page(viewport={"width": 1280, "height": 860})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    # no request leaves the machine: the pages and their assets come from the service only
    outside: list[str] = []
    page.on("request", lambda req: outside.append(req.url) if not req.url.startswith((base, "data:")) else None)

    # ---- register a product and teach it with good photos, through the page
    page.goto(base + "/ui/products")
    page.fill("#product-form input[name=name]", "bearing")
    page.fill("#product-form input[name=class_name]", "bearing")
    page.click("#product-form button[type=submit]")
    expect(page.locator('tr[data-product="bearing"]')).to_be_visible(timeout=15000)
    goods = [str(part_photo(tmp_path / f"good{i}.png", 100 + i, scratch=False)) for i in range(6)]
    page.select_option("#good-form select[name=product]", "bearing")
    page.set_input_files("#good-form input[name=images]", goods)
    page.click("#good-form button[type=submit]")
    expect(page.locator("#good-result")).to_contain_text("6 photo(s) added", timeout=60000)
    expect(page.locator('tr[data-product="bearing"] .status')).to_have_text("ready", timeout=30000)
    product = httpx.get(f"{base}/products/bearing").json()
    assert product["image_count"] == 6 and product["image_threshold"] is not None
    shot(page, "products.png")

    # ---- inspect photos through the live page: they appear without a reload, with heatmaps
    page.goto(base + "/ui")
    expect(page.locator("#empty")).to_be_visible()
    page.evaluate("window.__sameDocument = true")
    photos = [part_photo(tmp_path / f"part{i}.png", i, scratch=(i == 2)) for i in range(3)]
    ids = []
    for i, photo in enumerate(photos):
        page.set_input_files("#inspect-form input[name=image]", str(photo))
        page.select_option("#inspect-form select[name=product]", "bearing")
        page.fill("#inspect-form input[name=part_id]", f"SN-{1000 + i}")
        page.fill("#inspect-form input[name=station]", "line-1/cam-2")
        page.click("#inspect-form button[type=submit]")
        page.wait_for_function("(n) => document.querySelector('#inspect-result').dataset.id && "
                               "document.querySelectorAll('#cards a.card').length >= n", arg=i + 1, timeout=15000)
        ids.append(page.get_attribute("#inspect-result", "data-id"))
        expect(page.locator(f'#cards a.card[data-id="{ids[-1]}"]')).to_be_visible(timeout=15000)
    assert page.evaluate("window.__sameDocument") is True, "the list was reloaded instead of updated"
    order = page.eval_on_selector_all("#cards a.card", "cards => cards.map(c => c.dataset.id)")
    assert order == ids[::-1]
    newest = f'#cards a.card[data-id="{ids[2]}"]'
    page.wait_for_function("(s) => { const i = document.querySelector(s + ' img.heat'); "
                           "return i && i.complete && i.naturalWidth > 0; }", arg=newest)
    assert image_loaded(page, newest + " img.photo")
    expect(page.locator(newest)).to_contain_text("SN-1002")
    expect(page.locator(newest)).to_contain_text("bearing")
    shot(page, "live.png")

    # more of the line's traffic, straight to the API, so the product page has a histogram
    with httpx.Client(base_url=base, timeout=60) as client:
        for i in range(24):
            photo = part_photo(tmp_path / f"more{i}.png", 200 + i, scratch=(i % 6 == 0))
            r = client.post("/inspect?heatmap=none", files={"image": (photo.name, photo.read_bytes(), "image/png")},
                            data={"product": "bearing", "part_id": f"SN-{2000 + i}", "station": "line-1/cam-2"})
            assert r.status_code == 200, r.text

    deadline = time.monotonic() + 15  # the last records may still wait in the recorder's batch
    while len(httpx.get(f"{base}/inspections", params={"product": "bearing", "limit": 100}).json()["items"]) < 27:
        assert time.monotonic() < deadline, "records not written"
        time.sleep(0.1)

    # ---- the product page before the review
    page.goto(base + "/ui/products/bearing")
    expect(page.locator("#kpi-total")).to_have_text("27", timeout=10000)
    before = {name: kpi(page, name) for name in ("reviewed", "false-alarms", "missed", "confirmed")}
    assert before == {"reviewed": 0, "false-alarms": 0, "missed": 0, "confirmed": 0}
    assert page.locator("#histogram rect.bar").count() > 0 and page.locator("#histogram line.threshold").count() == 1
    assert page.locator("#drift-chart circle.point").count() == 1  # one day of good-decided parts
    shot(page, "product.png")

    # ---- the detail view: image, heatmap overlay, opacity slider, score against threshold, identity
    page.goto(base + "/ui")
    page.click(newest)
    page.wait_for_url(f"**/ui/inspections/{ids[2]}")
    page.wait_for_function("() => { const i = document.getElementById('heat'); return i.complete && i.naturalWidth > 0; }")
    assert image_loaded(page, ".viewer img.photo")
    page.locator("#opacity").fill("80")
    assert page.eval_on_selector("#heat", "el => el.style.opacity") == "0.8"
    expect(page.locator("#opacity-value")).to_have_text("80 %")
    side = page.locator(".side")
    expect(side).to_contain_text("tiny-clip-random")
    expect(side).to_contain_text("line-1/cam-2")
    expect(side).to_contain_text("(product)")  # the threshold came from the product's calibration
    decision = page.inner_text(".viewer-panel h1 .badge").strip().lower()
    assert decision in ("anomalous", "good")
    shot(page, "detail.png")

    # ---- review it against the model's decision (the tiny random model's decisions mean nothing)
    verdict = "good" if decision == "anomalous" else "defect"
    page.fill("#review-form textarea[name=note]", "checked under the microscope")
    page.fill("#review-form input[name=reviewer]", "qa-anna")
    page.click(f"#review-form button[value={verdict}]")
    expect(page.locator("#review-state .review")).to_have_text(verdict, timeout=10000)
    expect(page.locator("ol.history")).to_contain_text("qa-anna")
    record = httpx.get(f"{base}/inspections/{ids[2]}").json()
    assert record["review"]["verdict"] == verdict and record["review"]["reviewer"] == "qa-anna"
    assert record["product"] == "bearing" and record["threshold_source"] == "product"

    # ---- the statistics changed
    page.goto(base + "/ui/products/bearing")
    changed = "false-alarms" if decision == "anomalous" else "missed"
    expect(page.locator(f"#kpi-{changed}")).to_have_text(str(before[changed] + 1))
    assert kpi(page, "reviewed") == 1
    stats = httpx.get(f"{base}/products/bearing/stats").json()
    assert stats["reviews"]["false_alarms" if decision == "anomalous" else "missed_defects"] == 1

    # ---- and the live list shows the review, without a reload
    page.goto(base + "/ui")
    expect(page.locator(newest + " .review")).to_have_text(f"reviewed: {verdict}")
    assert not errors, errors
    assert not outside, outside
