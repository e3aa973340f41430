"""A saga that needs a person, finished by a person: an undo done by hand, or a resolve.

pm_card_refund_fails to AQ: shipping says no, every void fails, the saga stops in
``needs_manual`` with the reservation held and the authorization open. An operator who voided
in the provider's dashboard marks that undo done and the engine (a real worker) releases the
reservation by itself; an operator who resolves instead is told what is still in place, and a
resolved order holds no stock and reads a final status.
"""

from __future__ import annotations

import io
import json

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command

from inventory.models import Product, Reservation, ReservationStatus
from orders.invariants import check_invariants
from orders.selectors import OrderStatus
from payments.models import Payment, ProviderAuthorization
from sagas.models import Saga, SagaState, SagaStep, StepStatus
from shipping.models import Shipment, ShipmentStatus
from tests.api.conftest import api_client_for, assert_error

from .conftest import describe, fresh, make_product, place

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

SAGAS = "/api/v1/sagas/"


@pytest.fixture
def ops_api(django_user_model):
    user = django_user_model.objects.create_user("olivia", is_staff=True)
    user.groups.add(Group.objects.get(name="ops"))
    return api_client_for(user)


@pytest.fixture
def stuck_order(customer, celery_worker, settle):
    """2 lamps, pm_card_refund_fails, to AQ: waits for a person at the void."""
    make_product("lamp", price="10.00", stock=5)
    order = settle(
        place(customer, [("lamp", 2)], payment_method="pm_card_refund_fails", country="AQ")
    )
    assert order.status == OrderStatus.NEEDS_ATTENTION
    assert (order.saga.state, order.saga.current_step) == ("needs_manual", "authorize_payment")
    assert stock("lamp") == (5, 2)
    return order


def stock(sku: str) -> tuple[int, int]:
    p = Product.objects.get(sku=sku)
    return p.stock_on_hand, p.reserved


def invariants_hold() -> str:
    out = io.StringIO()
    call_command("check_invariants", "--require-settled", stdout=out)  # raises on violations
    return out.getvalue()


def as_its_client_sees_it(order) -> dict:
    """``GET /orders/{id}/`` as the order's own client reads it."""
    response = api_client_for(order.owner).get(f"/api/v1/orders/{order.id}/")
    assert response.status_code == 200, response.content
    return response.json()


#: A worker whose every call of the named operations fails (the saga's own undo keeps failing),
#: with no breaker to hold the saga back for the provider and few undo attempts.
def failing_worker(worker_factory, **faults: dict):
    return worker_factory(
        {
            "SAGA_FAULTS": json.dumps(faults),
            "SAGA_PROVIDER_BREAKERS": "0",
            "SAGA_MAX_ATTEMPTS": "2",
            "SAGA_COMPENSATION_MAX_ATTEMPTS": "2",
        },
        name="failing",
        exclusive=True,
    )


def waiting_on_undo(order, step: str, wait_for):
    return wait_for(
        lambda: (
            (o := fresh(order)).saga.state == SagaState.NEEDS_MANUAL
            and o.saga.current_step == step
            and o
        ),
        timeout=60,
        describe=describe(order),
    )


def undo_done(ops_api, order, step: str) -> None:
    response = ops_api.post(
        f"{SAGAS}{order.saga_id}/undo-done/",
        {"step": step, "note": f"did {step}'s undo by hand"},
        format="json",
    )
    assert response.status_code == 202, response.content


