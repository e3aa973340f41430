"""Each deterministic outcome of the order saga (docs/design.md), end to end through a real worker.

Every test places real orders, lets a real ``celery -A config worker`` run their sagas against
the fake providers, and checks what the client sees (status and reason) and what actually
happened to money, stock and shipments, then runs ``check_invariants``.
"""

from __future__ import annotations

import io
import json
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.utils import timezone

from inventory.models import Product, Reservation, ReservationStatus
from orders.selectors import OrderStatus
from orders.services import order_request_cancel
from payments.models import Payment, ProviderAuthorization
from sagas.exceptions import SagaOperationRefused
from sagas.models import SagaState
from shipping.models import Shipment, ShipmentStatus

from .conftest import describe, fresh, make_product, place

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def stock(sku: str) -> tuple[int, int]:
    p = Product.objects.get(sku=sku)
    return p.stock_on_hand, p.reserved


def payment_of(order) -> Payment | None:
    return Payment.objects.filter(order_id=order.id).first()


def authorizations_of(order) -> list[ProviderAuthorization]:
    return list(ProviderAuthorization.objects.filter(reference=str(order.id)))


def shipments_of(order) -> list[Shipment]:
    return list(Shipment.objects.filter(order_id=order.id))


def assert_invariants_hold() -> None:
    out = io.StringIO()
    call_command("check_invariants", "--require-settled", stdout=out)  # raises on violations
    assert out.getvalue().rstrip().endswith("no violations"), out.getvalue()


def faults(**ops: dict) -> dict[str, str]:
    """Worker env for ``SAGA_FAULTS``: ``faults(**{"shipping.arrange": {...}})``."""
    return {"SAGA_FAULTS": json.dumps(ops)}


#: Worker env for a test that must act while a slowed step is in flight: step timeouts of
#: seconds more than the suite's 3 s, so the slowed call can last long enough that a slow
#: test process still acts inside it.
ROOMY_STEPS = {"SAGA_STEP_TIMEOUT": "10"}


def test_happy_path_confirms_captures_the_total_commits_stock_and_ships(
    customer, celery_worker, settle
):
    """pm_card_visa to a served country: confirmed; the total captured once and nothing
    refunded; stock_on_hand fell by the quantities and nothing stays reserved; one arranged
    shipment with a carrier and a tracking number."""
    make_product("lamp", price="19.90", stock=5)
    make_product("desk", price="249.00", stock=2)

    order = settle(place(customer, [("lamp", 2), ("desk", 1)]))

    assert (order.status, order.step, order.cancellation_reason) == ("confirmed", None, None)
    assert order.saga.state == SagaState.SUCCEEDED
    payment = payment_of(order)
    assert payment.authorized_amount == payment.captured_amount == order.total == Decimal("288.80")
    assert payment.refunded_amount == payment.voided_amount == Decimal("0.00")
    [auth] = authorizations_of(order)
    assert (auth.amount_minor, auth.captured_minor, auth.refunded_minor) == (28880, 28880, 0)
    assert stock("lamp") == (3, 0)
    assert stock("desk") == (1, 0)
    [shipment] = shipments_of(order)
    assert shipment.status == ShipmentStatus.ARRANGED
    assert shipment.carrier and shipment.tracking_number
    assert Reservation.objects.get(order_id=order.id).status == ReservationStatus.COMMITTED
    assert_invariants_hold()


def test_more_than_available_is_cancelled_out_of_stock_and_touches_nothing(
    customer, celery_worker, settle
):
    """Ordering more than available: cancelled with out_of_stock, before any money moved, no
    stock held and no shipment."""
    make_product("lamp", stock=5)
    make_product("desk", stock=1)

    order = settle(place(customer, [("lamp", 1), ("desk", 2)]))

    assert (order.status, order.cancellation_reason) == ("cancelled", "out_of_stock")
    assert not authorizations_of(order)
    assert payment_of(order) is None
    assert stock("lamp") == (5, 0)
    assert stock("desk") == (1, 0)
    assert not shipments_of(order)
    assert_invariants_hold()


