"""Writes of orders: place one, ask to cancel one, confirm one (the saga's pivot).

Placing an order is one transaction: the order, its items and its saga commit together, and
the saga's first doorbell rings only on commit (docs/engine.md, "How the engine works"). A
client that got its ``201`` therefore has an order that will settle, whatever happens to the
worker or the broker afterwards.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.db import transaction

from config.db import insert_with_rows
from config.errors import refused_fields
from config.text import trimmed
from inventory import services as inventory_services
from orders import events as order_events
from orders.countries import country_problem
from orders.errors import OrderInvalid
from orders.models import Order, OrderItem
from payments.provider import TEST_CARDS
from sagas.models import Saga, SagaState
from sagas.public import (
    SagaOperationRefused,
    saga_definition_refusal,
    saga_request_cancel,
    saga_start,
)
from webhooks import services as webhook_services

#: The fake provider's test cards (docs/design.md); anything else is refused up front rather
#: than declined by the provider after stock was reserved.
PAYMENT_METHODS = TEST_CARDS
MAX_QUANTITY = 1000
MAX_LINES = 100
MAX_SKU_LENGTH = 64
#: Decimal(12, 2) holds at most this; a bigger total would fail in the database, as a 500.
MAX_TOTAL = Decimal("9999999999.99")
CUSTOMER_CANCELLED = "customer_cancelled"

_NUL_MESSAGE = "Null characters are not allowed."
_ADDRESS_FIELDS = {"name": 200, "line1": 200, "city": 100, "postal_code": 20, "country": 2}
#: What a request to place an order names (docs/api.md); any other name is refused.
ORDER_FIELDS = ("items", "payment_method", "shipping_address")
ITEM_FIELDS = ("sku", "quantity")
#: Names of an order, and of its items, as the API returns them that the server sets: sent
#: with a new order they are ``read_only_field`` (a ``total`` or ``unit_price`` of the client's
#: own is not what it will pay), not ``unknown_field``. ``tests/orders`` checks them against
#: the API's representation.
ORDER_READ_ONLY = {
    "id": "",
    "status": "",
    "step": "",
    "cancellation_reason": "",
    "total": "Read-only: the total is the catalog's prices times the quantities.",
    "currency": "Read-only: an order is in its products' currency.",
    "created_at": "",
    "updated_at": "",
    "saga": "",
    "payment": "",
    "shipment": "",
}
ITEM_READ_ONLY = {
    "unit_price": "Read-only: the unit price is the catalog's when the order is placed."
}


@dataclass
class _Problems:
    """Collects every problem of a request so the client sees them all in one answer."""

    first_code: str = ""
    fields: dict[str, list[str]] | None = None

    def add(self, code: str, field: str, message: str) -> None:
        self.first_code = self.first_code or code
        self.fields = self.fields or {}
        self.fields.setdefault(field, []).append(message)

    def raise_if_any(self) -> None:
        if self.fields:
            count = sum(len(m) for m in self.fields.values())
            first = next(iter(self.fields.items()))
            detail = f"{first[0]}: {first[1][0]}"
            if count > 1:
                detail += f" (and {count - 1} more)"
            raise OrderInvalid(self.first_code, detail, self.fields)


def _refuse_other_fields(
    body_fields: Iterable[str], items: Any, address: Any, problems: _Problems
) -> None:
    """Every name the request carries that an order, an item or an address does not take
    (``unknown_field``) or that the server sets (``read_only_field``), under its path. A
    ``coupon`` or an item's ``price`` is refused rather than ignored, so that no client takes
    an order at the full price for one at the price it sent."""
    for name, code, message in refused_fields(
        body_fields, takes=ORDER_FIELDS, what="an order", read_only=ORDER_READ_ONLY
    ):
        problems.add(code, name, message)
    if (
        isinstance(items, Sequence)
        and not isinstance(items, str | bytes)
        and len(items) <= MAX_LINES
    ):
        for i, item in enumerate(items):
            if isinstance(item, Mapping):
                for name, code, message in refused_fields(
                    item, takes=ITEM_FIELDS, what="an item", read_only=ITEM_READ_ONLY
                ):
                    problems.add(code, f"items[{i}].{name}", message)
    if isinstance(address, Mapping):
        for name, code, message in refused_fields(
            address, takes=tuple(_ADDRESS_FIELDS), what="a shipping address"
        ):
            problems.add(code, f"shipping_address.{name}", message)


def _clean_lines(
    items: Any, problems: _Problems
) -> tuple[dict[str, tuple[int, int]], dict[str, int]]:
    """``(lines, named)``: sku -> (position in the request, quantity) of the well-formed lines,
    and sku -> first position of every well-formed sku, whatever its quantity.

    Each item's sku and quantity are checked apart, so that every problem is reported at once:
    an unknown sku with a bad quantity is both (the caller looks up ``named``), and a sku
    ordered twice is ``duplicate_sku`` whether or not its first line's quantity is valid.
    """
    if items is None or (isinstance(items, list | tuple) and not items):
        problems.add("empty_order", "items", "An order needs at least one item.")
        return {}, {}
    if not isinstance(items, Sequence) or isinstance(items, str | bytes):
        problems.add(
            "invalid_item",
            "items",
            f"Items are a list of objects with sku and quantity, not {_kind(items)}.",
        )
        return {}, {}
    if len(items) > MAX_LINES:
        problems.add("too_many_items", "items", f"At most {MAX_LINES} lines (items) per order.")
        return {}, {}
    lines: dict[str, tuple[int, int]] = {}
    named: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"items[{i}]"
        if not isinstance(item, Mapping):
            problems.add(
                "invalid_item",
                where,
                f"Each item is an object with sku and quantity, not {_kind(item)}.",
            )
            continue
        sku = _clean_sku(item.get("sku"), where, problems)
        if sku is not None:
            if sku in named:
                problems.add(
                    "duplicate_sku", f"{where}.sku", f"{sku!r} appears twice; order it once."
                )
                sku = None
            else:
                named[sku] = i
        quantity = _clean_quantity(item.get("quantity"), where, problems)
        if sku is not None and quantity is not None:
            lines[sku] = (i, quantity)
    return lines, named


def _kind(value: Any) -> str:
    """What a JSON value is, for a message that says a value has the wrong type."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float | Decimal):
        return "a number"
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    return "null" if value is None else type(value).__name__


