"""In a real browser: the content security policy does not break the ops console or Swagger UI,
and the console's login locks out a guesser.

Headless chromium (as in test_browser.py) opens the pages that run scripts and load styles: the
login, the index, the saga list with its action bar, a saga page, a change form with
JavaScript widgets, and Swagger UI at /api/docs/. Every CSP violation the browser reports (the
``securitypolicyviolation`` event and the console) fails the test, and each page must have
actually rendered its script-built parts.
"""

from __future__ import annotations

import pytest
from django.conf import settings
from django.core.management import call_command
from playwright.sync_api import expect

from audit.models import AuditEntry
from tests.admin.conftest import needs_manual
from tests.admin.test_browser import browser_page, shot  # noqa: F401 - a fixture

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

#: Collects every violation the page reports, from any frame, before any page script runs.
WATCH_VIOLATIONS = """
window.__csp = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__csp.push(e.violatedDirective + " " + (e.blockedURI || "inline") + " " + e.sourceFile);
});
"""


def test_ops_console_and_swagger_ui_work_under_the_content_security_policy(
    live_server,
    browser_page,  # noqa: F811
):
    page = browser_page
    call_command("seed_demo", stdout=open("/dev/null", "w"))  # noqa: SIM115
    saga = needs_manual(with_order=True)
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.text} @ {m.location['url']}"))
    page.add_init_script(WATCH_VIOLATIONS)
    seen: list[str] = []

    def visit(url: str) -> None:
        page.goto(url)
        response_csp = page.evaluate("window.__csp")
        seen.extend(response_csp)

    visit(f"{live_server.url}/admin/login/")
    page.fill("#id_username", "demo-staff")
    page.fill("#id_password", settings.DEMO_STAFF_PASSWORD)
    page.click("input[type=submit]")
    expect(page.locator("#ops-overview")).to_be_visible()
    seen.extend(page.evaluate("window.__csp"))

    # The saga list: actions.js builds the "select all" behaviour of the action bar.
    visit(f"{live_server.url}/admin/sagas/saga/")
    page.locator("#action-toggle").check()
    expect(page.locator(".action-counter")).to_contain_text("1 of 1 selected")
    shot(page, "csp-01-saga-list")

    visit(f"{live_server.url}/admin/sagas/saga/{saga.pk}/change/")
    expect(page.locator("body")).to_contain_text(str(saga.pk)[:8])

    # A form with JavaScript widgets (the interval's select, the calendar shortcuts).
    from django_celery_beat.models import PeriodicTask

    task = PeriodicTask.objects.get(task="sagas.sweep")
    visit(f"{live_server.url}/admin/django_celery_beat/periodictask/{task.pk}/change/")
    expect(page.locator(".datetimeshortcuts").first).to_be_attached()
    # The crontab help script (moved out of django-celery-beat's inline script) ran.
    expect(page.locator(".field-crontab_translation")).to_be_hidden()
    seen.extend(page.evaluate("window.__csp"))
    shot(page, "csp-02-change-form")

    # Swagger UI: its script builds the operation list from the schema it fetches.
    visit(f"{live_server.url}/api/docs/")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text(
        "sagarunner API", timeout=60_000
    )
    expect(page.locator(".opblock-tag-section").first).to_be_visible()
    seen.extend(page.evaluate("window.__csp"))
    shot(page, "csp-03-swagger-ui")

    blocked = [m for m in console if "Content Security Policy" in m]
    assert not seen and not blocked, (seen, blocked)


def test_guessing_the_demo_staff_password_locks_the_login(
    live_server,
    browser_page,  # noqa: F811
):
    """Wrong passwords typed into the login form: after LOGIN_FAILURE_LIMIT of them the console
    shows the lockout page, and even the right password is refused; the audit log has it."""
    page = browser_page
    call_command("seed_demo", stdout=open("/dev/null", "w"))  # noqa: SIM115
    for attempt in range(settings.AXES_FAILURE_LIMIT):
        page.goto(f"{live_server.url}/admin/login/")
        page.fill("#id_username", "demo-staff")
        page.fill("#id_password", f"not-the-password-{attempt}")
        page.click("input[type=submit]")
        if attempt < settings.AXES_FAILURE_LIMIT - 1:
            expect(page.locator(".errornote")).to_be_visible()
    expect(page.locator("#locked-out")).to_contain_text("Too many failed logins")
    shot(page, "lockout-01-locked")

    page.goto(f"{live_server.url}/admin/login/")
    page.fill("#id_username", "demo-staff")
    page.fill("#id_password", settings.DEMO_STAFF_PASSWORD)
    page.click("input[type=submit]")
    expect(page.locator("#locked-out")).to_be_visible()
    assert AuditEntry.objects.filter(action="login.locked_out", target="user:demo-staff").exists()
