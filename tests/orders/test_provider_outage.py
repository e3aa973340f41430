"""A provider goes down under steady order load, and orders wait instead of failing.

Real workers run the order saga with the provider's breaker tuned for a quick test (a short
cooldown, two canaries, two calls in flight at most) and the fake providers counting their own
calls. ``provider_outage PROVIDER`` takes it down for every worker; orders keep arriving while
it is down; then it comes back. Every order must be confirmed, the provider must have seen
canaries rather than orders x attempts while down, and never more calls at once than the
limit. Payments (plain steps), inventory (transactional steps, the first and the pivot) and
shipping (a longer step timeout) each take their turn.
"""

from __future__ import annotations

import json
import re

import pytest
from django.core.management import call_command
from django.test import Client

from orders.models import Order
from orders.selectors import OrderStatus
from providers.models import Breaker, FakeProviderStatus
from sagas.models import ACTIVE_STATES, Saga, SagaEvent

from .conftest import make_product, place

pytestmark = [pytest.mark.worker, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

MAX_ATTEMPTS = 5
MAX_IN_FLIGHT = 2
BREAKER = {
    "window": 10,
    "min_calls": 4,
    "failure_rate": 0.5,
    "cooldown": 1.0,
    "canaries": 2,
    "max_in_flight": MAX_IN_FLIGHT,
    "release_spread": 1.0,
}
#: The provider's forward operations: calls that take a while, so that four worker processes
#: would overlap at the provider.
FORWARD = {
    "payments": ("payments.authorize", "payments.capture"),
    "inventory": ("inventory.reserve", "inventory.commit"),
    "shipping": ("shipping.arrange",),
}


def worker_env(provider: str) -> dict[str, str]:
    return {
        "SAGA_PROVIDERS": json.dumps({provider: BREAKER}),
        "SAGA_FAKE_PROVIDER_STATS": "1",
        "SAGA_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        # Without a breaker, five attempts 0.2 s, 0.4 s, ... apart are spent in about 3 s.
        "SAGA_BACKOFF_BASE": "0.2",
        "SAGA_BACKOFF_MAX": "2",
        "SAGA_FAULTS": json.dumps({op: {"latency_ms": [20, 60]} for op in FORWARD[provider]}),
    }


def _metric(body: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for line in body.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.mark.parametrize("provider", ["payments", "inventory", "shipping"])
def test_orders_wait_out_a_provider_outage_and_all_settle_after_it(
    customer, worker_factory, wait_for, settings, provider
):
    settings.SAGA_PROVIDERS = {provider: BREAKER}
    make_product("mug", stock=500)
    worker = worker_factory(worker_env(provider), name="outage", exclusive=True, concurrency=4)

    before = [place(customer, [("mug", 1)]) for _ in range(4)]
    wait_for(
        lambda: all(
            o.status == OrderStatus.CONFIRMED
            for o in Order.objects.filter(id__in=[o.id for o in before])
        ),
        timeout=60,
    )

    call_command("provider_outage", provider, "--seconds", "600")
    during: list[Order] = []

    def load_until(condition):
        """Steady load: one more order on every poll until ``condition`` holds."""

        def poll():
            during.append(place(customer, [("mug", 1)]))
            return condition()

        return poll

    # The breaker opens on the failure rate...
    wait_for(
        load_until(
            lambda: Breaker.objects.filter(provider=provider).exclude(state="closed").exists()
        ),
        timeout=60,
        interval=0.1,
    )
    calls_at_open = FakeProviderStatus.objects.get(provider=provider).calls_while_down
    # ...and while it stays down, orders keep coming and wait, through several probe rounds.
    wait_for(
        load_until(
            lambda: (
                Saga.objects.filter(state__in=ACTIVE_STATES, parked_on=provider).count() >= 8
                and len(re.findall(r"to_state='?half_open", worker.log_text())) >= 2
            )
        ),
        timeout=90,
        interval=0.2,
        describe=lambda: {
            "parked": Saga.objects.filter(state__in=ACTIVE_STATES, parked_on=provider).count(),
            "breaker": list(Breaker.objects.values()),
            "transitions": [
                line for line in worker.log_text().splitlines() if "breaker_transition" in line
            ][-6:],
            "states": sorted(
                set(
                    Order.objects.values_list(
                        "saga__state", "saga__current_step", "saga__parked_on"
                    )
                )
            ),
        },
    )
    call_command("provider_outage", provider, "--end")
    down = FakeProviderStatus.objects.get(provider=provider)

    orders = before + during
    ids = [o.id for o in orders]

    def settled():
        orders = Order.objects.filter(id__in=ids).select_related("saga")
        return all(o.status in OrderStatus.SETTLED for o in orders)

    wait_for(
        settled,
        timeout=180,
        interval=0.5,
        describe=lambda: sorted(
            set(Order.objects.filter(id__in=ids).values_list("saga__state", "saga__parked_on"))
        ),
    )

    statuses = [o.status for o in Order.objects.filter(id__in=ids).select_related("saga")]
    # No order compensated because of the outage: every one of them went through.
    assert statuses.count(OrderStatus.CONFIRMED) == len(orders), sorted(
        set(Saga.objects.values_list("state", "failure_code", "failed_step", "last_error"))
    )
    assert not SagaEvent.objects.filter(kind="compensation_started").exists()
    assert SagaEvent.objects.filter(kind="parked").exists()

    body = Client().get("/metrics").content.decode()
    canaries = _metric(body, "provider_canaries_total", provider=provider)
    rounds = _metric(body, "provider_breaker_transitions_total", provider=provider, to="half_open")
    assert rounds >= 2
    # While it was down the provider saw the calls that opened the breaker, then canaries
    # only (and at most MAX_IN_FLIGHT calls already under way as it opened)...
    assert canaries <= BREAKER["canaries"] * rounds
    assert down.calls_while_down - calls_at_open <= canaries + MAX_IN_FLIGHT
    # ...not every waiting order's attempts.
    assert down.calls_while_down < len(during) * MAX_ATTEMPTS
    # Never more calls at once than the limit, counted by the provider itself.
    status = FakeProviderStatus.objects.get(provider=provider)
    assert 0 < status.peak_in_flight <= MAX_IN_FLIGHT
    # One structured log line per transition, open and closed again included.
    log = worker.log_text()
    assert re.search(r"provider\.breaker_transition.*to_state='?open", log)
    assert re.search(r"provider\.breaker_transition.*to_state='?closed", log)
    assert Breaker.objects.get(provider=provider).state == "closed"


def test_an_order_cancelled_while_payments_are_down_is_cancelled_without_waiting_for_them(
    customer, worker_factory, wait_for, settings
):
    """Its authorization failed before anything happened (the provider is down): the cancel
    releases the stock at once and leaves the authorization alone, instead of waiting for the
    provider to come back to void a payment it never took."""
    from orders.services import order_request_cancel
    from sagas.models import SagaStep

    settings.SAGA_PROVIDERS = {"payments": BREAKER}
    product = make_product("lamp", stock=5)
    env = {**worker_env("payments"), "SAGA_MAX_ATTEMPTS": "50", "SAGA_BACKOFF_MAX": "1"}
    worker_factory(env, name="outage-cancel", exclusive=True)
    call_command("provider_outage", "payments", "--seconds", "600")
    try:
        order = place(customer, [("lamp", 2)])
        wait_for(
            lambda: SagaStep.objects.filter(
                saga_id=order.saga_id, name="authorize_payment", attempts__gte=2
            ).exists(),
            timeout=60,
        )
        order_request_cancel(order=order, actor=customer)
        wait_for(
            lambda: Order.objects.get(pk=order.pk).status in OrderStatus.SETTLED,
            timeout=60,
            describe=lambda: list(
                SagaEvent.objects.filter(saga_id=order.saga_id).values_list("kind", "step")
            ),
        )
        assert FakeProviderStatus.objects.get(provider="payments").calls_while_down >= 2
    finally:
        call_command("provider_outage", "payments", "--end")
    done = Order.objects.select_related("saga").get(pk=order.pk)
    assert (done.status, done.saga.failure_code) == (OrderStatus.CANCELLED, "customer_cancelled")
    undone = set(
        SagaEvent.objects.filter(saga_id=order.saga_id, kind="compensation_succeeded").values_list(
            "step", flat=True
        )
    )
    assert undone == {"reserve_inventory"}
    assert not SagaStep.objects.get(saga_id=order.saga_id, name="authorize_payment").maybe_effect
    product.refresh_from_db()
    assert (product.stock_on_hand, product.reserved) == (5, 0)