def _clean_sku(sku: Any, where: str, problems: _Problems) -> str | None:
    if sku is not None and not isinstance(sku, str):
        problems.add("invalid_item", f"{where}.sku", "A sku is a string.")
        return None
    if sku is None or not sku.strip():
        problems.add("invalid_item", f"{where}.sku", "A sku is required.")
        return None
    if "\x00" in sku:
        problems.add("invalid_item", f"{where}.sku", _NUL_MESSAGE)
        return None
    sku = sku.strip()
    if len(sku) > MAX_SKU_LENGTH:
        problems.add("invalid_item", f"{where}.sku", f"At most {MAX_SKU_LENGTH} characters.")
        return None
    return sku


def _clean_quantity(quantity: Any, where: str, problems: _Problems) -> int | None:
    if quantity is None:
        problems.add("invalid_quantity", f"{where}.quantity", "A quantity is required.")
        return None
    if isinstance(quantity, bool) or not isinstance(quantity, int):
        problems.add("invalid_quantity", f"{where}.quantity", "Quantity must be an integer.")
        return None
    if not 1 <= quantity <= MAX_QUANTITY:
        problems.add(
            "invalid_quantity",
            f"{where}.quantity",
            f"Quantity must be between 1 and {MAX_QUANTITY}.",
        )
        return None
    return quantity


def _clean_address(address: Any, problems: _Problems) -> dict[str, str]:
    if not isinstance(address, Mapping):
        fields = "name, line1, city, postal_code and country"
        problems.add(
            "invalid_shipping_address",
            "shipping_address",
            f"A shipping address with {fields} is required."
            if address is None
            else f"A shipping address is an object with {fields}, not {_kind(address)}.",
        )
        return {}
    clean: dict[str, str] = {}
    for name, max_length in _ADDRESS_FIELDS.items():
        value = address.get(name)
        where = f"shipping_address.{name}"
        if value is not None and not isinstance(value, str):
            problems.add("invalid_shipping_address", where, "This field is a string.")
            continue
        if value is None and name in address:
            problems.add("invalid_shipping_address", where, "This field is a string, not null.")
            continue
        # Trimmed of what cannot be seen, not only of spaces: a name of nothing but a
        # zero-width space or a byte-order mark was taken as written.
        value = trimmed(value or "")
        if not value:
            problems.add("invalid_shipping_address", where, "This field is required.")
            continue
        if "\x00" in value:
            problems.add("invalid_shipping_address", where, _NUL_MESSAGE)
            continue
        if name == "country":
            value = value.upper()
            problem = country_problem(value)
            if problem:
                problems.add("invalid_shipping_address", where, problem)
                continue
        elif len(value) > max_length:
            problems.add("invalid_shipping_address", where, f"At most {max_length} characters.")
            continue
        clean[name] = value
    return clean