@pytest.mark.parametrize(("units", "orders"), [(1, 2), (3, 8)])
def test_orders_racing_for_the_last_units_never_oversell(
    customer, celery_worker, settle, units, orders
):
    """N orders race for fewer units: exactly as many are confirmed as there were units, the
    rest are cancelled out_of_stock, and stock ends at zero with nothing reserved."""
    make_product("lamp", price="5.00", stock=units)

    placed = [place(customer, [("lamp", 1)]) for _ in range(orders)]
    settled = [settle(o) for o in placed]

    outcomes = sorted((o.status, o.cancellation_reason or "") for o in settled)
    assert outcomes == sorted(
        [("confirmed", "")] * units + [("cancelled", "out_of_stock")] * (orders - units)
    )
    assert stock("lamp") == (0, 0)
    assert Payment.objects.filter(captured_amount=Decimal("5.00")).count() == units
    assert_invariants_hold()


def test_declined_authorization_cancels_and_releases_the_stock(customer, celery_worker, settle):
    """pm_card_declined: cancelled with payment_declined; nothing authorized; the reservation
    released; no carrier booked."""
    make_product("lamp", stock=5)

    order = settle(place(customer, [("lamp", 2)], payment_method="pm_card_declined"))

    assert (order.status, order.cancellation_reason) == ("cancelled", "payment_declined")
    assert not authorizations_of(order)
    assert payment_of(order).authorized_amount == Decimal("0.00")
    assert stock("lamp") == (5, 0)
    assert Reservation.objects.get(order_id=order.id).status == ReservationStatus.RELEASED
    assert not shipments_of(order)
    assert_invariants_hold()


def test_declined_capture_voids_cancels_the_shipment_and_releases_the_stock(
    customer, celery_worker, settle
):
    """pm_card_capture_declined: cancelled with payment_declined after the authorization is
    voided, the shipment cancelled and the reservation released, in reverse order."""
    make_product("lamp", price="10.00", stock=5)

    order = settle(place(customer, [("lamp", 2)], payment_method="pm_card_capture_declined"))

    assert (order.status, order.cancellation_reason) == ("cancelled", "payment_declined")
    payment = payment_of(order)
    assert payment.authorized_amount == payment.voided_amount == Decimal("20.00")
    assert payment.captured_amount == Decimal("0.00")
    [auth] = authorizations_of(order)
    assert auth.status == "voided" and auth.captured_minor == 0
    [shipment] = shipments_of(order)
    assert shipment.status == ShipmentStatus.CANCELLED
    assert stock("lamp") == (5, 0)
    undone = list(
        order.saga.events.filter(kind="compensation_succeeded").values_list("step", flat=True)
    )
    assert undone == ["arrange_shipment", "authorize_payment", "reserve_inventory"]
    assert_invariants_hold()


def test_unserved_country_cancels_with_shipping_unavailable(customer, celery_worker, settle):
    """Country AQ: cancelled with shipping_unavailable; authorization voided; stock released;
    no active shipment."""
    make_product("lamp", price="10.00", stock=5)

    order = settle(place(customer, [("lamp", 1)], country="AQ"))

    assert (order.status, order.cancellation_reason) == ("cancelled", "shipping_unavailable")
    [auth] = authorizations_of(order)
    assert auth.status == "voided"
    assert payment_of(order).captured_amount == Decimal("0.00")
    assert stock("lamp") == (5, 0)
    assert not [s for s in shipments_of(order) if s.status == ShipmentStatus.ARRANGED]
    assert_invariants_hold()


def test_a_void_that_keeps_failing_needs_attention_with_the_stock_still_held(
    customer, celery_worker, settle
):
    """pm_card_refund_fails to AQ: shipping says no, the void fails on every attempt, so the
    saga waits for a person (needs_attention); the ladder stopped there, so the reservation is
    still held and the authorization still open. The invariants allow exactly that."""
    make_product("lamp", price="10.00", stock=5)

    order = settle(
        place(customer, [("lamp", 2)], payment_method="pm_card_refund_fails", country="AQ")
    )

    assert order.status == OrderStatus.NEEDS_ATTENTION
    assert order.cancellation_reason == "shipping_unavailable"  # why it was being undone
    assert order.saga.state == SagaState.NEEDS_MANUAL
    assert order.saga.failure_code == "shipping_unavailable"
    # What failed forward, and which undo kept failing: two facts, both kept.
    assert (order.saga.failed_step, order.saga.failed_undo) == (
        "arrange_shipment",
        "authorize_payment",
    )
    assert stock("lamp") == (5, 2)
    assert Reservation.objects.get(order_id=order.id).status == ReservationStatus.HELD
    [auth] = authorizations_of(order)
    assert auth.status == "authorized"
    assert_invariants_hold()


