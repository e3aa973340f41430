"""Real races on real PostgreSQL: each thread has its own connection and its own transaction."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection

from inventory.errors import OutOfStock, ReservationRefused, ReservationStateConflict
from inventory.models import Product, Reservation, ReservationLine
from inventory.services import reservation_commit, reservation_release, reservation_reserve
from tests.row_lock import held_by_another

pytestmark = pytest.mark.django_db(transaction=True)


def run_together(*calls: Callable[[], Any]) -> list[Any]:
    """Start every call at the same moment, each on its own thread (and so DB connection).

    Returns each call's result, or the exception it raised.
    """
    barrier = threading.Barrier(len(calls))
    outcomes: list[Any] = [None] * len(calls)

    def run(i: int, call: Callable[[], Any]) -> None:
        try:
            barrier.wait(timeout=10)
            outcomes[i] = call()
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test inspects
            outcomes[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a racing call never finished"
    return outcomes


def last_unit() -> Product:
    return Product.objects.create(sku="last", name="Last", price=Decimal("5.00"), stock_on_hand=1)


def test_two_orders_for_the_last_unit_exactly_one_wins():
    """Two reserves with different keys race for one unit: one holds it, one is out of stock."""
    last_unit()
    outcomes = run_together(
        *[
            (lambda k=k: reservation_reserve(key=k, order_id=uuid.uuid4(), lines=[("last", 1)]))
            for k in ("a", "b")
        ]
    )
    wins = [o for o in outcomes if isinstance(o, dict)]
    losses = [o for o in outcomes if isinstance(o, OutOfStock)]
    assert len(wins) == 1 and len(losses) == 1, outcomes
    product = Product.objects.get(sku="last")
    assert (product.stock_on_hand, product.reserved) == (1, 1)
    assert Reservation.objects.count() == 1


def test_many_orders_never_oversell():
    """Eight racing reserves over three units across two products: never more held than stock."""
    Product.objects.create(sku="a", name="A", price=Decimal("1.00"), stock_on_hand=3)
    Product.objects.create(sku="b", name="B", price=Decimal("1.00"), stock_on_hand=3)
    outcomes = run_together(
        *[
            (
                lambda i=i: reservation_reserve(
                    key=f"k{i}", order_id=uuid.uuid4(), lines=[("b", 1), ("a", 1)]
                )
            )
            for i in range(8)
        ]
    )
    wins = [o for o in outcomes if isinstance(o, dict)]
    assert len(wins) == 3
    assert all(isinstance(o, dict | OutOfStock) for o in outcomes), outcomes
    for product in Product.objects.all():
        assert (product.stock_on_hand, product.reserved) == (3, 3)
    assert ReservationLine.objects.count() == 6


def test_reserves_commits_and_releases_over_the_same_products_race_without_deadlock():
    """Each writer locks its products in sku order, holds or settles all its lines in one
    statement, and so never waits on another that waits on it: ten writers over three
    products all finish (PostgreSQL would have aborted one of a deadlocked pair), and the
    counters add up."""
    for sku in ("a", "b", "c"):
        Product.objects.create(sku=sku, name=sku, price=Decimal("1.00"), stock_on_hand=100)
    lines = [("c", 1), ("a", 2), ("b", 3)]
    for i in range(6):
        reservation_reserve(key=f"k{i}", order_id=uuid.uuid4(), lines=lines)
    outcomes = run_together(
        *[(lambda i=i: reservation_commit(key=f"k{i}:c", forward_key=f"k{i}")) for i in range(3)],
        *[
            (lambda i=i: reservation_release(key=f"k{i}:r", forward_key=f"k{i}"))
            for i in range(3, 6)
        ],
        *[
            (lambda i=i: reservation_reserve(key=f"n{i}", order_id=uuid.uuid4(), lines=lines))
            for i in range(4)
        ],
    )
    assert all(isinstance(o, dict) for o in outcomes), outcomes
    held = {"a": 2, "b": 3, "c": 1}
    for product in Product.objects.all():
        # 3 sold, 4 held by the new reserves; the released ones gave theirs back
        assert product.stock_on_hand == 100 - 3 * held[product.sku]
        assert product.reserved == 4 * held[product.sku]


def test_same_key_racing_holds_once_and_both_get_the_same_answer():
    """Two deliveries of one reserve race: the unique key makes the second read the first."""
    Product.objects.create(sku="p", name="P", price=Decimal("1.00"), stock_on_hand=10)
    order_id = uuid.uuid4()
    outcomes = run_together(
        *[
            (lambda: reservation_reserve(key="same", order_id=order_id, lines=[("p", 4)]))
            for _ in range(4)
        ]
    )
    assert all(isinstance(o, dict) for o in outcomes), outcomes
    assert len({o["reservation_id"] for o in outcomes}) == 1
    assert Product.objects.get(sku="p").reserved == 4


def test_release_racing_its_reserve_leaves_nothing_held():
    """Whichever of reserve and release lands first, no stock stays held afterwards."""
    Product.objects.create(sku="p", name="P", price=Decimal("1.00"), stock_on_hand=10)
    reserve_outcome, release_outcome = run_together(
        lambda: reservation_reserve(key="k", order_id=uuid.uuid4(), lines=[("p", 2)]),
        lambda: reservation_release(key="k:undo", forward_key="k"),
    )
    assert isinstance(release_outcome, dict), release_outcome
    if isinstance(reserve_outcome, ReservationRefused):
        assert release_outcome["tombstone"] is True
    else:
        assert isinstance(reserve_outcome, dict), reserve_outcome
        assert release_outcome["lines"] == [["p", 2]]
    assert Product.objects.get(sku="p").reserved == 0
    assert Reservation.objects.get(key="k").status == "released"


def test_a_repeated_or_refused_sale_locks_no_product():
    """Only a sale that sells locks the products' rows: a repeat (the reservation is committed
    already) or a refusal (it was released) answers while another transaction holds them,
    instead of queueing behind a busy product."""
    Product.objects.create(sku="busy", name="Busy", price=Decimal("5.00"), stock_on_hand=9)
    Product.objects.create(sku="calm", name="Calm", price=Decimal("5.00"), stock_on_hand=9)
    reservation_reserve(key="sold", order_id=uuid.uuid4(), lines=[("busy", 1)])
    first = reservation_commit(key="sold:c", forward_key="sold")
    reservation_reserve(key="gone", order_id=uuid.uuid4(), lines=[("busy", 1), ("calm", 1)])
    reservation_release(key="gone:r", forward_key="gone")
    # A sale that queued behind the busy product would fail at the lock timeout.
    with held_by_another(Product.objects.filter(sku="busy"), lock_timeout="5s"):
        assert reservation_commit(key="sold:c", forward_key="sold") == first
        with pytest.raises(ReservationStateConflict):
            reservation_commit(key="gone:c", forward_key="gone")
    assert Product.objects.get(sku="busy").stock_on_hand == 8