@transaction.atomic
def order_create(
    *,
    owner,
    items: Sequence[Mapping[str, Any]] | Any,
    payment_method: str | Any,
    shipping_address: Mapping[str, Any] | Any,
    body_fields: Iterable[str] = (),
) -> Order:
    """Validate, price and place an order, and start its saga, in one transaction.

    This is the one place order input is checked, shape and business rules alike, because
    every way of placing an order comes through here (the API passes the request body as it
    came; the benchmarks, chaos and tests call it directly): a rule written once cannot drift
    between layers, and every caller gets the same error codes. The API's
    ``OrderCreateSerializer`` only documents the request body. Hence the ``| Any``: the
    arguments are whatever a caller sent, and are checked here.

    Prices come from the catalog now and are kept on the items, so a later price change does
    not change what the client agreed to pay. Stock is *not* checked here: the saga's
    ``reserve_inventory`` step does that atomically, and an order that loses the race ends
    ``cancelled`` with ``out_of_stock`` like any other business "no".

    ``body_fields`` are the names the request body carried (the API passes them; callers
    without a body need not): a name besides ``items``, ``payment_method`` and
    ``shipping_address`` is refused, as is one an item or the address does not take, and
    these come first: ``unknown_field`` or ``read_only_field`` is the error's code.

    Raises :class:`~orders.errors.OrderInvalid` (code, detail, fields) for bad input.
    """
    problems = _Problems()
    _refuse_other_fields(body_fields, items, shipping_address, problems)
    lines, named = _clean_lines(items, problems)
    address = _clean_address(shipping_address, problems)
    if not isinstance(payment_method, str) or payment_method not in PAYMENT_METHODS:
        if payment_method is None or payment_method == "":
            what = "A payment method is required"
        elif not isinstance(payment_method, str):
            what = f"A payment method is a string, not {_kind(payment_method)}"
        else:
            what = "Unknown payment method"
        problems.add(
            "invalid_payment_method",
            "payment_method",
            f"{what}; use one of {', '.join(PAYMENT_METHODS)}.",
        )

    # The price and currency of each: rows, not Product instances (built on every order).
    products = inventory_services.catalog_prices(named)
    for sku, i in named.items():
        if sku not in products:
            problems.add("unknown_sku", f"items[{i}].sku", f"No product with sku {sku!r}.")
    currencies = {cur for _, cur in products.values()}
    if len(currencies) > 1:
        problems.add(
            "mixed_currency",
            "items",
            f"All items of one order must share a currency; got {', '.join(sorted(currencies))}.",
        )
    problems.raise_if_any()

    quantities = sorted((sku, qty) for sku, (_, qty) in lines.items())
    total = sum((products[sku][0] * qty for sku, qty in quantities), Decimal("0.00"))
    if total > MAX_TOTAL:
        problems.add("total_too_large", "items", f"The order total may not exceed {MAX_TOTAL}.")
        problems.raise_if_any()
    currency = currencies.pop()

    order_id = uuid.uuid4()
    # The saga carries ids, amounts and codes only: the address and payment method stay on
    # the order row, where steps read them by id.
    saga = saga_start(
        saga_type="order",
        data={
            "order_id": str(order_id),
            "amount": str(total),
            "currency": currency,
            "lines": [[sku, qty] for sku, qty in quantities],
            # The client has a webhook endpoint: its saga tells the outbox about changes.
            **({order_events.DATA_KEY: True} if webhook_services.subscribers(owner.pk) else {}),
        },
        correlation_id=str(order_id),
    )
    # Built once, not by the ORM's compiler on every order, and the items in the order's
    # statement (config.db.insert_with_rows).
    order = Order(
        id=order_id,
        owner=owner,
        currency=currency,
        total=total,
        payment_method=payment_method,
        shipping_name=address["name"],
        shipping_line1=address["line1"],
        shipping_city=address["city"],
        shipping_postal_code=address["postal_code"],
        shipping_country=address["country"],
        saga=saga,
    )
    insert_with_rows(
        order,
        [
            OrderItem(order=order, sku=sku, quantity=qty, unit_price=products[sku][0])
            for sku, qty in quantities
        ],
    )
    return order


def order_request_cancel(*, order: Order, actor) -> Order:
    """Ask for the order to be cancelled; the saga compensates at its next step boundary.

    Accepted while the saga has not passed ``capture_payment``; afterwards the engine raises
    :class:`sagas.exceptions.SagaOperationRefused` (``pivot_reached`` or ``not_running``),
    which the API turns into a ``409``. An order already being cancelled (its saga undoing
    what it did) accepts it again, changing nothing, as a running one does a second cancel: a
    client retrying its cancel is told yes, not that it failed. ``actor`` is a user or a name
    for the timeline.
    """
    # Users appear in the timeline as ``user:<name>``, like the ops operations.
    actor_name = f"user:{actor.get_username()}" if hasattr(actor, "get_username") else str(actor)
    try:
        order.saga = saga_request_cancel(
            saga_id=order.saga_id, reason=CUSTOMER_CANCELLED, actor=actor_name
        )
    except SagaOperationRefused as refused:
        saga = Saga.objects.filter(pk=order.saga_id).first()
        if saga is not None and saga.state == SagaState.COMPENSATING:
            order.saga = saga
            return order
        # The engine speaks of sagas; the client asked about an order.
        raise SagaOperationRefused(refused.code, _why_not_cancellable(saga, refused)) from None
    return order