def test_undo_done_by_hand_goes_on_and_releases_the_reservation(stuck_order, ops_api, wait_for):
    """POST undo-done for authorize_payment: 202, the step is undone by hand with the note and
    the user in the timeline, and the worker releases the reservation by itself: the order is
    cancelled with its reason and no stock stays reserved."""
    order = stuck_order
    response = ops_api.post(
        f"{SAGAS}{order.saga_id}/undo-done/",
        {"step": "authorize_payment", "note": "voided in the provider's dashboard"},
        format="json",
    )
    assert response.status_code == 202, response.content

    order = wait_for(
        lambda: (o := fresh(order)).status == OrderStatus.CANCELLED and o,
        timeout=30,
        describe=describe(order),
    )
    assert order.cancellation_reason == "shipping_unavailable"
    assert order.saga.state == SagaState.COMPENSATED
    assert stock("lamp") == (5, 0)
    assert Reservation.objects.get(order_id=order.id).status == ReservationStatus.RELEASED
    step = SagaStep.objects.get(saga=order.saga, name="authorize_payment")
    assert step.status == StepStatus.COMPENSATED_BY_HAND
    done = order.saga.events.get(kind="ops_undo_done")
    assert (done.step, done.actor, done.detail) == (
        "authorize_payment",
        "user:olivia",
        "voided in the provider's dashboard",
    )
    # The release ran on the worker, after the operator's event.
    release = order.saga.events.get(kind="compensation_succeeded", step="reserve_inventory")
    assert release.id > done.id and release.actor == "engine"
    assert invariants_hold().rstrip().endswith("no violations")

    # Its client reads the hold as released, as a void by the saga would have left it (it read
    # voided 0.00 beside authorized 20.00: the payment never learned of the void by hand).
    seen = as_its_client_sees_it(order)
    assert seen["payment"] == {
        "authorized": "20.00",
        "captured": "0.00",
        "voided": "20.00",
        "refunded": "0.00",
    }
    assert Payment.objects.get(order_id=order.id).status == "voided"
    # The fake provider cannot see a dashboard: its hold stays open there (check_invariants
    # skips the money of an order undone by hand for that reason).
    assert ProviderAuthorization.objects.get(reference=str(order.id)).status == "authorized"
    # Recording it again changes nothing.
    from payments.services import payment_void_done_by_hand

    before = Payment.objects.values().get(order_id=order.id)
    payment_void_done_by_hand(order_id=order.id)
    assert Payment.objects.values().get(order_id=order.id) == before


def test_a_shipment_cancelled_by_hand_reads_cancelled_and_the_rest_is_undone(
    customer, ops_api, worker_factory, wait_for
):
    """pm_card_capture_declined, every carrier cancel failing: the saga stops at the undo of
    arrange_shipment. Marked done by hand, the client reads the shipment cancelled (not
    arranged with a tracking number for a cancelled order), and the worker voids the hold and
    releases the stock by itself."""
    failing_worker(worker_factory, **{"shipping.cancel": {"error": 1.0}})
    make_product("lamp", price="10.00", stock=5)
    order = place(customer, [("lamp", 1)], payment_method="pm_card_capture_declined")
    order = waiting_on_undo(order, "arrange_shipment", wait_for)
    assert as_its_client_sees_it(order)["shipment"]["status"] == "arranged"

    undo_done(ops_api, order, "arrange_shipment")
    shipment = Shipment.objects.get(order_id=order.id)
    assert (shipment.status, shipment.cancelled_by_key) == (
        ShipmentStatus.CANCELLED,
        f"saga:{order.saga_id}:arrange_shipment:undo",
    )
    order = wait_for(
        lambda: (o := fresh(order)).status == OrderStatus.CANCELLED and o,
        timeout=60,
        describe=describe(order),
    )
    assert order.cancellation_reason == "payment_declined"
    seen = as_its_client_sees_it(order)
    assert seen["shipment"]["status"] == "cancelled"
    assert (seen["payment"]["authorized"], seen["payment"]["voided"]) == ("10.00", "10.00")
    assert stock("lamp") == (5, 0)
    assert invariants_hold().rstrip().endswith("no violations")


def test_a_refund_done_by_hand_reads_refunded_and_the_void_after_it_changes_nothing(
    customer, ops_api, worker_factory, wait_for
):
    """pm_card_refund_fails whose capture took effect but never answered: the saga undoes the
    capture and every refund fails. Marked done by hand, the client reads the amount
    refunded; the void below it fails too (the same card), and marked done by hand it leaves
    the refunded payment as it is (nothing voided: the hold was taken, then given back)."""
    failing_worker(worker_factory, **{"payments.capture": {"lost_response": 1.0}})
    make_product("lamp", price="10.00", stock=5)
    order = place(customer, [("lamp", 1)], payment_method="pm_card_refund_fails")
    order = waiting_on_undo(order, "capture_payment", wait_for)
    assert as_its_client_sees_it(order)["payment"]["captured"] == "10.00"

    undo_done(ops_api, order, "capture_payment")
    order = waiting_on_undo(order, "authorize_payment", wait_for)
    refunded = {"authorized": "10.00", "captured": "10.00", "voided": "0.00", "refunded": "10.00"}
    assert as_its_client_sees_it(order)["payment"] == refunded
    assert as_its_client_sees_it(order)["shipment"]["status"] == "cancelled"  # by the worker

    undo_done(ops_api, order, "authorize_payment")
    order = wait_for(
        lambda: (o := fresh(order)).status == OrderStatus.CANCELLED and o,
        timeout=60,
        describe=describe(order),
    )
    assert order.cancellation_reason == "step_failed"
    assert as_its_client_sees_it(order)["payment"] == refunded
    assert Payment.objects.get(order_id=order.id).status == "refunded"
    assert stock("lamp") == (5, 0)
    assert invariants_hold().rstrip().endswith("no violations")


