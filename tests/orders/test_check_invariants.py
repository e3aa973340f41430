"""``check_invariants`` reports broken guarantees, one line each, and exits 1 (no worker)."""

from __future__ import annotations

import io
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command

from inventory.models import Product, Reservation, ReservationLine, ReservationStatus
from orders.services import PAYMENT_METHODS
from payments.models import Payment, ProviderAuthorization
from payments.provider import KNOWN_PAYMENT_METHODS
from sagas.models import Saga, SagaState
from shipping.models import Shipment, ShipmentStatus

from .conftest import make_product, place

pytestmark = pytest.mark.django_db


def run(*args: str) -> tuple[str, int]:
    out = io.StringIO()
    try:
        call_command("check_invariants", *args, stdout=out)
    except CommandError as exc:
        return out.getvalue(), exc.returncode
    return out.getvalue(), 0


def finish(order, state: str, failure_code: str = "") -> None:
    Saga.objects.filter(pk=order.saga_id).update(state=state, failure_code=failure_code)


def test_an_empty_database_has_no_violations():
    """Nothing to check is fine: a summary line and exit status 0."""
    out, code = run("--require-settled")
    assert code == 0
    assert out.strip().splitlines()[-1].startswith("check_invariants: 0 orders")
    assert "no violations" in out


def test_orders_validate_payment_methods_exactly_as_the_provider_knows_them():
    """The orders app refuses up front exactly the methods the provider would not know."""
    assert set(PAYMENT_METHODS) == KNOWN_PAYMENT_METHODS


def test_a_confirmed_order_with_nothing_behind_it_breaks_money_stock_and_shipping(customer):
    """A confirmed order with no capture, no committed stock and no shipment is reported under
    each guarantee, and the command exits 1."""
    make_product("lamp", price="19.90", stock=5)
    order = place(customer, [("lamp", 2)])
    finish(order, SagaState.SUCCEEDED)

    out, code = run()

    assert code == 1
    lines = out.strip().splitlines()
    violations = lines[:-1]
    assert any(v.startswith("[money]") and str(order.id) in v for v in violations)
    assert any(v.startswith("[stock]") and "committed reservations" in v for v in violations)
    assert any(v.startswith("[shipping]") and "active shipments" in v for v in violations)
    assert lines[-1].endswith(f"{len(violations)} violations")


def test_a_cancelled_order_with_money_stock_or_a_shipment_left_is_reported(customer):
    """Captured-not-refunded money, an open authorization, held stock and an active shipment
    of a cancelled order are each a violation."""
    lamp = make_product("lamp", price="10.00", stock=5)
    order = place(customer, [("lamp", 1)])
    finish(order, SagaState.COMPENSATED, "customer_cancelled")
    ProviderAuthorization.objects.create(
        id="auth_test",
        reference=str(order.id),
        currency="EUR",
        amount_minor=1000,
        captured_minor=1000,
        status="captured",
        payment_method="pm_card_visa",
    )
    reservation = Reservation.objects.create(key="k1", order_id=order.id)
    ReservationLine.objects.create(reservation=reservation, product=lamp, quantity=1)
    Product.objects.filter(pk=lamp.pk).update(reserved=1)
    Shipment.objects.create(key="k2", order_id=order.id, status=ShipmentStatus.ARRANGED)

    out, code = run()

    assert code == 1
    assert "captured 1000 but refunded 0" in out
    assert "still holds stock" in out
    assert "active shipment(s), expected none" in out


def test_reserved_must_match_held_reservations():
    """A product whose reserved count disagrees with its held reservations is reported."""
    make_product("lamp", stock=5)
    Product.objects.filter(sku="lamp").update(reserved=2)

    out, code = run()

    assert code == 1
    assert "[stock] product lamp: reserved is 2 but held reservations hold 0" in out


def test_needs_attention_may_hold_stock_but_in_flight_orders_fail_require_settled(customer):
    """Stock held for a needs_attention order is expected; an order still processing is only a
    violation with --require-settled."""
    lamp = make_product("lamp", stock=5)
    stuck = place(customer, [("lamp", 1)])
    finish(stuck, SagaState.NEEDS_MANUAL, "shipping_unavailable")
    reservation = Reservation.objects.create(key="k1", order_id=stuck.id)
    ReservationLine.objects.create(reservation=reservation, product=lamp, quantity=1)
    Product.objects.filter(pk=lamp.pk).update(reserved=1)
    Payment.objects.create(order_id=stuck.id, currency="EUR", amount=Decimal("10.00"))
    running = place(customer, [("lamp", 1)])

    assert run()[1] == 0
    out, code = run("--require-settled")
    assert code == 1
    assert f"[settled] order {running.id} (processing): not settled" in out
    assert str(stuck.id) not in out
    assert Reservation.objects.get(pk=reservation.pk).status == ReservationStatus.HELD


def test_the_summary_counts_an_order_waiting_for_its_client_as_requires_action(customer):
    """The status the API shows: a saga parked on a client-facing signal is requires_action."""
    make_product("lamp", stock=5)
    waiting = place(customer, [("lamp", 1)])
    Saga.objects.filter(pk=waiting.saga_id).update(waiting_for="3ds_confirmed")
    place(customer, [("lamp", 1)])
    out, code = run()
    assert code == 0
    assert "2 orders (1 processing, 1 requires_action" in out, out


def test_what_a_person_vouched_for_is_listed_apart_and_not_counted(customer):
    """A saga resolved accepting the effects in place (pm_card_refund_fails: every void failed,
    so the hold stays open) is vouched for by hand: the fake provider's ledger cannot see a void
    done in a real provider's dashboard, so its cancelled order's open authorization and active
    shipment are not violations. They were skipped without a word, so the run said "no
    violations" of an order whose card was still held: they are listed now, apart, and the
    summary counts the order; the exit status stays 0."""
    make_product("lamp", price="10.00", stock=5)
    order = place(customer, [("lamp", 1)])
    finish(order, SagaState.RESOLVED, "step_failed")
    ProviderAuthorization.objects.create(
        id="auth_held",
        reference=str(order.id),
        currency="EUR",
        amount_minor=1000,
        status="authorized",
        payment_method="pm_card_refund_fails",
    )
    Shipment.objects.create(key="k-vouched", order_id=order.id, status=ShipmentStatus.ARRANGED)

    out, code = run("--require-settled")

    assert code == 0, out
    lines = out.strip().splitlines()
    subject = f"order {order.id} (cancelled)"
    assert lines[:-1] == [
        f"vouched for by hand, not counted: [money] {subject}: open authorization auth_held",
        f"vouched for by hand, not counted: [shipping] {subject}: 1 active shipment(s), "
        "expected none",
    ], out
    assert lines[-1].endswith(
        ", 1 cancelled order vouched for by hand with effects left (listed, not counted): "
        "no violations"
    ), lines[-1]
