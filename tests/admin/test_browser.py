"""The support workflow in a real browser (headless Debian chromium, driven by playwright).

"My order is stuck": a support person logs in as the demo staff user, filters the sagas to
the stuck ones, opens the order's saga, reads which step fails and why, compensates it after
reading the plan, and watches the result arrive in the saga's timeline. The stuck saga is
real: an order whose carrier call always fails, on a worker that is then killed, so nothing
moves it any more. A screenshot of every screen goes to test-artifacts/screenshots/.
"""

from __future__ import annotations

import json
import re

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connections, transaction
from playwright.sync_api import Page, expect, sync_playwright

from orders.services import order_create
from sagas.models import Saga, SagaState
from sagas.selectors import saga_is_stuck
from tests.conftest import ARTIFACTS_DIR, purge_queue

pytestmark = [
    pytest.mark.browser,
    pytest.mark.worker,
    pytest.mark.django_db(transaction=True),
]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
SHOTS = ARTIFACTS_DIR / "screenshots"


@pytest.fixture
def browser_page(monkeypatch):
    """A headless chromium page, 1400 px wide (a support person's laptop)."""
    # The sync API runs an event loop in this thread; the test's own ORM reads are still
    # plain synchronous code between browser calls.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(20_000)
        yield page
        browser.close()
        # Connections the test opened while playwright ran belong to that context: close them
        # here, or the test database cannot be dropped at the end of the session.
        connections.close_all()


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


@pytest.fixture
def stuck_order(worker_factory, wait_for):
    """An order whose saga is stuck at arrange_shipment: every carrier call times out (the
    carrier may have taken it, so its undo is in the plan), and the worker that kept retrying
    it was killed, so no worker holds it and nothing rings it."""
    faulty = worker_factory(
        env={
            "SAGA_FAULTS": json.dumps({"shipping.arrange": {"lost_response": 1.0}}),
            "SAGA_MAX_ATTEMPTS": "1000",
            "SAGA_BACKOFF_BASE": "0.2",
            "SAGA_BACKOFF_MAX": "0.4",
        },
        name="faulty",
        exclusive=True,
    )
    call_command("seed_demo", stdout=open("/dev/null", "w"))  # noqa: SIM115
    from django.contrib.auth.models import User

    customer = User.objects.create_user("customer-cleo", password="pw")
    with transaction.atomic():
        order = order_create(
            owner=customer,
            items=[{"sku": "SR-MUG", "quantity": 2}],
            payment_method="pm_card_visa",
            shipping_address={
                "name": "Cleo Customer",
                "line1": "1 Test Street",
                "city": "Berlin",
                "postal_code": "10115",
                "country": "DE",
            },
        )

    def retrying():
        saga = Saga.objects.get(pk=order.saga_id)
        return saga.current_step == "arrange_shipment" and saga.attempt >= 2

    wait_for(retrying, timeout=60, describe=lambda: Saga.objects.values().get(pk=order.saga_id))
    faulty.kill()
    wait_for(
        lambda: saga_is_stuck(Saga.objects.get(pk=order.saga_id)),
        timeout=60,
        describe=lambda: Saga.objects.values(
            "state", "attempt", "next_attempt_at", "lease_until"
        ).get(pk=order.saga_id),
    )
    # A retry doorbell published just before the kill, and never fetched, would let the
    # healthy worker started later run the step: nothing may ring the stuck saga.
    purge_queue()
    return order


def test_support_finds_a_stuck_order_and_compensates_it(
    live_server, browser_page, stuck_order, worker_factory, wait_for
):
    """Log in as demo staff, filter to stuck sagas, open the one stuck order, read its failing
    step, compensate after seeing the plan, and see "compensated" in its timeline."""
    page = browser_page
    saga_id = str(stuck_order.saga_id)
    # A healthy worker, ready to run the compensation once the operator asks for it.
    worker_factory(name="healthy")

    # 1. Log in.
    page.goto(f"{live_server.url}/admin/")
    page.fill("#id_username", "demo-staff")
    page.fill("#id_password", settings.DEMO_STAFF_PASSWORD)
    shot(page, "01-login")
    page.click("input[type=submit]")

    # 2. The index says one saga is stuck.
    overview = page.locator("#ops-overview")
    expect(overview).to_contain_text("Stuck")
    expect(overview.locator(".ops-card").first.locator(".number")).to_have_text("1")
    shot(page, "02-index")

    # 3. The saga list, filtered to the stuck sagas.
    page.click("#ops-overview >> text=all sagas")
    expect(page.locator("#changelist-filter")).to_be_visible()
    page.click("#changelist-filter >> text=Stuck (no progress")
    expect(page).to_have_url(re.compile(r"stuck=yes"))
    rows = page.locator("#result_list tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("stuck")
    expect(rows.first).to_contain_text("arrange_shipment")
    shot(page, "03-stuck-sagas")

    # 4. The saga page: which step fails, and why.
    rows.first.locator(f"a[href*='{saga_id}']").click()
    failure = page.locator("#failure")
    expect(failure).to_contain_text("Failing step: arrange_shipment")
    expect(failure).to_contain_text("shipping.arrange")
    expect(page.locator("#saga-summary")).to_contain_text("Stuck:")
    expect(page.locator("#saga-summary")).to_contain_text(f"order: {stuck_order.pk}")
    shot(page, "04-saga-page")

    # 5. Compensate: the plan first, newest undo first, then a reason.
    page.click("input[value='Compensate...']")
    plan = page.locator("#plan ol li")
    expect(plan).to_have_count(3)
    expect(plan.nth(0)).to_contain_text("cancel_shipment")
    expect(plan.nth(1)).to_contain_text("void_authorization")
    expect(plan.nth(2)).to_contain_text("release_inventory")
    page.fill("#id_reason", "Carrier API down since this morning; customer asked to cancel.")
    shot(page, "05-compensation-plan")
    page.click("input[value='Yes, compensate this saga']")
    expect(page.locator("ul.messagelist")).to_contain_text("Compensation requested for 1 saga")
    shot(page, "06-compensation-requested")

    # 6. The healthy worker undoes the steps; the timeline shows it.
    wait_for(
        lambda: Saga.objects.get(pk=saga_id).state == SagaState.COMPENSATED,
        timeout=60,
        describe=lambda: Saga.objects.values("state", "current_step", "last_error").get(pk=saga_id),
    )
    page.reload()
    timeline = page.locator("#timeline")
    expect(timeline).to_contain_text("Operator: compensate")
    expect(timeline).to_contain_text("user:demo-staff")
    expect(timeline).to_contain_text("Everything undone: saga compensated")
    expect(page.locator("#saga-summary .saga-state")).to_have_text("compensated")
    expect(page.locator("#failure")).to_contain_text("Stopped because: step_failed")
    timeline.scroll_into_view_if_needed()
    shot(page, "07-timeline-compensated")

    # 7. The dashboard agrees: nothing stuck any more.
    page.goto(f"{live_server.url}/admin/sagas/saga/dashboard/")
    expect(page.locator("#card-stuck .number")).to_have_text("0")
    shot(page, "08-dashboard")

    saga = Saga.objects.get(pk=saga_id)
    assert saga.failure_code == "step_failed"
    event = saga.events.get(kind="ops_compensate")
    assert event.actor == "user:demo-staff" and "Carrier API down" in event.detail
