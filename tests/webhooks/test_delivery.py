"""Webhooks end to end: a real worker delivers to a real HTTP receiver on 127.0.0.1."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections import defaultdict
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connection, transaction

from orders import events as order_events
from orders.models import Order
from orders.selectors import OrderStatus
from sagas.definition import get_definition
from sagas.models import Saga
from sagas.runner import run_claimed
from sagas.services import saga_request_cancel
from sagas.store import claim
from sagas.sweeper import sweep as saga_sweep
from tests.sagas.inprocess import only_this_process, out_of_workers_reach
from webhooks import signing
from webhooks.delivery import sweep
from webhooks.models import Delivery, DeliveryStatus, Endpoint, Event
from webhooks.security import UrlRefused, check_url
from webhooks.services import endpoint_set_active

from .conftest import api_client_for, place, register

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

SETTLED_TYPES = {"order.confirmed", "order.cancelled", "order.needs_attention"}


def _by_order(events: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        out[e["data"]["id"]].append(e)
    return out


def _final_received(receiver, order_ids):
    def check():
        got = _by_order(receiver.accepted())
        return all(any(e["type"] in SETTLED_TYPES for e in got.get(o, [])) for o in order_ids)

    return check


def test_events_arrive_signed_in_order_and_the_last_one_is_the_order_as_get_shows_it(
    customer, catalog, receiver, celery_worker, wait_for
):
    client = api_client_for(customer)
    endpoint = register(client, receiver.url)
    assert endpoint["secret"].startswith("whsec_")
    orders = [
        place(client)["id"],
        place(client, payment_method="pm_card_declined")["id"],
        # Shipping refuses, then voiding the authorization fails every time: needs a person.
        place(client, payment_method="pm_card_refund_fails", country="AQ")["id"],
    ]

    wait_for(_final_received(receiver, orders), timeout=60, describe=receiver.accepted)

    for request in receiver.all():
        header = request.headers["Sagarunner-Signature"]  # the documented name, spelt out
        assert signing.verify(endpoint["secret"], header, request.body), header
        assert not signing.verify("whsec_wrong", header, request.body)
        # The documented format, computed here without the product's code: the header is
        # "Sagarunner-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of '<t>.<body>'>".
        parts = dict(part.split("=", 1) for part in header.split(","))
        assert set(parts) == {"t", "v1"} and parts["t"].isdigit(), header
        signed = parts["t"].encode() + b"." + request.body
        expected = hmac.new(endpoint["secret"].encode(), signed, hashlib.sha256).hexdigest()
        assert parts["v1"] == expected
    got = _by_order(receiver.accepted())
    confirmed, declined, stuck = got[orders[0]], got[orders[1]], got[orders[2]]
    for events in (confirmed, declined, stuck):
        sequences = [e["sequence"] for e in events]
        assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
        assert set(e["type"] for e in events[:-1]) == {"order.updated"}
    # Every forward step the client saw, in the saga's order, then the settled event.
    names = [s.name for s in get_definition("order").steps]
    seen = [e["data"]["step"] for e in confirmed[:-1]]
    # The waits this order does not need are never the step a client sees it at.
    assert not {"confirm_3ds", "fraud_review"} & set(seen), seen
    assert [names.index(step) for step in seen] == sorted(names.index(step) for step in seen)
    assert {"authorize_payment", "arrange_shipment", "capture_payment", "confirm_order"} <= set(
        seen
    )
    assert confirmed[-1]["type"] == "order.confirmed"
    assert declined[-1]["type"] == "order.cancelled"
    assert declined[-1]["data"]["cancellation_reason"] == "payment_declined"
    assert stuck[-1]["type"] == "order.needs_attention"
    assert stuck[-1]["data"]["status"] == "needs_attention"
    # The payload is the order exactly as GET /orders/{id}/ shows it to its client.
    for order_id, events in zip(orders, (confirmed, declined, stuck), strict=True):
        assert events[-1]["data"] == client.get(f"/api/v1/orders/{order_id}/").json()
        assert set(events[-1]) == {"id", "type", "created", "sequence", "data"}
    # The receiver counts a request before it answers: the worker records the answer after.
    wait_for(lambda: not Delivery.objects.filter(status=DeliveryStatus.PENDING).exists())
    delivery = Delivery.objects.filter(endpoint_id=endpoint["id"]).first()
    assert delivery.status == DeliveryStatus.DELIVERED
    assert delivery.last_status_code == 200
    assert 0 < len(delivery.response_excerpt) <= 200


def test_each_undo_of_an_order_being_cancelled_is_an_event_with_the_order_as_it_then_is(
    customer, catalog, receiver, celery_worker, wait_for
):
    """The capture is declined after the shipment was arranged: the saga cancels the
    shipment, voids the authorization and releases the stock. The order is `cancelling` with
    no step all along, but what its client sees changes at each undo (its saga's step, the
    shipment, the voided amount), so a client mirroring it from its events learns each."""
    client = api_client_for(customer)
    register(client, receiver.url)
    placed = place(client, payment_method="pm_card_capture_declined")
    order_id, total = placed["id"], placed["total"]

    wait_for(_final_received(receiver, [order_id]), timeout=60, describe=receiver.accepted)
    events = {e["id"]: e for e in _by_order(receiver.accepted())[order_id]}  # at least once
    seen = [
        (
            e["type"],
            e["data"]["status"],
            e["data"]["saga"]["current_step"],
            e["data"]["shipment"]["status"],
            e["data"]["payment"]["voided"],
        )
        for e in sorted(events.values(), key=lambda e: e["sequence"])
        if e["data"]["status"] != "processing"
    ]
    assert seen == [
        ("order.updated", "cancelling", "arrange_shipment", "arranged", "0.00"),
        ("order.updated", "cancelling", "authorize_payment", "cancelled", "0.00"),
        ("order.updated", "cancelling", "reserve_inventory", "cancelled", total),
        ("order.cancelled", "cancelled", "reserve_inventory", "cancelled", total),
    ]
    assert [e["sequence"] for e in events.values()] == list(range(1, len(events) + 1))


def test_a_receiver_that_fails_then_recovers_gets_every_event_at_least_once(
    customer, catalog, receiver, celery_worker, wait_for
):
    receiver.answer = lambda n, body: 503 if n < 6 else 200
    client = api_client_for(customer)
    endpoint = register(client, receiver.url)
    orders = [place(client)["id"] for _ in range(3)]

    wait_for(_final_received(receiver, orders), timeout=90, describe=receiver.accepted)
    wait_for(
        lambda: not Delivery.objects.filter(status=DeliveryStatus.PENDING).exists(),
        timeout=30,
    )

    written = set(map(str, Event.objects.values_list("id", flat=True)))
    accepted = [e["id"] for e in receiver.accepted()]
    assert set(accepted) == written  # each at least once; duplicates share their id
    assert sum(1 for r in receiver.all() if r.status == 503) == 6
    failed = Delivery.objects.filter(endpoint_id=endpoint["id"], attempts__gt=1)
    assert failed.exists()
    # In order per order, even across the failures and retries.
    for events in _by_order(receiver.accepted()).values():
        sequences = [e["sequence"] for e in events]
        assert sequences == sorted(sequences)


def test_a_hung_endpoint_holds_back_neither_another_client_nor_any_saga(
    customer, other_customer, catalog, receiver_factory, celery_worker, wait_for
):
    hung, fine = receiver_factory(), receiver_factory()
    release = threading.Event()

    def hang(n: int, body: bytes) -> int:
        release.wait(60)
        return 200

    hung.answer = hang
    slow_client, other = api_client_for(customer), api_client_for(other_customer)
    register(slow_client, hung.url)
    register(other, fine.url)
    try:
        slow_orders = [place(slow_client)["id"] for _ in range(2)]
        fast_orders = [place(other)["id"] for _ in range(2)]
        # Everything of the other client arrives while the first client's receiver hangs...
        wait_for(_final_received(fine, fast_orders), timeout=60, describe=fine.accepted)
        # ... and the hung client's own orders settle anyway.
        wait_for(
            lambda: all(Order.objects.get(pk=o).status in OrderStatus.SETTLED for o in slow_orders),
            timeout=60,
        )
        assert hung.accepted() == []
    finally:
        release.set()
    wait_for(_final_received(hung, slow_orders), timeout=90, describe=hung.accepted)


def test_a_change_that_rolls_back_is_never_sent(
    customer, catalog, receiver, worker_factory, wait_for
):
    # The first step takes a while, so the order is still before its pivot when we cancel.
    worker_factory(
        {"SAGA_FAULTS": '{"inventory.reserve": {"latency_ms": [1500, 1500]}}'}, exclusive=True
    )
    client = api_client_for(customer)
    register(client, receiver.url)
    order_id = place(client)["id"]
    saga_id = Order.objects.get(pk=order_id).saga_id

    class Abort(Exception):
        pass

    with pytest.raises(Abort), transaction.atomic():
        saga_request_cancel(saga_id=saga_id, reason="customer_cancelled", actor="test")
        assert Event.objects.filter(subject=order_id).exists()  # written with the change...
        raise Abort  # ... and gone with it

    wait_for(_final_received(receiver, [order_id]), timeout=60, describe=receiver.accepted)
    events = receiver.accepted()
    assert events[-1]["type"] == "order.confirmed"
    assert all(e["data"]["status"] != OrderStatus.CANCELLING for e in events)
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))


def test_a_worker_killed_mid_delivery_loses_nothing(
    customer, catalog, receiver, worker_factory, wait_for
):
    first_request = threading.Event()
    release = threading.Event()

    def stall_the_first(n: int, body: bytes) -> int:
        if n == 0:
            first_request.set()
            release.wait(30)
        return 200

    receiver.answer = stall_the_first
    victim = worker_factory(exclusive=True)
    client = api_client_for(customer)
    register(client, receiver.url)
    order_id = place(client)["id"]
    wait_for(first_request.is_set, timeout=60)
    victim.kill()  # SIGKILL, with the first delivery in flight
    release.set()
    worker_factory(name="heir", exclusive=True)

    def all_delivered():
        # Beat's job: ring sagas and endpoints whose lease expired with the killed worker.
        saga_sweep()
        sweep()
        return (
            _final_received(receiver, [order_id])()
            and not Delivery.objects.filter(status=DeliveryStatus.PENDING).exists()
        )

    wait_for(all_delivered, timeout=90, interval=0.5, describe=receiver.accepted)
    written = set(map(str, Event.objects.filter(subject=order_id).values_list("id", flat=True)))
    assert written <= {e["id"] for e in receiver.accepted()}
    assert Order.objects.get(pk=order_id).status == OrderStatus.CONFIRMED


def test_an_endpoint_the_rules_no_longer_allow_is_refused_at_delivery(
    customer, catalog, receiver, worker_factory, wait_for, settings
):
    # Registered while loopback was allowed (as after a DNS change to an internal address):
    # workers that do not allow private addresses refuse to call it.
    worker_factory({"WEBHOOKS_ALLOW_PRIVATE": "0"}, exclusive=True)
    client = api_client_for(customer)
    endpoint = register(client, receiver.url)
    place(client)

    refused = wait_for(
        lambda: Delivery.objects.filter(
            endpoint_id=endpoint["id"], last_error__startswith="refused"
        ).first(),
        timeout=60,
    )
    # The worker ran the same check as registration (here the http scheme is refused first;
    # over https this loopback address would be refused as private).
    settings.WEBHOOKS_ALLOW_PRIVATE = False
    with pytest.raises(UrlRefused) as refusal:
        check_url(receiver.url.replace("http://", "https://"))
    assert refusal.value.code == "private_address"
    assert refused.status in (DeliveryStatus.PENDING, DeliveryStatus.DEAD)
    assert receiver.all() == []


def test_an_order_placed_before_its_client_had_an_endpoint_tells_it_every_later_change(
    customer, catalog, receiver, celery_worker, wait_for
):
    """Registering an endpoint marks the client's orders in flight: no worker takes the order
    until the endpoint exists, then every change is delivered, the settled one last."""
    client = api_client_for(customer)
    celery_worker.pause_consuming()
    try:
        order = place(client)["id"]
        assert not Saga.objects.get(order__id=order).data.get(order_events.DATA_KEY)
        register(client, receiver.url)
        assert Saga.objects.get(order__id=order).data.get(order_events.DATA_KEY) is True
    finally:
        celery_worker.resume_consuming()
    wait_for(_final_received(receiver, [order]), timeout=60, describe=receiver.accepted)
    got = _by_order(receiver.accepted())[order]
    assert [e["type"] for e in got][-1] == "order.confirmed"
    assert {e["data"]["step"] for e in got[:-1]} >= {"authorize_payment", "capture_payment"}


def test_changes_made_while_staff_had_the_endpoint_off_arrive_in_order_when_it_is_on_again(
    customer, catalog, receiver, celery_worker, admin_client, wait_for
):
    """The client's order waits for its 3-D Secure confirmation; staff switch the endpoint
    off; the client cancels; staff switch it back on. The cancellation's events were written
    while it was off, held (nothing reaches the receiver meanwhile) and arrive once it is on,
    right after the events it had, their sequence numbers carrying on without a gap."""
    client = api_client_for(customer)
    endpoint = register(client, receiver.url)
    order_id = place(client, payment_method="pm_card_3ds_required")["id"]
    wait_for(
        lambda: any(e["data"]["status"] == "requires_action" for e in receiver.accepted()),
        timeout=60,
        describe=receiver.accepted,
    )
    wait_for(lambda: not Delivery.objects.filter(status=DeliveryStatus.PENDING).exists())
    before = receiver.accepted()
    last = len(before)
    assert [e["sequence"] for e in before] == list(range(1, last + 1))

    console = "/admin/webhooks/endpoint/"
    disabled = admin_client.post(
        console, {"action": "disable", "_selected_action": [endpoint["id"]]}
    )
    assert disabled.status_code == 302
    assert client.post(f"/api/v1/orders/{order_id}/cancel/").status_code == 202
    cancelled = wait_for(
        lambda: Event.objects.filter(subject=order_id, type="order.cancelled").first(),
        timeout=60,
    )
    held = Delivery.objects.filter(endpoint_id=endpoint["id"], sequence__gt=last)
    assert held.count() == cancelled.sequence - last >= 1
    assert set(held.values_list("status", "attempts")) == {(DeliveryStatus.PENDING, 0)}
    assert receiver.accepted() == before

    enabled = admin_client.post(console, {"action": "enable", "_selected_action": [endpoint["id"]]})
    assert enabled.status_code == 302
    wait_for(_final_received(receiver, [order_id]), timeout=60, describe=receiver.accepted)
    events = receiver.accepted()
    assert events[: len(before)] == before
    assert [e["sequence"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "order.cancelled"
    assert events[-1]["id"] == str(cancelled.id)
    assert events[-1]["sequence"] == cancelled.sequence
    assert events[-1]["data"]["cancellation_reason"] == "customer_cancelled"


def test_an_order_placed_while_the_endpoint_is_off_tells_it_and_one_being_deleted_does_not(
    customer, catalog
):
    """Switched off by staff, the endpoint is still subscribed: an order placed meanwhile tells
    the outbox. Left by an unfinished delete (``409 endpoint_busy``), it is not; switched back
    on by staff, it is an ordinary endpoint again and the client's orders in flight are
    marked."""
    from webhooks.services import EndpointBusy, endpoint_delete

    client = api_client_for(customer)
    endpoint = Endpoint.objects.get(pk=register(client, "http://127.0.0.1:9/hooks")["id"])
    staff = get_user_model().objects.create_superuser("staffer", password="x")

    def placed_out_of_workers_reach() -> Order:
        with transaction.atomic():
            order = Order.objects.get(pk=place(client)["id"])
            out_of_workers_reach(order.saga_id)
        return order

    endpoint_set_active(endpoint=endpoint, active=False, user=staff, reason="maintenance")
    while_off = placed_out_of_workers_reach()
    assert Saga.objects.get(pk=while_off.saga_id).data.get(order_events.DATA_KEY) is True

    with pytest.raises(EndpointBusy):
        endpoint_delete(endpoint=endpoint, tries=0)  # as if events beat every try
    endpoint.refresh_from_db()
    assert endpoint.deleting and not endpoint.is_active
    while_deleting = placed_out_of_workers_reach()
    assert not Saga.objects.get(pk=while_deleting.saga_id).data.get(order_events.DATA_KEY)
    endpoint_set_active(endpoint=endpoint, active=True, user=staff)
    endpoint.refresh_from_db()
    assert endpoint.is_active and not endpoint.deleting
    assert Saga.objects.get(pk=while_deleting.saga_id).data.get(order_events.DATA_KEY) is True


def _claimed_then_registered(customer) -> tuple[Order, Any]:
    """An order whose saga a task has claimed (its data read without the flag), and then its
    client registers an endpoint: the step in flight has not recorded yet."""
    client = api_client_for(customer)
    with transaction.atomic():
        order = Order.objects.get(pk=place(client)["id"])
        out_of_workers_reach(order.saga_id, 10_000)
    claimed = claim(order.saga_id, 10_000)
    assert claimed is not None and not claimed.data.get(order_events.DATA_KEY)
    register(client, "http://127.0.0.1:9/hooks")
    return order, claimed


def test_a_step_in_flight_when_the_endpoint_is_registered_still_tells_it(
    customer, catalog, celery_worker
):
    """The race: a task claimed the saga (reading its data, no flag yet), the client registers
    an endpoint, then the step records. Its change is delivered: the record reads the flag
    back and tells the hook at once."""
    celery_worker.pause_consuming()
    try:
        order, claimed = _claimed_then_registered(customer)
        run_claimed(claimed, inline_ok=False)
    finally:
        celery_worker.resume_consuming()
    events = list(Event.objects.filter(subject=order.id).values_list("type", "body"))
    assert len(events) == 1, events
    kind, body = events[0]
    assert kind == "order.updated"
    assert json.loads(body)["data"]["step"] != "reserve_inventory"


def _claimed_at(order: Order, step: str) -> Any:
    """The order's saga run here up to ``step``, then claimed for it (in ``only_this_process``,
    placed out of the workers' reach)."""
    claimed = claim(order.saga_id, 10_000)
    while claimed.current_step != step:
        run_claimed(claimed, inline_ok=False)
        claimed = claim(order.saga_id, Saga.objects.get(pk=order.saga_id).version)
    assert claimed is not None
    return claimed


