"""The browser playground (``GET /``) in headless Chromium against a real `imagegate serve` on the demo model.

Needs the Debian ``chromium`` package at /usr/bin/chromium and the ``playwright`` Python package (the dev extra);
no browser is ever downloaded. Screenshots go to ``$IMAGEGATE_ARTIFACTS`` or the test's tmp_path.
"""

from __future__ import annotations

import base64
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from .conftest import Server

pytestmark = pytest.mark.e2e

MODEL = "imagegate-demo"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
PHONES = (PHONE, {"width": 360, "height": 800})
TIMEOUT_MS = 90_000

# Records every data-state change of the tiles under a gallery as "index:state:partials" in window.__states.
RECORD_STATES = """(selector) => {
    window.__states = [];
    new MutationObserver((records) => {
        for (const r of records) {
            if (r.type === "attributes" && r.target.classList.contains("tile")) {
                const t = r.target;
                window.__states.push(`${t.dataset.index}:${t.dataset.state}:${t.dataset.partials}`);
            }
        }
    }).observe(document.querySelector(selector), {subtree: true, attributes: true, attributeFilter: ["data-state"]});
}"""

# Wraps fetch to keep what the page sends as multipart: window.__sent maps each field to its value, or a file
# part to its type, and the mask to a data: URL (Chromium does not expose a FormData body with blobs to Playwright).
CAPTURE_FORM = """() => {
    const original = window.fetch;
    window.fetch = async (url, init) => {
        if (init && init.body instanceof FormData) {
            const sent = {};
            for (const [name, value] of init.body.entries()) {
                sent[name] = typeof value === "string" ? value : value.type;
            }
            sent.mask = await new Promise((resolve) => {
                const reader = new FileReader();
                reader.onload = () => resolve(reader.result);
                reader.readAsDataURL(init.body.get("mask"));
            });
            window.__sent = sent;
        }
        return original(url, init);
    };
}"""


# How wide the page is, and which rendered elements end past the viewport's right edge (hidden panels and a closed
# <details> have no box that counts: checkVisibility() is false for them).
OVERFLOW = """() => {
    const wide = [];
    for (const e of document.body.querySelectorAll("*")) {
        if (!e.checkVisibility()) continue;
        const right = e.getBoundingClientRect().right;
        if (right > window.innerWidth + 0.5) {
            wide.push(`${e.tagName.toLowerCase()}${e.id ? "#" + e.id : ""}${e.className ? "." + e.className : ""}`
                + ` ends at ${Math.round(right)}`);
        }
    }
    return {scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth, wide: wide.slice(0, 8)};
}"""


