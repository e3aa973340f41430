"""In a real browser: the console's pages with long unbreakable texts fit a laptop's screen.

Its steps table held long unbreakable texts (idempotency keys, result JSON), so the page
overflowed a 1280 px window and the "last error" column, the one a person reads there, was
squeezed to a few characters a line.
"""

from __future__ import annotations

import pytest
from django.conf import settings
from django.core.management import call_command

from sagas.models import SagaStep
from tests.admin.conftest import needs_manual
from tests.admin.test_browser import browser_page, shot  # noqa: F401 - a fixture

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_the_saga_page_of_a_saga_that_needs_a_person_fits_1280_px(
    live_server,
    browser_page,  # noqa: F811
):
    page = browser_page
    page.set_viewport_size({"width": 1280, "height": 900})
    call_command("seed_demo", stdout=open("/dev/null", "w"))  # noqa: SIM115
    saga = needs_manual(with_order=True)
    error = "compensation failed: ConnectionError: the provider did not answer in 10 s " * 3
    SagaStep.objects.filter(saga=saga).update(
        last_error=error,
        result={"authorization_id": "auth_" + "0123456789abcdef" * 4, "amount": "1200.00"},
    )
    page.goto(f"{live_server.url}/admin/login/")
    page.fill("#id_username", "demo-staff")
    page.fill("#id_password", settings.DEMO_STAFF_PASSWORD)
    page.click("input[type=submit]")
    page.goto(f"{live_server.url}/admin/sagas/saga/{saga.pk}/change/")
    shot(page, "saga-page-1280")
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 1280, width
    # The error column is wide enough to read: at least 12 em of text a line.
    cell = page.locator("#steps td.detail").first
    em = page.evaluate("parseFloat(getComputedStyle(document.body).fontSize)")
    assert cell.bounding_box()["width"] >= 12 * em, cell.bounding_box()