class _WorkerDied(BaseException):
    """The worker process ends here (a kill, an out-of-memory), as a test can stage it."""


@pytest.mark.parametrize("step", ["reserve_inventory", "authorize_payment"])
def test_a_step_in_flight_at_registration_commits_its_event_with_its_record(
    customer, catalog, monkeypatch, step
):
    """The same race, and the recording worker dies the moment its record commits (its
    doorbell, rung on commit, is where it stops). The change is told all the same: its event
    commits with the record, in the one transaction of a transactional step (reserve) and in
    the record that a plain step (authorize), which would autocommit, makes again in one
    when it finds the saga's data changed under it."""
    from sagas import store

    client = api_client_for(customer)
    with only_this_process():
        with transaction.atomic():
            order = Order.objects.get(pk=place(client)["id"])
            out_of_workers_reach(order.saga_id, 10_000)
        claimed = _claimed_at(order, step)
        assert not claimed.data.get(order_events.DATA_KEY)
        assert not Event.objects.filter(subject=order.id).exists()
        register(client, "http://127.0.0.1:9/hooks")

        def dies() -> None:
            raise _WorkerDied

        def rings_then_dies(*args, **kwargs):
            transaction.on_commit(dies)

        monkeypatch.setattr(store, "ring_on_commit", rings_then_dies)
        with pytest.raises(_WorkerDied):
            run_claimed(claimed, inline_ok=False)
    saga = Saga.objects.get(pk=order.saga_id)
    assert saga.current_step != step  # the record committed
    bodies = Event.objects.filter(subject=order.id).values_list("body", flat=True)
    assert [json.loads(b)["data"]["step"] for b in bodies] == [saga.current_step]


