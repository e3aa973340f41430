"""The order-saga benchmark: real orders through the fake providers, measured like the engine.

Used by ``saga_bench --order``: orders are placed with :func:`orders.services.order_create` (one
transaction with the order, its items and its saga, as the API does), and latency is the saga's
created -> finished time from database timestamps. :func:`run_order_chain` runs the same orders
as plain Celery chains (:mod:`lab.order_chain`), the baseline for the order saga.
"""

from __future__ import annotations

import random
import time
from decimal import Decimal

from django.contrib.auth import get_user_model

from inventory.models import Product
from lab import order_chain
from lab.engine_bench import Result, _paced, broker_publishes, saga_figures, wait_settled
from orders.services import order_create

BENCH_SKUS = [f"BENCH-{i}" for i in range(1, 6)]


def _bench_catalog() -> None:
    """Products with stock that a benchmark never runs out of."""
    for i, sku in enumerate(BENCH_SKUS, start=1):
        Product.objects.update_or_create(
            sku=sku,
            defaults={
                "name": f"Bench item {i}",
                "price": Decimal("9.99") + i,
                "currency": "EUR",
                "stock_on_hand": 1_000_000_000,
                "reserved": 0,
            },
        )


def run_orders(n: int, *, rate: float | None = None, latency: bool = False) -> Result:
    """Place ``n`` orders (happy path) and wait until every order saga has settled."""
    _bench_catalog()
    user, _ = get_user_model().objects.get_or_create(username="bench-client")
    rng = random.Random(n)
    saga_ids: list = []
    before = broker_publishes()

    def send(_i: int) -> None:
        skus = rng.sample(BENCH_SKUS, rng.randint(1, 3))
        order = order_create(
            owner=user,
            items=[{"sku": s, "quantity": rng.randint(1, 3)} for s in skus],
            payment_method="pm_card_visa",
            shipping_address={
                "name": "Bench Client",
                "line1": "1 Loop Road",
                "city": "Utrecht",
                "postal_code": "3511AA",
                "country": "NL",
            },
        )
        saga_ids.append(order.saga_id)

    _paced(n, rate, send)
    wait_settled(saga_ids, 1800, "order sagas to settle")
    after = broker_publishes()
    latencies, seconds, outcomes = saga_figures(saga_ids)
    return Result.measured(
        "order saga" + (" +20-50ms/call" if latency else ""),
        n,
        latencies,
        seconds,
        rate=rate,
        publishes=(before, after),
        outcomes=outcomes,
    )


def run_order_chain(n: int, *, rate: float | None = None, timeout: float = 1800) -> Result:
    """The same orders (one to three of the bench products, paid by card, shipped to NL) as
    plain Celery chains calling the same participants: the order saga's baseline.

    Latency runs from the chain's start (client clock) to its stock being sold (the database's
    ``updated_at`` of the reservation, the chain's last write), as the plain chain's does.
    """
    _bench_catalog()
    prices = order_chain.prices_of(BENCH_SKUS)
    rng = random.Random(n)
    sent_at: dict[str, float] = {}
    before = broker_publishes()

    def send(_i: int) -> None:
        order = order_chain.order_facts(rng, prices)
        sent_at[order["order_id"]] = time.time()
        order_chain.send(order)

    _paced(n, rate, send)
    ids = list(sent_at)
    order_chain.wait_sold(ids, timeout)
    after = broker_publishes()
    finished = order_chain.sold_at(ids)
    latencies = [(finished[i] - sent_at[i]) * 1000 for i in ids]
    seconds = max(max(finished.values()) - min(sent_at.values()), 1e-9)
    return Result.measured(
        "order celery chain",
        n,
        latencies,
        seconds,
        rate=rate,
        publishes=(before, after),
        outcomes={"succeeded": n},
    )