def test_a_release_done_by_hand_gives_the_stock_back(customer, ops_api, worker_factory, wait_for):
    """Every release of the reservation failing, to AQ: the saga stops at the undo of
    reserve_inventory with the stock held. Nobody can give stock back by hand (reserved is
    never edited), so marking it done releases the reservation under its undo key: the units
    are available again, not held for good by a cancelled order."""
    failing_worker(worker_factory, **{"inventory.release": {"error": 1.0}})
    make_product("lamp", price="10.00", stock=5)
    order = place(customer, [("lamp", 2)], country="AQ")
    order = waiting_on_undo(order, "reserve_inventory", wait_for)
    assert stock("lamp") == (5, 2)

    undo_done(ops_api, order, "reserve_inventory")
    order = fresh(order)  # nothing left to undo: settled by the operation itself
    assert (order.status, order.cancellation_reason) == ("cancelled", "shipping_unavailable")
    assert stock("lamp") == (5, 0)
    reservation = Reservation.objects.get(order_id=order.id)
    assert (reservation.status, reservation.settled_by_key) == (
        ReservationStatus.RELEASED,
        f"saga:{order.saga_id}:reserve_inventory:undo",
    )
    product = api_client_for(order.owner).get("/api/v1/products/lamp/").json()
    assert (product["reserved"], product["available"]) == (0, 5)
    assert as_its_client_sees_it(order)["payment"]["voided"] == "20.00"  # by the worker
    assert invariants_hold().rstrip().endswith("no violations")


def test_undo_done_is_refused_for_an_undo_the_saga_does_not_wait_on(stuck_order, ops_api):
    """Another step: 409 not_waiting_on_undo naming the undo it waits on; no note: 400;
    nothing changes."""
    url = f"{SAGAS}{stuck_order.saga_id}/undo-done/"
    body = assert_error(
        ops_api.post(url, {"step": "reserve_inventory", "note": "x"}, format="json"),
        409,
        "not_waiting_on_undo",
    )
    assert "authorize_payment" in body["detail"]
    assert_error(ops_api.post(url, {"step": "authorize_payment"}, format="json"), 400)
    assert fresh(stuck_order).saga.state == SagaState.NEEDS_MANUAL
    assert stock("lamp") == (5, 2)


def test_resolve_names_the_effects_in_place_and_a_resolved_order_holds_no_stock(
    stuck_order, ops_api
):
    """Resolve without accept_effects: 409 effects_in_place naming the void not run, and not
    the reservation, which resolving releases (the order saga's on_resolve): naming it told
    the person the stock stayed reserved. With it: resolved, the reservation released, the
    order cancelled with its reason, the timeline keeping only the void, and the invariants
    hold."""
    url = f"{SAGAS}{stuck_order.saga_id}/resolve/"
    body = assert_error(
        ops_api.post(url, {"note": "customer refunded by phone"}, format="json"),
        409,
        "effects_in_place",
    )
    named = " ".join(body["fields"]["accept_effects"])
    assert "authorize_payment (void_authorization" in named
    assert "reserve_inventory" not in named
    assert fresh(stuck_order).saga.state == SagaState.NEEDS_MANUAL

    response = ops_api.post(
        url, {"note": "customer refunded by phone", "accept_effects": True}, format="json"
    )
    assert response.status_code == 200, response.content
    order = fresh(stuck_order)
    assert order.saga.state == SagaState.RESOLVED
    assert (order.status, order.cancellation_reason) == ("cancelled", "shipping_unavailable")
    assert stock("lamp") == (5, 0)
    event = order.saga.events.get(kind="ops_resolve")
    assert "customer refunded by phone" in event.detail and "void_authorization" in event.detail
    assert "reserve_inventory" not in event.detail
    assert invariants_hold().rstrip().endswith("no violations")