def test_a_step_in_flight_at_registration_tells_it_even_if_the_saga_is_claimed_at_once(
    customer, catalog, monkeypatch
):
    """The same race, with the hand-over's doorbell answered at once: another worker (or a
    pump) claims the saga as soon as the record commits, before the recording worker tells
    the hook. A claim is no newer record, so the change is still told."""
    from sagas import store

    order, claimed = _claimed_then_registered(customer)
    taken: list = []

    def doorbell_answered_at_once(saga_id, version, *args, **kwargs):
        transaction.on_commit(lambda: taken.append(claim(saga_id, version)))

    monkeypatch.setattr(store, "ring_on_commit", doorbell_answered_at_once)
    run_claimed(claimed, inline_ok=False)
    assert taken and taken[0] is not None  # claimed by "someone else" before the hook ran
    bodies = Event.objects.filter(subject=order.id).values_list("body", flat=True)
    assert [json.loads(b)["data"]["step"] for b in bodies] == [taken[0].current_step]


def test_a_plain_steps_record_lands_when_its_data_does_not_survive_the_trip_through_python(
    customer, catalog
):
    """A plain step's record is guarded on the data its claim read, sent back from Python; a
    number of 34 digits (written by hand, say) comes back as another number, and the guard
    matches nothing. The record still lands (made again in a transaction), rather than being
    fenced off as if a newer claim held the saga, on every claim after."""
    client = api_client_for(customer)
    with only_this_process():
        with transaction.atomic():
            order = Order.objects.get(pk=place(client)["id"])
            out_of_workers_reach(order.saga_id, 10_000)
            with connection.cursor() as cursor:
                cursor.execute(
                    "UPDATE sagas_saga SET data = data || %s::jsonb WHERE id = %s",
                    ['{"x": 0.1000000000000000055511151231257827}', order.saga_id],
                )
        claimed = _claimed_at(order, "authorize_payment")
        assert claimed.data["x"] == 0.1  # what Python holds, and sends back
        run_claimed(claimed, inline_ok=False)
    saga = Saga.objects.get(pk=order.saga_id)
    assert saga.current_step != "authorize_payment", saga.current_step
    assert saga.state == "running" and saga.version > claimed.version
    assert not Event.objects.filter(subject=order.id).exists()  # no endpoint: nothing to tell