def metric(server: Server, name: str, **labels: str) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name}{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0  # a labelled counter appears once it is first used


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install the Debian package `chromium` to run the browser tests")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the `playwright` Python package is missing: pip install -e '.[dev]'")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get("IMAGEGATE_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def open_page(browser, server: Server, viewport: dict[str, int], *, settle: bool = False):
    """A loaded page; any console error, failed request or HTTP error while it loads fails the test.

    Chromium fetches /favicon.ico after the load event, once per browser process, and Playwright sees only the
    console error a 404 there logs: ``settle`` waits for the network to go quiet so that such late errors count.
    """
    context = browser.new_context(viewport=viewport)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.page_errors = []  # type: ignore[attr-defined]
    page.on("pageerror", lambda error: page.page_errors.append(str(error)))  # type: ignore[attr-defined]
    problems: list[str] = []

    def console(message) -> None:
        if message.type == "error":
            problems.append(f"console error: {message.text} ({message.location.get('url')})")

    def failed(request) -> None:
        problems.append(f"request failed: {request.method} {request.url}: {request.failure}")

    def response(response) -> None:
        if response.status >= 400:
            problems.append(f"HTTP {response.status}: {response.request.method} {response.url}")

    listeners = {"console": console, "requestfailed": failed, "response": response}
    for event, listener in listeners.items():
        page.on(event, listener)
    page.goto(f"{server.url}/")
    page.wait_for_selector("body[data-models='loaded']")
    if settle:
        page.wait_for_load_state("networkidle")
    for event, listener in listeners.items():  # from here on, errors are the test's business (an HTTP 400 alert)
        page.remove_listener(event, listener)
    assert not problems, f"loading the page logged errors: {problems}"
    assert page.locator("#gen-model option").all_text_contents() == [MODEL]
    return context, page


def assert_fits_phones(page, what: str) -> None:
    """Nothing on the page is wider than a phone's screen, at each width of PHONES; leaves the page at PHONE."""
    for viewport in PHONES:
        page.set_viewport_size(viewport)
        fit = page.evaluate(OVERFLOW)
        assert fit["scrollWidth"] <= fit["innerWidth"] and not fit["wide"], f"{what} at {viewport['width']} px: {fit}"
    page.set_viewport_size(PHONE)


def screenshot(page, artifacts: Path, name: str) -> None:
    path = artifacts / f"browser-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


@pytest.fixture
def page(browser, server) -> Iterator[object]:
    context, page = open_page(browser, server, DESKTOP)
    try:
        yield page
        assert not page.page_errors, f"JavaScript errors: {page.page_errors}"
    finally:
        context.close()


def fill_generate(page, *, size: str, steps: int, partials: int, n: int = 1) -> None:
    page.fill("#gen-prompt", "a red fox in the snow")
    page.fill("#gen-size", size)
    page.fill("#gen-steps", str(steps))
    page.fill("#gen-partials", str(partials))
    page.fill("#gen-n", str(n))
    page.fill("#gen-seed", "7")


def test_generate_streams_partials_then_final(page, artifacts):
    fill_generate(page, size="256x256", steps=30, partials=2)
    page.evaluate(RECORD_STATES, "#gen-gallery")
    page.click("#gen-run")
    page.wait_for_selector("#gen-gallery .tile[data-state='final']")
    states = page.evaluate("window.__states")
    partial = [s for s in states if s.split(":")[1] == "partial"]
    assert partial, f"no partial image was shown before the final one: {states}"
    assert int(partial[0].split(":")[2]) >= 1
    assert states.index(partial[0]) < states.index(next(s for s in states if ":final:" in s)), states
    tile = page.locator("#gen-gallery .tile[data-index='0']")
    assert tile.get_attribute("data-partials") == "2"
    link = tile.locator("a.download")
    assert link.get_attribute("download") == "imagegate-1.png"
    assert link.get_attribute("href").startswith("data:image/png;base64,iVBOR")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Done')")
    assert page.locator("#error").text_content() == ""
    screenshot(page, artifacts, "generate")


def test_cancel_stops_the_job(page, server, artifacts):
    before = metric(server, "imagegate_images_total", model=MODEL, outcome="cancelled")
    # 100 steps with 3 partials: the first comes after step 25, about 75 steps (5+ s) before the job would end.
    fill_generate(page, size="256x256", steps=100, partials=3)
    page.click("#gen-run")
    page.wait_for_selector("#gen-gallery .tile[data-state='partial']")
    page.click("#gen-cancel")
    page.wait_for_function("document.getElementById('status').textContent === 'Cancelled'")
    assert page.locator("#gen-gallery .tile[data-state='final']").count() == 0
    assert page.locator("#gen-run").is_enabled() and page.locator("#gen-cancel").is_disabled()
    screenshot(page, artifacts, "cancelled")
    deadline = time.monotonic() + 30
    while metric(server, "imagegate_images_total", model=MODEL, outcome="cancelled") <= before:
        assert time.monotonic() < deadline, "the server did not count the cancelled job"
        time.sleep(0.1)


def test_edit_with_a_painted_mask(page, tmp_path, artifacts):
    source = tmp_path / "source.png"
    gradient = Image.linear_gradient("L").resize((256, 256))
    Image.merge("RGB", (gradient, gradient.rotate(90), gradient.rotate(180))).save(source)

    page.click("#tab-edit")
    assert page.locator("#panel-generate").is_hidden()
    page.set_input_files("#edit-file", str(source))
    page.wait_for_selector("#canvas-wrap:not([hidden])")
    box = page.locator("#edit-mask").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.25, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    for i in range(1, 11):
        page.mouse.move(box["x"] + box["width"] * (0.25 + i * 0.05), box["y"] + box["height"] * 0.5)
    page.mouse.up()
    painted = page.evaluate(
        """() => {
            const c = document.getElementById('edit-mask');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
            return [c.width, c.height, n];
        }"""
    )
    assert painted[:2] == [256, 256] and 0 < painted[2] < 256 * 256 / 2, painted

    page.fill("#edit-steps", "10")
    page.fill("#edit-partials", "1")
    page.evaluate(RECORD_STATES, "#edit-gallery")
    page.evaluate(CAPTURE_FORM)
    page.click("#edit-run")
    page.wait_for_selector("#edit-gallery .tile[data-state='final']")
    states = page.evaluate("window.__states")
    assert states[0].startswith("0:partial:1") and states[-1].startswith("0:final"), states
    assert page.locator("#edit-gallery a.download").count() == 1
    assert page.locator("#error").text_content() == ""

    sent = page.evaluate("window.__sent")
    assert sent["image"] == "image/png" and sent["stream"] == "true" and sent["partial_images"] == "1", sent
    mask = Image.open(io.BytesIO(base64.b64decode(sent["mask"].split(",", 1)[1])))
    assert mask.format == "PNG" and mask.size == (256, 256), (mask.format, mask.size)
    alpha = mask.convert("RGBA").getchannel("A")
    # OpenAI's mask: opaque where the image is kept, alpha 0 along the painted stroke (the area to redraw).
    assert alpha.getextrema() == (0, 255)
    assert alpha.getpixel((5, 5)) == alpha.getpixel((128, 20)) == 255
    assert alpha.getpixel((128, 128)) == alpha.getpixel((80, 128)) == 0
    screenshot(page, artifacts, "edit")


def test_http_error_shows_an_alert_on_a_phone(browser, server, artifacts):
    context, page = open_page(browser, server, PHONE)
    try:
        # Single column: nothing wider than the screen.
        assert_fits_phones(page, "Generate tab")
        form, gallery = page.locator("#generate-form").bounding_box(), page.locator("#gen-gallery").bounding_box()
        assert gallery["y"] >= form["y"] + form["height"], "the gallery should sit below the form on a phone"

        fill_generate(page, size="100x7", steps=5, partials=0)
        page.click("#gen-run")
        alert = page.get_by_role("alert")
        alert.wait_for(state="visible")
        text = alert.text_content()
        assert "size" in text.lower(), text
        assert page.locator("#gen-run").is_enabled()
        screenshot(page, artifacts, "error-phone")
        assert not page.page_errors, f"JavaScript errors: {page.page_errors}"
    finally:
        context.close()


def test_page_load_logs_no_errors(browser, server):
    # A browser of its own: Chromium asks for /favicon.ico only on its first page load.
    fresh = browser.browser_type.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
    try:
        context, page = open_page(fresh, server, PHONE, settle=True)
        assert page.locator("link[rel='icon']").get_attribute("href").startswith("data:image/svg+xml,")
        context.close()
    finally:
        fresh.close()


def test_both_tabs_fit_a_phone(browser, server, tmp_path, artifacts):
    source = tmp_path / "source.png"
    Image.new("RGB", (256, 256), "teal").save(source)
    context, page = open_page(browser, server, PHONE)
    try:
        assert_fits_phones(page, "Generate tab")
        fill_generate(page, size="256x256", steps=2, partials=0)
        page.click("#gen-run")
        page.wait_for_selector("#gen-gallery .tile[data-state='final']")
        assert_fits_phones(page, "Generate tab with an image")

        page.click("#tab-edit")
        assert_fits_phones(page, "Edit tab")
        page.set_input_files("#edit-file", str(source))
        page.wait_for_selector("#canvas-wrap:not([hidden])")
        assert_fits_phones(page, "Edit tab with an image to paint")
        page.fill("#edit-steps", "2")
        page.fill("#edit-partials", "0")
        page.click("#edit-run")
        page.wait_for_selector("#edit-gallery .tile[data-state='final']")
        assert page.locator("#error").text_content() == ""
        assert_fits_phones(page, "Edit tab with an edited image")
        screenshot(page, artifacts, "edit-phone")

        page.click("#tab-generate")
        assert_fits_phones(page, "Generate tab after an edit")
        assert not page.page_errors, f"JavaScript errors: {page.page_errors}"
    finally:
        context.close()