def _why_not_cancellable(saga: Saga | None, refused: SagaOperationRefused) -> str:
    """The refusal of a cancel in the client's words, from the order's saga as it is now."""
    from orders.selectors import OrderStatus, order_state

    if refused.code == "pivot_reached":
        return "The payment for this order has been taken; it can no longer be cancelled."
    if refused.code == "definition_missing":  # this server is behind a release: for now
        return "The order cannot be cancelled right now; try again in a few minutes."
    status = order_state(saga).status if saga is not None else ""
    if (
        status == OrderStatus.NEEDS_ATTENTION
        and saga is not None
        and saga.escalated_from == SagaState.COMPENSATING
    ):
        # Stopped while undoing: the order is being cancelled already, a person finishes it.
        return "The order is already being cancelled; our support team is finishing it."
    return {
        OrderStatus.CONFIRMED: "The order is already confirmed; it can no longer be cancelled.",
        OrderStatus.CANCELLED: "The order is already cancelled.",
        OrderStatus.CANCELLING: "The order is already being cancelled.",
        OrderStatus.NEEDS_ATTENTION: (
            "Our support team is looking at this order; contact them to cancel it."
        ),
    }.get(status, "This order can no longer be cancelled.")


#: Refusals of a signal that the engine words about the saga (its state, its steps, its
#: definition); the orders API says them about the order (:func:`order_signal_refused`).
_SIGNAL_REFUSALS = ("not_waiting", "already_signalled", "unknown_signal", "definition_missing")


def order_check_signal(*, order: Order) -> None:
    """Before a signal goes to the engine: raise ``definition_missing`` when this process
    does not register the definition the order's saga runs on (a web process on the release
    before the one that started the saga, during a rolling deploy). The engine cannot say then
    whether the sender is the order's client, and denies it (a ``403`` the client cannot
    retry, its wait then timing out); the route has checked the order is the caller's, so it
    is told to try again, as a cancel is (:func:`order_signal_refused` words it)."""
    saga = Saga.objects.only("id", "saga_type", "definition_version").get(pk=order.saga_id)
    refusal = saga_definition_refusal(saga)
    if refusal is not None:
        raise refusal


def order_signal_refused(
    *, order: Order, name: str, refused: SagaOperationRefused
) -> SagaOperationRefused:
    """A signal the engine refused for the order's saga, in the client's words: the same code
    (``not_waiting``, ...), the reason about the order as it is now (being cancelled, already
    confirmed), never the saga's state or step ("The saga is compensating at
    reserve_inventory" told a client sending its 3-D Secure confirmation nothing it knows)."""
    if refused.code not in _SIGNAL_REFUSALS:
        return refused
    if refused.code == "unknown_signal":
        return SagaOperationRefused(refused.code, f"An order never waits for {name!r}.")
    if refused.code == "definition_missing":  # this server is behind a release: for now
        return SagaOperationRefused(
            refused.code,
            f"The order cannot take {name!r} right now; try again in a few minutes.",
        )
    if refused.code == "already_signalled":
        return SagaOperationRefused(
            refused.code,
            f"This order's {name!r} was already sent with another Idempotency-Key and is "
            "being taken into account; send it again with that key.",
        )
    from orders.selectors import OrderStatus, order_state

    saga = Saga.objects.filter(pk=order.saga_id).first()
    status = order_state(saga).status if saga is not None else ""
    waits = f"it is not waiting for {name!r}."
    return SagaOperationRefused(
        refused.code,
        {
            OrderStatus.CONFIRMED: f"The order is already confirmed; {waits}",
            OrderStatus.CANCELLED: f"The order is cancelled; {waits}",
            OrderStatus.CANCELLING: f"The order is being cancelled; {waits}",
            OrderStatus.NEEDS_ATTENTION: (
                f"Our support team is looking at this order; {waits} Contact them."
            ),
        }.get(status, f"The order is not waiting for {name!r}, and will not wait for it."),
    )


def order_confirm(*, key: str, reservation_key: str) -> dict:
    """The pivot: the reserved stock is now sold (held -> committed, ``stock_on_hand`` falls).

    Idempotent by ``key``, like every step; ``reservation_key`` is the forward key of the
    ``reserve_inventory`` step, which is how inventory knows the reservation. The money was
    captured by the step before, so after this nothing is compensated.
    """
    return inventory_services.reservation_commit(key=key, forward_key=reservation_key)
