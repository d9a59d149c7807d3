"""The playground's Admin tab in headless Chromium against a real `imagegate serve` that has an admin key.

The session ``server`` runs open (no credential at all), where creating a virtual key would switch every other test
of the session to needing one: this module starts its own server with ``IMAGEGATE_ADMIN_KEY``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from .conftest import Server
from .test_browser import (  # noqa: F401 (browser and artifacts are fixtures)
    DESKTOP,
    MODEL,
    PHONE,
    TIMEOUT_MS,
    artifacts,
    assert_fits_phones,
    browser,
    screenshot,
)

pytestmark = pytest.mark.e2e

ADMIN_KEY = "sk-ig-admin-key-for-the-admin-view-0123456789"
ALIAS = "web <b>app</b> & co"  # markup in data must show as text


@pytest.fixture(scope="module")
def admin_server(tmp_path_factory) -> Iterator[Server]:
    srv = Server(tmp_path_factory.mktemp("admin-view"), env={"IMAGEGATE_ADMIN_KEY": ADMIN_KEY})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def user_key(admin_server) -> dict:
    """A virtual key made through the admin API (the answer carries the secret, shown this once)."""
    created = httpx.post(
        f"{admin_server.url}/admin/keys",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        json={"alias": ALIAS, "models": ["imagegate-*"], "image_quota": 50},
        timeout=30,
    )
    assert created.status_code == 201, created.text
    return created.json()


def open_admin_tab(chromium, server: Server, key: str, viewport: dict[str, int]):
    """A page with ``key`` stored as the playground's API key, on the Admin tab."""
    context = chromium.new_context(viewport=viewport)
    context.set_default_timeout(TIMEOUT_MS)
    context.add_init_script(f"localStorage.setItem('imagegate.apiKey', {json.dumps(key)})")
    page = context.new_page()
    page.page_errors = []  # type: ignore[attr-defined]
    page.on("pageerror", lambda error: page.page_errors.append(str(error)))  # type: ignore[attr-defined]
    page.goto(f"{server.url}/")
    page.wait_for_selector("body[data-models='loaded']")
    assert page.locator("#gen-model option").all_text_contents() == [MODEL]
    page.click("#tab-admin")
    return context, page


def cell(page, table: str, row: str, field: str):
    return page.locator(f"#admin-{table} tr[data-id='{row}'] td[data-field='{field}']")


def wait_for_cell(page, table: str, row: str, field: str, text: str, timeout: float = TIMEOUT_MS) -> None:
    """Until a refresh shows ``text`` in that cell."""
    selector = json.dumps(f"#admin-{table} tr[data-id='{row}'] td[data-field='{field}']")
    page.wait_for_function(f"document.querySelector({selector})?.textContent === {json.dumps(text)}", timeout=timeout)


def test_admin_sees_backends_models_keys_usage_and_jobs(browser, admin_server, user_key, artifacts):  # noqa: F811
    key, key_id = user_key["key"], user_key["id"]
    context, page = open_admin_tab(browser, admin_server, ADMIN_KEY, DESKTOP)
    try:
        page.wait_for_selector("#panel-admin[data-access='admin']")
        assert page.locator("#admin-message").text_content() == ""

        # Backends and models, from /ready and /v1/models.
        assert page.locator("#admin-readiness").text_content() == "ready"
        backends = page.locator("#admin-backends tbody tr")
        assert backends.count() == 1
        assert backends.locator("td[data-field='state'] .badge").text_content() == "ready"
        assert backends.locator("td[data-field='models']").text_content() == MODEL
        assert backends.locator("td[data-field='outstanding']").text_content() == "0"
        assert cell(page, "models", MODEL, "ready").text_content() == "1"
        assert cell(page, "models", MODEL, "family").text_content() == "sd"

        # The key: its alias as text (no markup), its prefix, never its secret; no usage yet.
        assert cell(page, "keys", key_id, "alias").text_content() == ALIAS
        assert page.locator("#admin-keys b").count() == 0
        assert cell(page, "keys", key_id, "prefix").text_content() == f"{user_key['prefix']}…"
        assert cell(page, "keys", key_id, "status").text_content() == "active"
        assert cell(page, "keys", key_id, "requests").text_content() == "0"
        assert key not in page.locator("#panel-admin").inner_text()

        # One request with the key; once the server has written its usage, Refresh shows it (auto-refresh off, so
        # that only the button can).
        page.uncheck("#admin-auto")
        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": MODEL, "prompt": "a key", "size": "64x64", "num_inference_steps": 2}
        done = httpx.post(f"{admin_server.url}/v1/images/generations", headers=headers, json=body, timeout=60)
        assert done.status_code == 200, done.text
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        deadline = time.monotonic() + 10
        while httpx.get(f"{admin_server.url}/admin/keys/{key_id}", headers=admin).json()["usage"]["requests"] < 1:
            assert time.monotonic() < deadline, "the server did not record the key's usage"
            time.sleep(0.05)
        page.click("#admin-refresh")
        wait_for_cell(page, "keys", key_id, "requests", "1")
        assert cell(page, "keys", key_id, "images").text_content() == "1"
        assert cell(page, "keys", key_id, "period").text_content() == "1 of 50 / day"

        # A job of the key (not the admin's own): the periodic refresh shows it, without a click, until it ends.
        page.check("#admin-auto")
        job = httpx.post(
            f"{admin_server.url}/v1/images/generations",
            headers={**headers, "Prefer": "respond-async"},
            json=body,
            timeout=30,
        )
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        page.wait_for_selector(
            f"#admin-jobs tr[data-id='{job_id}'] td[data-field='status'] .badge[data-value='succeeded']",
            timeout=20_000,
        )
        assert cell(page, "jobs", job_id, "model").text_content() == MODEL
        assert cell(page, "jobs", job_id, "kind").text_content() == "generation"
        assert cell(page, "jobs", job_id, "progress").text_content().startswith("100%")
        # The job counts as the key's second request, written as it ended: a periodic refresh shows that too.
        wait_for_cell(page, "keys", key_id, "requests", "2", timeout=15_000)
        assert cell(page, "keys", key_id, "period").text_content() == "2 of 50 / day"

        assert_fits_phones(page, "Admin tab")
        screenshot(page, artifacts, "admin-phone")
        assert not page.page_errors, f"JavaScript errors: {page.page_errors}"
    finally:
        context.close()


def test_a_key_that_is_not_admin_gets_a_clear_refusal(browser, admin_server, user_key, artifacts):  # noqa: F811
    context, page = open_admin_tab(browser, admin_server, user_key["key"], PHONE)
    try:
        page.wait_for_selector("#panel-admin[data-access='forbidden']")
        text = page.get_by_role("alert").filter(has_text="admin").text_content()
        assert "not an admin credential" in text and "403" in text, text
        assert page.locator("#admin-content").is_hidden()
        assert page.locator("#admin-keys tbody tr").count() == 0
        assert_fits_phones(page, "Admin tab refused")
        screenshot(page, artifacts, "admin-forbidden")

        # Entering the admin key in Settings shows the data at once.
        page.click("#settings summary")
        page.fill("#api-key", ADMIN_KEY)
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("#panel-admin[data-access='admin']")
        assert cell(page, "keys", user_key["id"], "alias").text_content() == ALIAS
        assert not page.page_errors, f"JavaScript errors: {page.page_errors}"
    finally:
        context.close()
