"""What a first visitor sees, in a real browser (headless chromium, as in test_browser.py).

The landing page at / renders with its stylesheet under the content security policy (a file
from this origin, no inline style, no violation reported), and the ops console's saga and order
lists fit a 1280 x 800 window: the last column ends inside the list, with no sideways scrolling.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connections
from playwright.sync_api import expect, sync_playwright

from sagas.models import SagaState
from tests.admin.conftest import make_saga, needs_manual, running
from tests.admin.test_browser import CHROMIUM, CHROMIUM_ARGS, SHOTS
from tests.admin.test_browser_security import WATCH_VIOLATIONS

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def laptop_page(monkeypatch):
    """A headless chromium page in a 1280 x 800 window (a small laptop screen)."""
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.set_default_timeout(20_000)
        yield page
        browser.close()
        connections.close_all()


def test_landing_page_renders_styled_under_the_content_security_policy(live_server, laptop_page):
    """The stylesheet loads from this origin and applies (the page's card has its width and
    border, the body its sans-serif font); the browser reports no policy violation."""
    page = laptop_page
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text} @ {m.location['url']}"))
    page.add_init_script(WATCH_VIOLATIONS)

    response = page.goto(f"{live_server.url}/")
    assert response is not None and response.status == 200
    assert "content-security-policy" in response.headers  # the policy is really on
    expect(page.locator("main h1")).to_have_text("sagarunner")
    page.wait_for_load_state("load")

    style = page.evaluate(
        """() => {
          const main = getComputedStyle(document.querySelector("main"));
          const sheets = Array.from(document.styleSheets).map(
            (s) => [s.href || "inline", s.cssRules.length]);
          return {
            font: getComputedStyle(document.body).fontFamily,
            maxWidth: main.maxWidth,
            borderTop: main.borderTopWidth,
            sheets,
          };
        }"""
    )
    page.screenshot(path=str(SHOTS / "landing.png"), full_page=True)
    assert [s for s in style["sheets"] if s[0].endswith("/landing.css") and s[1] > 0], style
    assert not [s for s in style["sheets"] if s[0] == "inline"], style
    assert "system-ui" in style["font"], style
    assert style["maxWidth"] != "none" and style["borderTop"] == "6px", style
    violations = page.evaluate("window.__csp")
    errors = [m for m in console if m.startswith("error") or "Content Security Policy" in m]
    assert not violations and not errors, (violations, errors)


#: Where the list's last column ends, against the list's box and the window.
MEASURE_LIST = """() => {
  const results = document.querySelector("#changelist .results");
  const heads = document.querySelectorAll("#result_list thead th");
  const last = heads[heads.length - 1];
  return {
    last: last.className,
    lastRight: last.getBoundingClientRect().right,
    resultsRight: results.getBoundingClientRect().right,
    scrollWidth: results.scrollWidth,
    clientWidth: results.clientWidth,
    pageWidth: document.documentElement.scrollWidth,
    window: window.innerWidth,
  };
}"""


def test_saga_and_order_lists_fit_a_1280_px_window(live_server, laptop_page):
    """The widest rows the lists show (an undo that failed after a forward failure, a long
    error, a running step, a cancelled order) still end inside the list at 1280 x 800: the
    last column (the order link of a saga, the saga link of an order) is on screen without
    scrolling sideways."""
    page = laptop_page
    call_command("seed_demo", stdout=open("/dev/null", "w"))  # noqa: SIM115
    needs_manual(
        saga_type="order",
        failed_step="arrange_shipment",
        failed_undo="authorize_payment",
        failure_code="carrier_unavailable",
        last_error="compensation failed: ConnectionError: HTTPSConnectionPool(host="
        "'payments.example.com', port=443): Max retries exceeded with url: /v1/authorizations",
        age=timedelta(days=400),
        with_order=True,
    )
    running(saga_type="order", with_order=True)
    make_saga(saga_type="order", with_order=True)
    make_saga(
        saga_type="order",
        state=SagaState.COMPENSATED,
        step_index=0,
        failure_code="out_of_stock",
        with_order=True,
    )

    page.goto(f"{live_server.url}/admin/login/")
    page.fill("#id_username", "demo-staff")
    page.fill("#id_password", settings.DEMO_STAFF_PASSWORD)
    page.click("input[type=submit]")
    expect(page.locator("#ops-overview")).to_be_visible()

    for name, path, last in (
        ("sagas", "/admin/sagas/saga/", "column-owner_link"),
        ("orders", "/admin/orders/order/", "column-saga_link"),
    ):
        page.goto(f"{live_server.url}{path}")
        expect(page.locator("#result_list tbody tr")).to_have_count(4)
        page.screenshot(path=str(SHOTS / f"list-1280-{name}.png"))
        box = page.evaluate(MEASURE_LIST)
        assert last in box["last"], box
        assert box["lastRight"] <= box["resultsRight"] <= box["window"], (name, box)
        assert box["scrollWidth"] <= box["clientWidth"], (name, box)
        assert box["pageWidth"] <= box["window"], (name, box)