def test_check_invariants_flags_stock_held_by_a_resolved_saga(stuck_order):
    """A saga resolved the old way (no release) shows up as a stock violation."""
    Saga.objects.filter(pk=stuck_order.saga_id).update(state=SagaState.RESOLVED)
    report = check_invariants(require_settled=True)
    assert any(
        v.guarantee == "stock"
        and "still holds stock" in v.message
        and str(stuck_order.id) in v.subject
        for v in report.violations
    ), report.violations


def test_the_forward_failure_and_the_failing_undo_are_separate_facts(
    stuck_order, ops_api, django_user_model, client
):
    """AQ with a card whose voids fail: the saga failed at arrange_shipment with
    shipping_unavailable (its signature and the failed-step filter find it), and separately
    the undo of authorize_payment kept failing (its own filter); the saga page names
    void_authorization, and the plan says the void answered with an error."""
    saga = fresh(stuck_order).saga
    assert (saga.failed_step, saga.failure_code, saga.failed_undo) == (
        "arrange_shipment",
        "shipping_unavailable",
        "authorize_payment",
    )
    for query in ("failed_step=arrange_shipment", "failed_undo=authorize_payment"):
        listed = ops_api.get(f"{SAGAS}?{query}").json()["results"]
        assert [s["id"] for s in listed] == [str(saga.id)], query
    assert ops_api.get(f"{SAGAS}?failed_step=authorize_payment").json()["results"] == []
    plan = ops_api.get(f"{SAGAS}{saga.id}/compensation-plan/").json()["compensations"]
    assert plan[0]["compensation"] == "void_authorization"
    assert plan[0]["why"].startswith("it took effect; its undo answered with an error")
    assert plan[1]["why"] == "it took effect"

    client.force_login(django_user_model.objects.create_superuser("root", "r@example.com", "x"))
    page = client.get(f"/admin/sagas/saga/{saga.id}/change/").content.decode()
    assert "void_authorization, the compensation of authorize_payment" in page
    assert "because arrange_shipment failed with shipping_unavailable" in page
    for query in (
        "failed_step=arrange_shipment",
        "failed_undo=authorize_payment",
        "signature=arrange_shipment:shipping_unavailable",
    ):
        listing = client.get(f"/admin/sagas/saga/?{query}")
        assert str(saga.id)[:8] in listing.content.decode(), query
    assert (
        str(saga.id)[:8]
        not in client.get("/admin/sagas/saga/?failed_step=authorize_payment").content.decode()
    )


def test_the_client_timeline_is_customer_safe_and_staff_see_everything(stuck_order, ops_api):
    """After an operator resolves the stuck order with a note, its client reads the same
    events in customer-safe words: operators as support, no note, no provider error text or
    internal ids; staff read the operator, the note and the provider's error."""
    note = "called Ada, refunded by hand, ticket 4711"
    ops_api.post(
        f"{SAGAS}{stuck_order.saga_id}/resolve/",
        {"note": note, "accept_effects": True},
        format="json",
    )
    url = f"/api/v1/orders/{stuck_order.id}/timeline/?page_size=200"
    mine = api_client_for(stuck_order.owner).get(url).json()["results"]
    staff = ops_api.get(url).json()["results"]
    assert [e["kind"] for e in mine] == [e["kind"] for e in staff]  # the same events
    text = str(mine)
    for secret in ("olivia", "user:", "ticket 4711", "test card", "auth_", "saga:", "Error"):
        assert secret not in text, (secret, text)
    assert {e["actor"] for e in mine} <= {"customer", "support", "system"}
    [resolved] = [e for e in mine if e["kind"] == "ops_resolve"]
    assert (resolved["actor"], resolved["detail"]) == (
        "support",
        "Our support team closed the order",
    )
    [started] = [e for e in mine if e["kind"] == "compensation_started"]
    assert started["detail"] == "Undoing what was done so far (shipping_unavailable)"
    staff_text = str(staff)
    assert "user:olivia" in staff_text and "ticket 4711" in staff_text
    # The provider's own words about the failing void: staff read them, the client does not.
    [failed] = [e for e in staff if e["kind"] == "compensation_failed"]
    assert failed["detail"] and failed["detail"] not in text
