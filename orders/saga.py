"""The order saga, read top to bottom like the story it tells (outcomes: docs/design.md).

Each step calls one participant with the step's derived idempotency key, so a retry, a lost
response or a duplicate delivery asks the same question again and gets the first answer. A
participant's business "no" (anything in :data:`BUSINESS_ERRORS`) becomes a
:class:`~sagas.definition.BusinessFailure` and compensates at once; every other exception
(a provider timeout, an injected fault, a database hiccup) is transient and retried by the
engine.

Two steps wait for the outside world (:func:`~sagas.definition.Wait`), and only for the orders
that need it: ``confirm_3ds`` for the card holder's ``3ds_confirmed`` (``pm_card_3ds_required``;
the order shows ``requires_action``), before the provider is asked to authorize; and
``fraud_review`` for ops staff's ``fraud_review`` on orders above ``ORDER_FRAUD_REVIEW_ABOVE``,
before any money is captured, so a rejection only voids an authorization. Both take
``{"approved": true|false}``.

Saga ``data`` holds ``order_id``, ``amount``, ``currency`` and ``lines``; the payment method
and the shipping country are read from the order row by id, so no personal data travels in
the saga, its results or its timeline.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from decimal import Decimal
from functools import lru_cache
from typing import Any

from django.conf import settings

from config.db import ValuesBy
from config.errors import AppError
from inventory import services as inventory
from inventory.errors import InventoryError
from orders import services as orders
from orders.events import order_events
from orders.models import Order
from payments import services as payments
from payments.errors import PaymentError
from payments.provider import PM_3DS_REQUIRED
from sagas.public import (
    JSON,
    BusinessFailure,
    SagaDefinition,
    Step,
    StepContext,
    Wait,
    forward_key,
    saga_stopped_before_pivot,
    undo_key,
)
from shipping import services as shipping
from shipping.errors import ShippingError

#: The participants' definite answers, each with a ``code`` (``out_of_stock``,
#: ``payment_declined``, ``shipping_unavailable``, ``already_compensated``, ...). Anything else,
#: ``payments.errors.ProviderUnavailable`` included, is transient and retried.
BUSINESS_ERRORS: tuple[type[AppError], ...] = (InventoryError, PaymentError, ShippingError)


# -- 1. stock ------------------------------------------------------------------------------
def reserve_inventory(ctx: StepContext) -> dict:
    lines = [(sku, int(qty)) for sku, qty in ctx.data["lines"]]
    with _business_failures():
        result = inventory.reservation_reserve(
            key=ctx.idempotency_key, order_id=ctx.data["order_id"], lines=lines
        )
    return _json(result)


def release_inventory(ctx: StepContext) -> dict:
    return _json(
        inventory.reservation_release(key=ctx.idempotency_key, forward_key=ctx.forward_key)
    )


def release_inventory_by_hand(ctx: StepContext) -> dict:
    return _json(
        inventory.reservation_release_done_by_hand(
            key=ctx.idempotency_key, forward_key=ctx.forward_key
        )
    )


# -- 2a. the card holder's 3-D Secure step (pm_card_3ds_required only) -----------------------
def needs_3ds(ctx: StepContext) -> bool:
    return _payment_method(ctx) == PM_3DS_REQUIRED


def order_client(saga_id: str) -> int | None:
    """The user who placed the order of this saga: the one client who may answer for it."""
    return Order.objects.filter(saga_id=saga_id).values_list("owner_id", flat=True).first()


def approval(payload: Mapping[str, JSON]) -> str | None:
    """``{"approved": true|false}``: anything else is refused before it reaches the saga."""
    if not isinstance(payload.get("approved"), bool):
        return 'The payload needs "approved": true or false.'
    return None


def decide_3ds(ctx: StepContext) -> dict:
    if not (ctx.signal or {}).get("approved"):
        raise BusinessFailure("payment_declined", "the card holder did not confirm 3-D Secure")
    return {"approved": True}


# -- 2b. money on hold ---------------------------------------------------------------------
def authorize_payment(ctx: StepContext) -> dict:
    # A declined card is final: the step declares PaymentError non_retryable.
    payment_method = _payment_method(ctx)
    result = payments.payment_authorize(
        key=ctx.idempotency_key,
        order_id=ctx.data["order_id"],
        amount=Decimal(ctx.data["amount"]),
        currency=ctx.data["currency"],
        payment_method=payment_method,
    )
    return _json(result)


def void_authorization(ctx: StepContext) -> dict:
    return _json(
        payments.payment_void(
            key=ctx.idempotency_key, order_id=ctx.data["order_id"], forward_key=ctx.forward_key
        )
    )


def void_authorization_by_hand(ctx: StepContext) -> dict:
    return _json(payments.payment_void_done_by_hand(order_id=ctx.data["order_id"]))


# -- 3. a carrier --------------------------------------------------------------------------
def arrange_shipment(ctx: StepContext) -> dict:
    country = _order_facts(ctx.data["order_id"])[1]
    with _business_failures():
        result = shipping.shipment_arrange(
            key=ctx.idempotency_key, order_id=ctx.data["order_id"], country=country
        )
    return _json(result)


def cancel_shipment(ctx: StepContext) -> dict:
    return _json(shipping.shipment_cancel(key=ctx.idempotency_key, forward_key=ctx.forward_key))


def cancel_shipment_by_hand(ctx: StepContext) -> dict:
    return _json(
        shipping.shipment_cancel_done_by_hand(key=ctx.idempotency_key, forward_key=ctx.forward_key)
    )


# -- 3b. a fraud analyst's look at large orders -------------------------------------------
def needs_fraud_review(ctx: StepContext) -> bool:
    return Decimal(ctx.data["amount"]) > Decimal(settings.ORDER_FRAUD_REVIEW_ABOVE)


def decide_fraud_review(ctx: StepContext) -> dict:
    if not (ctx.signal or {}).get("approved"):
        raise BusinessFailure("fraud_rejected", "the fraud review rejected the order")
    return {"approved": True}


# -- 4. money taken ------------------------------------------------------------------------
def capture_payment(ctx: StepContext) -> dict:
    # The authorize step's own answer names the authorization: no need to ask the provider
    # what the authorize did (a call more per order).
    authorized = ctx.results.get("authorize_payment") or {}
    with _business_failures():
        result = payments.payment_capture(
            key=ctx.idempotency_key,
            order_id=ctx.data["order_id"],
            authorize_key=forward_key(ctx.saga_id, "authorize_payment"),
            authorization_id=authorized.get("authorization_id"),
        )
    return _json(result)


def refund_payment(ctx: StepContext) -> dict:
    return _json(
        payments.payment_refund(
            key=ctx.idempotency_key, order_id=ctx.data["order_id"], forward_key=ctx.forward_key
        )
    )


def refund_payment_by_hand(ctx: StepContext) -> dict:
    return _json(payments.payment_refund_done_by_hand(order_id=ctx.data["order_id"]))


# -- 5. the pivot: the stock is sold -------------------------------------------------------
def confirm_order(ctx: StepContext) -> dict:
    # Deliberately no translation to BusinessFailure: inventory only says no here if the
    # reservation vanished or was released, which no correct run produces. Retried and then
    # escalated, the saga goes to a person instead of compensating money already captured.
    return _json(
        orders.order_confirm(
            key=ctx.idempotency_key,
            reservation_key=forward_key(ctx.saga_id, "reserve_inventory"),
        )
    )


def settle_stock_on_resolve(saga: Any) -> None:
    """A person closed the saga: the stock it reserved must not stay reserved for good.

    Stopped while undoing, or before the pivot (the fraud review not given in time): the order
    is not going to be confirmed, so release the reservation under ``release_inventory``'s own
    undo key (the same call the ladder would have made, so a release that already ran is not
    repeated). Stopped at or past the pivot: the money is captured and the order is confirmed,
    so the stock is sold; commit the reservation under ``confirm_order``'s key (a no-op if it
    already ran).
    """
    reserve = forward_key(saga.id, "reserve_inventory")
    if saga.escalated_from == "compensating" or saga_stopped_before_pivot(saga):
        inventory.reservation_release(
            key=undo_key(saga.id, "reserve_inventory"), forward_key=reserve
        )
    else:
        orders.order_confirm(key=forward_key(saga.id, "confirm_order"), reservation_key=reserve)


#: A carrier's booking API is slow and sometimes needs a minute; the other participants answer
#: within ``SAGA_STEP_TIMEOUT``. Read when the definition is built (the worker's settings).
CARRIER_TIMEOUT = 2 * settings.SAGA_STEP_TIMEOUT

#: Version 1: no waits. Registered beside version 2 so orders placed before the upgrade run to
#: their end on it (or move with ``saga_migrate order --from 1 --to 2``).
# The forward steps both versions share (steps are frozen, so one object serves both).
# Inventory lives in this database: the hold (and its release) commits with the step's record,
# in one transaction instead of two; so does the sale (confirm_order).
# The carrier's step is not declared ``stays_in_database``, though the fake carrier books in
# this database: it stands in for a carrier's API, and the claim before it waits for the disk
# as one before a real carrier's would.
# Each undo a person may do by hand (an operator's "undo done", when the saga's own keeps
# failing) is recorded with its participant (``undone_by_hand``), so the order reads as the
# saga's undo would have left it: the money voided or refunded, the shipment cancelled, the
# stock given back.
RESERVE_INVENTORY = Step(
    "reserve_inventory",
    reserve_inventory,
    compensate=release_inventory,
    provider="inventory",
    transactional=True,
    undone_by_hand=release_inventory_by_hand,
)
AUTHORIZE_PAYMENT = Step(
    "authorize_payment",
    authorize_payment,
    compensate=void_authorization,
    provider="payments",
    non_retryable=(PaymentError,),  # a declined card is never asked again
    undone_by_hand=void_authorization_by_hand,
)
ARRANGE_SHIPMENT = Step(
    "arrange_shipment",
    arrange_shipment,
    compensate=cancel_shipment,
    provider="shipping",
    timeout=CARRIER_TIMEOUT,
    undone_by_hand=cancel_shipment_by_hand,
)
CAPTURE_PAYMENT = Step(
    "capture_payment",
    capture_payment,
    compensate=refund_payment,
    provider="payments",
    undone_by_hand=refund_payment_by_hand,
)
CONFIRM_ORDER = Step(
    "confirm_order", confirm_order, pivot=True, provider="inventory", transactional=True
)

order_saga_v1 = SagaDefinition(
    "order",
    version=1,
    on_resolve=settle_stock_on_resolve,
    settled_on_resolve=("reserve_inventory",),
    steps=[RESERVE_INVENTORY, AUTHORIZE_PAYMENT, ARRANGE_SHIPMENT, CAPTURE_PAYMENT, CONFIRM_ORDER],
    on_change=order_events,
)

#: Version 2, what new orders run: the 3-D Secure and fraud review waits.
order_saga = SagaDefinition(
    "order",
    version=2,
    on_resolve=settle_stock_on_resolve,
    settled_on_resolve=("reserve_inventory",),
    steps=[
        RESERVE_INVENTORY,
        Wait(
            "3ds_confirmed",
            name="confirm_3ds",
            timeout=lambda: settings.ORDER_3DS_TIMEOUT,
            on_timeout="compensate",
            when=needs_3ds,
            client=order_client,
            validate=approval,
            decide=decide_3ds,
        ),
        AUTHORIZE_PAYMENT,
        ARRANGE_SHIPMENT,
        Wait(
            "fraud_review",
            timeout=lambda: settings.ORDER_FRAUD_REVIEW_TIMEOUT,
            on_timeout="escalate",
            when=needs_fraud_review,
            validate=approval,
            decide=decide_fraud_review,
        ),
        CAPTURE_PAYMENT,
        CONFIRM_ORDER,
    ],
    on_change=order_events,
)


# -- helpers -------------------------------------------------------------------------------
def _payment_method(ctx: StepContext) -> str:
    return _order_facts(ctx.data["order_id"])[0]


_facts_of = ValuesBy(Order.objects.values_list("payment_method", "shipping_country"), "id")


@lru_cache(maxsize=4096)
def _order_facts(order_id: str) -> tuple[str, str]:
    """``(payment_method, shipping_country)`` of an order, read once per process.

    Both are fixed when the order is placed (nothing changes them afterwards: no API route,
    and the ops console shows orders read-only), and three steps of the saga need them
    (the 3-D Secure wait's condition, the authorization, the carrier), so a worker reads the
    row once instead of three times. Bounded, and keyed by the order's random id, so an entry
    is never stale and the cache never grows past a few hundred kilobytes.
    """
    facts = _facts_of(order_id)
    if not facts:
        raise Order.DoesNotExist(f"no order {order_id}")
    method, country = facts[0]
    return method, country


@contextmanager
def _business_failures() -> Iterator[None]:
    """Turn a participant's definite "no" into the engine's, keeping its code."""
    try:
        yield
    except BUSINESS_ERRORS as exc:
        raise BusinessFailure(exc.code, str(exc)) from exc


def _json(value: Any) -> Any:
    """A participant's result as plain JSON (Decimals and UUIDs as strings) for saga results."""
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)
