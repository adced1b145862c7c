"""The web app in a real browser: Playwright driving Debian's Chromium (`apt-get install chromium`, done by .ci/run)
against the app with the real Predictor and the bundled default model, served on a free loopback port.

Screenshots go to test-artifacts/ (git-ignored) for people to look at.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from conftest import HAM_FULLRES, ROOT, needs_fullres

CHROMIUM = os.environ.get("DERMSIGHT_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
# Flags for a headless browser on a CI box: no sandbox (CI runs as root), no GPU, and no calls home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    needs_fullres,
    pytest.mark.shared_data,
    pytest.mark.slow,
    pytest.mark.skipif(
        not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)),
        reason=f"Chromium not found at {CHROMIUM}: apt-get install chromium (or set DERMSIGHT_CHROMIUM)",
    ),
]

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed: pip install .[dev]")

PHOTO = HAM_FULLRES / "images" / "ISIC_0024306.jpg"  # 600x450 dermoscopy, as a user would upload it


@pytest.fixture(scope="module")
def base_url():
    from werkzeug.serving import make_server

    from dermsight.web import create_app

    # A 2 MB upload limit (the photos are ~300 KB) keeps the too-large test's buffer small.
    app = create_app(None, {"RATE_LIMIT": "off", "THREADS": 1, "MAX_CONTENT_LENGTH": 2 * 2**20})
    app.extensions["dermsight.model"].get()  # load before the browser's first request
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=5)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20_000)
    yield page
    context.close()


def _shot(page, name: str, full_page: bool = True) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=full_page)


def test_upload_a_photo_read_the_result_open_a_condition(page, base_url):
    page.goto(base_url + "/")
    assert "Not a medical device" in page.inner_text("#disclaimer")
    page.set_input_files("#image", str(PHOTO))
    page.wait_for_selector("#preview-figure:not([hidden])")  # the JS preview
    page.click("#submit")
    page.wait_for_url("**/analyse")
    advice = page.inner_text("#advice")
    assert advice.strip()
    if page.locator("#probabilities").count() == 0:  # a real model may refuse a photo; say why
        pytest.fail(f"the model rejected a real HAM10000 photo: {page.inner_text('#reason')}")
    rows = page.locator("#probabilities li")
    assert rows.count() >= 7
    meters = page.locator("#probabilities meter")
    values = [float(meters.nth(i).get_attribute("value")) for i in range(meters.count())]
    assert values == sorted(values, reverse=True) and sum(values) == pytest.approx(1, abs=0.01)
    assert "%" in rows.first.inner_text()
    heatmap = page.locator("#heatmap")
    assert heatmap.get_attribute("src").startswith("data:image/png;base64,")
    assert heatmap.evaluate("img => img.complete && img.naturalWidth > 0")
    assert page.locator(".card").count() >= 1
    _shot(page, "result.png")

    # Reading on opens a tab of its own, so the result (a POST answer, stored nowhere) is still there afterwards.
    name = page.locator(".card h3").first.inner_text()
    page.locator(".card details summary").first.click()
    assert page.locator(".card details").first.evaluate("d => d.open")
    with page.context.expect_page() as opened:
        page.locator(".card a[href^='/conditions/']").first.click()
    info = opened.value
    info.wait_for_load_state()
    assert info.inner_text("h1") == name
    assert "When to see a doctor" in info.inner_text("main")
    assert info.locator(".sources a").count() >= 1
    _shot(info, "condition.png")
    assert page.locator("#advice").count() == 1 and page.locator("#heatmap").count() == 1


def test_a_text_file_named_jpg_gets_a_friendly_error(page, base_url):
    page.goto(base_url + "/")
    page.set_input_files(
        "#image", {"name": "lesion.jpg", "mimeType": "image/jpeg", "buffer": b"this is a text file, not a photo\n"}
    )
    page.click("#submit")
    page.wait_for_selector("#error-message")
    assert page.inner_text("h1") == "This file is not a photo we can read"
    assert "text file" in page.inner_text("#error-message")
    assert "Tips for a photo we can assess" in page.inner_text("main")
    _shot(page, "error.png")


def test_a_too_large_photo_is_stopped_before_it_is_uploaded(page, base_url):
    page.goto(base_url + "/")
    big = b"\xff\xd8\xff" + bytes(2 * 2**20)  # over the 2 MB limit set above
    page.set_input_files("#image", {"name": "big.jpg", "mimeType": "image/jpeg", "buffer": big})
    page.click("#submit")
    page.wait_for_selector("#form-error:not([hidden])")
    assert "larger than the 2 MB limit" in page.inner_text("#form-error")
    assert page.url.endswith("/")  # nothing was sent


def test_core_flow_works_without_javascript(browser, base_url):
    context = browser.new_context(java_script_enabled=False)
    page = context.new_page()
    try:
        page.goto(base_url + "/")
        page.set_input_files("#image", str(PHOTO))
        page.click("#submit")
        page.wait_for_url("**/analyse")
        assert page.locator("#advice").count() == 1
        assert page.locator("#probabilities meter").count() >= 7 or page.locator("#reason").count() == 1
    finally:
        context.close()


def test_phone_layout_and_keyboard(browser, base_url):
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    try:
        page.goto(base_url + "/")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
        assert page.locator("#camera").is_visible()  # camera capture offered on a touch screen
        assert not page.locator(".drag-hint").is_visible()  # a phone cannot drag and drop
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.className") == "skip"
        # Viewport only: a full-page capture re-emulates the screen without touch, which hides the camera input.
        _shot(page, "upload-phone.png", full_page=False)
    finally:
        context.close()
