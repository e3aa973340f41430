"""The order flow as a plain Celery ``chain``: what a careful user would run instead of the saga.

The plain chain of ``saga_bench`` does five one-statement writes, so it says what the engine
costs against broker hops, but not what the order saga costs against the same work done
without an engine. This chain does the order saga's five forward steps with the same
participants (``inventory``, ``payments``, ``shipping``, ``orders``), the same derived
idempotency keys, and Celery's own retries with exponential backoff and jitter, on the same
worker (persistent connections, ``acks_late``, prefetch 1, the participants' commits as the
saga makes them: the payment row, the copies of the provider's answers and the fake carrier's
booking do not wait for the disk, so a database server crash mid-chain can strand an order
that the chain, having no record to redo a step from, does not finish):

    reserve -> authorize -> arrange -> capture -> confirm

What it leaves out, each in the chain's favour: no wait for the disk before a provider is
called (the saga's claim or record before each of its three steps that may leave the database
waits, so a crash cannot hide a call that was made), no compensation (a careful user would hang an
``on_error`` link on every task; the happy path never runs it, but every message carries it),
no circuit breaker or call limits around the providers, no saga row, no timeline, no order row
(the client sends the order's facts in the first message instead of placing an ``Order``,
whose saga is required). Its finish time is the reservation's ``updated_at``, stamped before
the sale's statement and commit, where a saga's is its last record's: a round trip and a
durable commit earlier. Each task hands the order's facts (and the authorization's id) to the
next one in its return value, as chains do. Retries differ in detail: Celery's backoff factor
is whole seconds (1 s, where the engine's base is 0.5 s), and the sale's "no" is final here
where the saga retries it and escalates; neither happens on the benchmark's happy path. A
chain that fails is only noticed by the benchmark's timeout (it never sells its stock).

Importing this module registers the tasks; bench workers import it through
:mod:`lab.bench_saga`.
"""

from __future__ import annotations

import random
import time
import uuid
from decimal import Decimal
from typing import Any

from celery import chain, shared_task
from django.conf import settings

from inventory import services as inventory
from inventory.models import Product, Reservation, ReservationStatus
from orders import services as orders
from orders.saga import BUSINESS_ERRORS
from payments import services as payments
from shipping import services as shipping

#: Celery's retry settings mirroring the engine's (``SAGA_MAX_ATTEMPTS``, ``SAGA_BACKOFF_*``): a
#: transient failure is retried with exponential backoff and full jitter; a participant's
#: business "no" is not.
_TASK = {
    "acks_late": True,
    "ignore_result": True,
    "autoretry_for": (Exception,),
    "dont_autoretry_for": BUSINESS_ERRORS,
    "retry_backoff": True,
    "retry_backoff_max": int(settings.SAGA_BACKOFF_MAX),
    "retry_jitter": True,
    "max_retries": settings.SAGA_MAX_ATTEMPTS - 1,
}

Order = dict[str, Any]


def key(order: Order, step: str) -> str:
    """The step's idempotency key: one per order and step, the same on every retry."""
    return f"chain:{order['order_id']}:{step}"


@shared_task(name="lab.order_chain.reserve", **_TASK)
def reserve(order: Order) -> Order:
    inventory.reservation_reserve(
        key=key(order, "reserve"),
        order_id=order["order_id"],
        lines=[(sku, int(qty)) for sku, qty in order["lines"]],
    )
    return order


@shared_task(name="lab.order_chain.authorize", **_TASK)
def authorize(order: Order) -> Order:
    result = payments.payment_authorize(
        key=key(order, "authorize"),
        order_id=order["order_id"],
        amount=Decimal(order["amount"]),
        currency=order["currency"],
        payment_method=order["payment_method"],
    )
    return {**order, "authorization_id": result["authorization_id"]}


@shared_task(name="lab.order_chain.arrange", **_TASK)
def arrange(order: Order) -> Order:
    shipping.shipment_arrange(
        key=key(order, "arrange"), order_id=order["order_id"], country=order["country"]
    )
    return order


@shared_task(name="lab.order_chain.capture", **_TASK)
def capture(order: Order) -> Order:
    payments.payment_capture(
        key=key(order, "capture"),
        order_id=order["order_id"],
        authorize_key=key(order, "authorize"),
        authorization_id=order["authorization_id"],
    )
    return order


@shared_task(name="lab.order_chain.confirm", **_TASK)
def confirm(order: Order) -> None:
    orders.order_confirm(key=key(order, "confirm"), reservation_key=key(order, "reserve"))


def order_facts(rng: random.Random, prices: dict[str, Decimal]) -> Order:
    """One order as the saga benchmark places them: one to three of the bench products."""
    skus = rng.sample(sorted(prices), rng.randint(1, 3))
    lines = [[sku, rng.randint(1, 3)] for sku in skus]
    amount = sum((prices[sku] * qty for sku, qty in lines), Decimal("0"))
    return {
        "order_id": str(uuid.uuid4()),
        "lines": lines,
        "amount": str(amount),
        "currency": "EUR",
        "payment_method": "pm_card_visa",
        "country": "NL",
    }


def send(order: Order) -> str:
    """Start one order's chain; the id of its last task (``confirm``)."""
    last = chain(reserve.s(order), authorize.s(), arrange.s(), capture.s(), confirm.s())
    return last.apply_async().id


def prices_of(skus: list[str]) -> dict[str, Decimal]:
    return dict(Product.objects.filter(sku__in=skus).values_list("sku", "price"))


def sold_at(order_ids: list[str]) -> dict[str, float]:
    """When each of these orders' stock was sold (its chain's last write), epoch seconds."""
    rows = Reservation.objects.filter(
        order_id__in=order_ids, status=ReservationStatus.COMMITTED
    ).values_list("order_id", "updated_at")
    return {str(order_id): at.timestamp() for order_id, at in rows}


def wait_sold(order_ids: list[str], timeout: float) -> None:
    """Poll, oldest first and 100 at a time, until every order's stock is sold."""
    pending = list(order_ids)
    deadline = time.monotonic() + timeout
    while pending:
        done = sold_at(pending[:100])
        pending = [order_id for order_id in pending if order_id not in done]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {len(pending)} order chains to finish")
        time.sleep(0.05)
