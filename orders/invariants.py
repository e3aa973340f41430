"""Guarantees 1 to 4 of the README's Guarantees section, checked over the whole database.

Used by ``manage.py check_invariants`` (operators, the chaos run, the benchmark) and by tests.
Each check reads the participants' own tables, because that is where the truth of money, stock
and shipments is: the provider's ledger for money (with our ``Payment`` record cross-checked
against it), reservations and products for stock, shipments for shipping.

Everything is read in one REPEATABLE READ transaction on PostgreSQL, so a check run beside
live workers sees one consistent snapshot instead of reporting a half-recorded step as a
violation. Orders still in flight (``processing``/``cancelling``) are only reported when
``require_settled`` is set (guarantee 1); the per-order checks apply to settled orders, and
the per-product checks apply always.

**Guarantee 3 ("stock_on_hand fell by exactly the quantities of its confirmed orders")** needs
the stock each product started with, which the database does not keep (staff may also restock
a product). It is checked here in an equivalent form that needs no baseline, given that
inventory changes ``stock_on_hand`` only by committing a reservation (``stock_on_hand`` and
``reserved`` both fall by its lines):

* every confirmed order has exactly one committed reservation, whose lines are the order's
  items (same skus, same quantities), and no held one;
* every committed reservation belongs to a confirmed order (or one a person is looking at:
  ``needs_attention`` after the pivot);
* each product's ``reserved`` equals the sum of its held reservation lines, and held
  reservations belong only to ``needs_attention`` orders (or orders still in flight): a
  saga a person resolved holds none (its order is ``cancelled`` or ``confirmed``);
* ``0 <= reserved <= stock_on_hand`` (``available`` is never negative).

Tests that know the starting stock additionally assert the absolute form.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.db import connection, transaction
from django.db.models import Sum

from config.money import to_minor
from inventory.models import Product, Reservation, ReservationLine, ReservationStatus
from orders.models import Order, OrderItem
from orders.selectors import OrderStatus, order_status
from payments.models import (
    AuthorizationStatus,
    OperationKind,
    OperationOutcome,
    Payment,
    PaymentStatus,
    ProviderAuthorization,
    ProviderOperation,
)
from sagas.models import SagaState, SagaStep, StepStatus
from shipping.models import Shipment, ShipmentStatus

ZERO = Decimal("0.00")
IN_FLIGHT = (OrderStatus.PROCESSING, OrderStatus.REQUIRES_ACTION, OrderStatus.CANCELLING)


@dataclass(frozen=True)
class Violation:
    #: "settled" (guarantee 1), "money" (2), "stock" (3) or "shipping" (4).
    guarantee: str
    subject: str
    message: str

    def __str__(self) -> str:
        return f"[{self.guarantee}] {self.subject}: {self.message}"


@dataclass
class Report:
    violations: list[Violation]
    orders_by_status: Counter
    products: int
    #: What would be money or shipping violations of cancelled orders a person vouched for (an
    #: undo marked done by hand, a saga resolved accepting what was in place): not counted, as
    #: the fake providers' ledgers cannot see what was done in a real provider's dashboard,
    #: but listed, so what was accepted stays in sight.
    vouched: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        counts = ", ".join(f"{self.orders_by_status.get(s, 0)} {s}" for s in OrderStatus.ALL)
        total = sum(self.orders_by_status.values())
        verdict = (
            "no violations"
            if self.ok
            else f"{len(self.violations)} violation{'s' if len(self.violations) != 1 else ''}"
        )
        vouched = ""
        if self.vouched:
            n = len({v.subject for v in self.vouched})
            vouched = (
                f", {n} cancelled order{'s' if n != 1 else ''} vouched for by hand with effects "
                "left (listed, not counted)"
            )
        return (
            f"check_invariants: {total} orders ({counts}), {self.products} products{vouched}: "
            f"{verdict}"
        )


def check_invariants(*, require_settled: bool = False) -> Report:
    """Check the guarantees over the whole database and return every violation found."""
    outermost = not connection.in_atomic_block
    with transaction.atomic():
        # Only the first statement of a real transaction may set it (not inside a caller's).
        if outermost and connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        return _check(require_settled=require_settled)


def _check(*, require_settled: bool) -> Report:
    violations: list[Violation] = []

    vouched_for: list[Violation] = []

    def bad(guarantee: str, subject: str, message: str) -> None:
        violations.append(Violation(guarantee, subject, message))

    # -- orders and their derived status ------------------------------------------------------
    orders: dict[str, Mapping[str, Any]] = {}
    status_of: dict[str, str] = {}
    for order_row in Order.objects.values(
        "id",
        "total",
        "currency",
        "saga_id",
        "saga__state",
        "saga__cancel_reason",
        "saga__failure_code",
        "saga__escalated_from",
        "saga__waiting_for",
    ).iterator(chunk_size=5000):
        oid = str(order_row["id"])
        orders[oid] = order_row
        status_of[oid] = order_status(
            saga_state=order_row["saga__state"],
            cancel_reason=order_row["saga__cancel_reason"],
            escalated_from=order_row["saga__escalated_from"],
            failure_code=order_row["saga__failure_code"],
            waiting_for=order_row["saga__waiting_for"],
        )
    items: dict[str, dict[str, int]] = defaultdict(dict)
    for order_id, sku, qty in OrderItem.objects.values_list("order_id", "sku", "quantity").iterator(
        chunk_size=5000
    ):
        items[str(order_id)][sku] = qty

    def label(oid: str) -> str:
        status = status_of.get(oid)
        return f"order {oid} ({status})" if status else f"unknown order {oid}"

    # -- 1. every order settled -----------------------------------------------------------------
    if require_settled:
        for oid, status in status_of.items():
            if status in IN_FLIGHT:
                bad("settled", label(oid), f"not settled (saga {orders[oid]['saga__state']})")

    settled = {oid for oid, s in status_of.items() if s not in IN_FLIGHT}
    # Orders whose money a person vouched for outside the system: they marked an undo (say a
    # void) done by hand, or resolved the saga accepting what was still in place. The fake
    # providers' ledgers cannot know about a void or a cancelled booking done in a real
    # provider's dashboard, so what the money and shipment checks of such a cancelled order
    # find is listed apart (Report.vouched), not counted; the stock checks count as usual.
    by_hand = set(
        SagaStep.objects.filter(status=StepStatus.COMPENSATED_BY_HAND).values_list(
            "saga_id", flat=True
        )
    )
    vouched = {
        oid
        for oid, row in orders.items()
        if row["saga__state"] == SagaState.RESOLVED or row["saga_id"] in by_hand
    }
    confirmed = {oid for oid, s in status_of.items() if s == OrderStatus.CONFIRMED}
    cancelled = {oid for oid, s in status_of.items() if s == OrderStatus.CANCELLED}

    # -- 2. money -----------------------------------------------------------------------------
    auths: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for auth_row in ProviderAuthorization.objects.values(
        "id", "reference", "currency", "amount_minor", "captured_minor", "refunded_minor", "status"
    ).iterator(chunk_size=5000):
        auths[auth_row["reference"]].append(auth_row)
    op_counts: Counter = Counter()
    for ref, kind in (
        ProviderOperation.objects.filter(
            outcome=OperationOutcome.SUCCEEDED,
            kind__in=[OperationKind.AUTHORIZE, OperationKind.CAPTURE],
        )
        .values_list("reference", "kind")
        .iterator(chunk_size=5000)
    ):
        op_counts[(ref, kind)] += 1
    payments = {
        str(row["order_id"]): row
        for row in Payment.objects.values(
            "order_id",
            "currency",
            "authorized_amount",
            "captured_amount",
            "voided_amount",
            "refunded_amount",
            "status",
        ).iterator(chunk_size=5000)
    }

    for (ref, kind), n in sorted(op_counts.items()):
        if n > 1:
            bad("money", label(ref), f"the provider recorded {n} successful {kind} operations")
    for ref, rows in sorted(auths.items()):
        if len(rows) > 1:
            bad("money", label(ref), f"the provider holds {len(rows)} authorizations")
        if ref not in orders:
            for auth in rows:
                if auth["status"] == AuthorizationStatus.AUTHORIZED or (
                    auth["captured_minor"] != auth["refunded_minor"]
                ):
                    bad("money", label(ref), f"provider authorization {auth['id']} has no order")

    for oid in sorted(settled):
        order = orders[oid]
        status = status_of[oid]
        provider = auths.get(oid, [])
        captured = sum(a["captured_minor"] for a in provider)
        refunded = sum(a["refunded_minor"] for a in provider)
        open_auths = [a["id"] for a in provider if a["status"] == AuthorizationStatus.AUTHORIZED]
        payment = payments.get(oid)
        if status == OrderStatus.CONFIRMED:
            total = to_minor(order["total"], order["currency"])
            if captured != total or refunded != 0:
                bad(
                    "money",
                    label(oid),
                    f"provider captured {captured} and refunded {refunded} minor units; "
                    f"expected {total} captured and nothing refunded",
                )
            if any(a["currency"] != order["currency"] for a in provider):
                bad("money", label(oid), "provider authorization in another currency")
            if payment is None:
                bad("money", label(oid), "no Payment record")
            elif payment["captured_amount"] != order["total"] or payment["refunded_amount"]:
                bad(
                    "money",
                    label(oid),
                    f"Payment says captured {payment['captured_amount']} refunded "
                    f"{payment['refunded_amount']}; expected {order['total']} and 0",
                )
        elif status == OrderStatus.CANCELLED:
            found: list[str] = []
            if captured != refunded:
                found.append(f"provider captured {captured} but refunded {refunded} minor units")
            if open_auths:
                found.append(f"open authorization {', '.join(open_auths)}")
            if payment is not None:
                if payment["captured_amount"] != payment["refunded_amount"]:
                    found.append(
                        f"Payment says captured {payment['captured_amount']} but refunded "
                        f"{payment['refunded_amount']}"
                    )
                if payment["status"] == PaymentStatus.AUTHORIZED:
                    found.append("Payment is still authorized (not voided)")
            into = vouched_for if oid in vouched else violations
            into += [Violation("money", label(oid), message) for message in found]

    # -- 3. stock -----------------------------------------------------------------------------
    products = {
        row["id"]: row for row in Product.objects.values("id", "sku", "stock_on_hand", "reserved")
    }
    held_by_product = {
        pid: qty
        for pid, qty in ReservationLine.objects.filter(reservation__status=ReservationStatus.HELD)
        .values_list("product_id")
        .annotate(qty=Sum("quantity"))
    }
    for pid, p in sorted(products.items(), key=lambda kv: kv[1]["sku"]):
        subject = f"product {p['sku']}"
        if p["stock_on_hand"] < 0 or p["reserved"] < 0 or p["reserved"] > p["stock_on_hand"]:
            bad(
                "stock",
                subject,
                f"stock_on_hand {p['stock_on_hand']}, reserved {p['reserved']}: "
                "available is negative or a count is below zero",
            )
        held = held_by_product.get(pid, 0)
        if p["reserved"] != held:
            bad("stock", subject, f"reserved is {p['reserved']} but held reservations hold {held}")

    sku_of = {pid: p["sku"] for pid, p in products.items()}
    reservations: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    lines_of: dict[str, dict[str, int]] = defaultdict(dict)
    for rid, pid, qty in ReservationLine.objects.values_list(
        "reservation_id", "product_id", "quantity"
    ).iterator(chunk_size=5000):
        lines_of[str(rid)][sku_of.get(pid, f"#{pid}")] = qty
    for reservation_row in (
        Reservation.objects.filter(tombstone=False)
        .exclude(status=ReservationStatus.RELEASED)
        .values("id", "order_id", "status")
        .iterator(chunk_size=5000)
    ):
        reservations[str(reservation_row["order_id"])].append(reservation_row)

    for oid, rows in sorted(reservations.items()):
        current = status_of.get(oid)
        if len(rows) > 1:
            bad("stock", label(oid), f"{len(rows)} unreleased reservations")
        for r in rows:
            if r["status"] == ReservationStatus.HELD and current not in (
                OrderStatus.NEEDS_ATTENTION,
                *IN_FLIGHT,
            ):
                bad("stock", label(oid), f"reservation {r['id']} still holds stock")
            if r["status"] == ReservationStatus.COMMITTED and current not in (
                OrderStatus.CONFIRMED,
                OrderStatus.NEEDS_ATTENTION,
            ):
                bad("stock", label(oid), f"reservation {r['id']} was committed (stock taken)")
    for oid in sorted(confirmed):
        committed = [
            r for r in reservations.get(oid, []) if r["status"] == ReservationStatus.COMMITTED
        ]
        if len(committed) != 1:
            bad("stock", label(oid), f"{len(committed)} committed reservations, expected 1")
            continue
        taken = lines_of[str(committed[0]["id"])]
        if taken != items.get(oid, {}):
            bad(
                "stock",
                label(oid),
                f"committed reservation took {sorted(taken.items())} but the order has "
                f"{sorted(items.get(oid, {}).items())}",
            )

    # -- 4. shipping --------------------------------------------------------------------------
    arranged: Counter = Counter(
        str(oid)
        for oid in Shipment.objects.filter(status=ShipmentStatus.ARRANGED, order_id__isnull=False)
        .values_list("order_id", flat=True)
        .iterator(chunk_size=5000)
    )
    for oid, n in sorted(arranged.items()):
        if oid not in orders:
            bad("shipping", label(oid), f"{n} active shipment(s) for no order")
        elif n > 1:
            bad("shipping", label(oid), f"{n} active shipments")
    for oid in sorted(confirmed):
        if arranged.get(oid, 0) != 1:
            bad("shipping", label(oid), f"{arranged.get(oid, 0)} active shipments, expected 1")
    for oid in sorted(cancelled):
        if arranged.get(oid, 0):
            shipment = Violation(
                "shipping", label(oid), f"{arranged[oid]} active shipment(s), expected none"
            )
            (vouched_for if oid in vouched else violations).append(shipment)

    return Report(
        violations=violations,
        vouched=vouched_for,
        orders_by_status=Counter(status_of.values()),
        products=len(products),
    )
