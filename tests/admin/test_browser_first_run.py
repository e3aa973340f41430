"""What a first visitor sees, in a real browser (headless chromium, as in test_browser.py).

The landing page at / renders with its stylesheet under the content security policy (a file
from this origin, no inline style, no violation reported).
"""

from __future__ import annotations

import pytest
from django.db import connections
from playwright.sync_api import expect, sync_playwright

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