def test_customer_cancel_before_capture_is_accepted_and_undoes_everything(
    customer, worker_factory, settle, wait_for
):
    """A cancel while the shipment is being arranged is accepted; at the next step boundary the
    saga compensates: cancelled with customer_cancelled, nothing captured, authorization
    voided, shipment cancelled, stock released."""
    slow = {"latency_ms": [4000, 4000]}
    worker_factory(
        faults(**{"shipping.arrange": slow, "payments.capture": slow}) | ROOMY_STEPS,
        exclusive=True,
    )
    make_product("lamp", price="10.00", stock=5)
    order = place(customer, [("lamp", 1)])

    # The carrier booking is in flight: a worker holds it (its own, longer timeout gives it a
    # doorbell of its own, so the saga may sit at the step a moment before a worker takes it).
    wait_for(
        lambda: (
            (o := fresh(order)).step == "arrange_shipment"
            and o.saga.lease_until is not None
            and o.saga.lease_until > timezone.now()
        ),
        describe=describe(order),
    )
    order_request_cancel(order=order, actor=customer)
    assert fresh(order).status == OrderStatus.CANCELLING

    order = settle(order)
    assert (order.status, order.cancellation_reason) == ("cancelled", "customer_cancelled")
    assert payment_of(order).captured_amount == Decimal("0.00")
    assert [a.status for a in authorizations_of(order)] == ["voided"]
    assert [s.status for s in shipments_of(order)] == [ShipmentStatus.CANCELLED]
    assert stock("lamp") == (5, 0)
    assert order.saga.events.filter(kind="cancel_requested", actor="user:ada").exists()
    assert_invariants_hold()


def test_customer_cancel_at_the_pivot_is_refused_and_the_order_confirms(
    customer, worker_factory, settle, wait_for
):
    """Once capture_payment has run (the saga is at confirm_order), a cancel is refused with
    pivot_reached and the order still ends confirmed."""
    worker_factory(
        faults(**{"inventory.commit": {"latency_ms": [4000, 4000]}}) | ROOMY_STEPS, exclusive=True
    )
    make_product("lamp", price="10.00", stock=5)
    order = place(customer, [("lamp", 1)])

    wait_for(lambda: fresh(order).step == "confirm_order", describe=describe(order))
    with pytest.raises(SagaOperationRefused) as refused:
        order_request_cancel(order=order, actor=customer)

    assert refused.value.code == "pivot_reached"
    assert settle(order).status == OrderStatus.CONFIRMED
    assert payment_of(order).captured_amount == Decimal("10.00")
    assert_invariants_hold()


def test_customer_cancel_after_confirmation_is_refused(customer, celery_worker, settle):
    """A confirmed order cannot be cancelled: the engine refuses and nothing changes."""
    make_product("lamp", price="10.00", stock=5)
    order = settle(place(customer, [("lamp", 1)]))

    with pytest.raises(SagaOperationRefused) as refused:
        order_request_cancel(order=order, actor=customer)

    assert refused.value.code == "not_running"
    assert fresh(order).status == OrderStatus.CONFIRMED
    assert stock("lamp") == (4, 0)
    assert_invariants_hold()


def test_a_saga_past_its_deadline_is_cancelled_timed_out(
    customer, worker_factory, settle, settings
):
    """With a deadline shorter than a slow reservation, the saga is timed out at the next step
    boundary: cancelled with timed_out, the reservation released, no money moved."""
    settings.SAGA_DEADLINE = 0.5  # read by saga_start in this process
    worker_factory(faults(**{"inventory.reserve": {"latency_ms": [1000, 1000]}}), exclusive=True)
    make_product("lamp", price="10.00", stock=5)

    order = settle(place(customer, [("lamp", 1)]))

    assert (order.status, order.cancellation_reason) == ("cancelled", "timed_out")
    assert not authorizations_of(order)
    assert stock("lamp") == (5, 0)
    assert not shipments_of(order)
    assert_invariants_hold()
