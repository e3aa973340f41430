"""The order lifecycle over HTTP with a real worker: place, poll until settled, read the
timeline; cancel while the saga runs; what /metrics shows afterwards."""

from __future__ import annotations

import json

import pytest
from django.test import Client

from orders.selectors import OrderStatus

from .conftest import order_body

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

FORWARD = [
    "reserve_inventory",
    "authorize_payment",
    "arrange_shipment",
    "capture_payment",
    "confirm_order",
]


@pytest.fixture
def poll(wait_for):
    """``poll(api, order_id)``: GET the order until it settles (with If-None-Match, like a
    client would) and return its last representation."""

    def run(api, order_id: str, timeout: float = 45) -> dict:
        path = f"/api/v1/orders/{order_id}/"
        seen: dict = {"etag": None, "body": None}

        def settled():
            headers = {"If-None-Match": seen["etag"]} if seen["etag"] else {}
            response = api.get(path, headers=headers)
            assert response.status_code in (200, 304), response.content
            if response.status_code == 200:
                seen["etag"], seen["body"] = response["ETag"], response.json()
            return seen["body"] if seen["body"]["status"] in OrderStatus.SETTLED else None

        return wait_for(settled, timeout=timeout, describe=lambda: seen["body"])

    return run


def test_an_order_placed_over_http_is_confirmed_and_its_timeline_tells_the_story(
    client_api, catalog, celery_worker, poll, wait_for
):
    """201 processing; polling reaches confirmed with the total captured and an arranged
    shipment; the timeline lists each forward step succeeding in order, oldest first."""
    response = client_api.post(
        "/api/v1/orders/",
        order_body([("lamp", 2)]),
        format="json",
        headers={"Idempotency-Key": "a"},
    )
    assert response.status_code == 201
    order = response.json()
    assert order["status"] == "processing"

    final = poll(client_api, order["id"])
    assert final["status"] == "confirmed"
    assert (final["step"], final["cancellation_reason"]) == (None, None)
    assert final["saga"]["state"] == "succeeded"
    assert final["payment"] == {
        "authorized": "39.80",
        "captured": "39.80",
        "voided": "0.00",
        "refunded": "0.00",
    }
    assert final["shipment"]["status"] == "arranged"
    assert final["shipment"]["tracking_number"]

    events = client_api.get(f"/api/v1/orders/{order['id']}/timeline/").json()["results"]
    assert events[0]["kind"] == "started"
    succeeded = [e["step"] for e in events if e["kind"] == "step_succeeded"]
    assert succeeded == FORWARD
    assert events[-1]["kind"] == "succeeded"
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)

    # The replay still answers with the first response, not the settled order.
    replay = client_api.post(
        "/api/v1/orders/",
        order_body([("lamp", 2)]),
        format="json",
        headers={"Idempotency-Key": "a"},
    )
    assert replay["Idempotent-Replayed"] == "true"
    assert replay.json()["status"] == "processing"

    # The worker counts a finished saga just after the commit the poll above saw.
    wanted = (
        'saga_started_total{saga_type="order"}',
        'saga_finished_total{outcome="succeeded",saga_type="order"}',
        "saga_step_duration_seconds_bucket",
    )

    def missing() -> list[str]:
        text = Client().get("/metrics").content.decode()
        return [w for w in wanted if w not in text]

    wait_for(lambda: not missing(), describe=missing)


def test_a_declined_card_ends_cancelled_with_the_reason_and_the_compensations(
    client_api, catalog, celery_worker, poll
):
    """pm_card_declined: cancelled with payment_declined; the timeline shows the failure and
    the compensation of the reservation; nothing captured."""
    order = client_api.post(
        "/api/v1/orders/", order_body(payment_method="pm_card_declined"), format="json"
    ).json()
    final = poll(client_api, order["id"])
    assert (final["status"], final["cancellation_reason"]) == ("cancelled", "payment_declined")
    assert final["payment"]["captured"] == "0.00"
    assert final["shipment"] is None
    kinds = [
        e["kind"]
        for e in client_api.get(f"/api/v1/orders/{order['id']}/timeline/").json()["results"]
    ]
    assert "step_failed" in kinds
    assert "compensation_succeeded" in kinds
    assert kinds[-1] == "compensated"


def test_a_client_cancels_over_http_while_the_saga_runs(
    client_api, catalog, worker_factory, poll, wait_for
):
    """With authorize_payment slowed down, a cancel while it runs is a 202; the saga
    compensates and the order ends cancelled with customer_cancelled, stock released; a
    second cancel after that is a 409."""
    from sagas.models import Saga

    # Step timeouts of 10 s on this worker, so authorize can take 4 s: time enough for a slow
    # test process to cancel while it runs.
    worker_factory(
        {
            "SAGA_FAULTS": json.dumps({"payments.authorize": {"latency_ms": [4000, 4000]}}),
            "SAGA_STEP_TIMEOUT": "10",
        },
        exclusive=True,
    )
    order = client_api.post("/api/v1/orders/", order_body([("lamp", 3)]), format="json").json()
    # Cancel while authorize_payment is in flight. Sent before the worker's first claim, the
    # cancel could be honoured (nothing to undo yet) before the response reads the order.
    wait_for(
        lambda: Saga.objects.filter(
            order__id=order["id"], current_step="authorize_payment", lease_until__isnull=False
        ).exists(),
        timeout=60,
    )
    cancel = client_api.post(f"/api/v1/orders/{order['id']}/cancel/")
    assert cancel.status_code == 202, cancel.content
    assert cancel.json()["status"] == "cancelling"

    final = poll(client_api, order["id"])
    assert (final["status"], final["cancellation_reason"]) == ("cancelled", "customer_cancelled")
    assert final["payment"]["captured"] == "0.00"
    lamp = client_api.get("/api/v1/products/lamp/").json()
    assert (lamp["stock_on_hand"], lamp["reserved"]) == (50, 0)
    late = client_api.post(f"/api/v1/orders/{order['id']}/cancel/")
    assert late.status_code == 409
    assert late.json()["code"] == "not_running"
    events = client_api.get(f"/api/v1/orders/{order['id']}/timeline/").json()["results"]
    # Its own action, in its own timeline: the customer.
    assert ("cancel_requested", "customer") in {(e["kind"], e["actor"]) for e in events}
