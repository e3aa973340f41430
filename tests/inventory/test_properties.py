"""Any interleaving of reserve, release and commit keeps the stock books straight.

A hypothesis state machine drives the real services over a few products and keys, in any order
(including releases before reserves, repeats and commits of released stock), and checks after
every step that the database agrees with a simple model and never oversells.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from django.db import transaction
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from inventory.errors import (
    OutOfStock,
    ReservationNotFound,
    ReservationRefused,
    ReservationStateConflict,
)
from inventory.models import Product
from inventory.services import reservation_commit, reservation_release, reservation_reserve

INITIAL = {"apple": 4, "banana": 2, "cherry": 1}
KEYS = [f"saga:{i}:reserve_inventory" for i in range(6)]
lines_strategy = st.lists(
    st.tuples(st.sampled_from([*INITIAL, "durian"]), st.integers(min_value=1, max_value=3)),
    min_size=1,
    max_size=3,
)


class StockMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # Each run lives in a savepoint that is rolled back, so runs start from the same shelf.
        self._atomic = transaction.atomic()
        self._atomic.__enter__()
        for sku, qty in INITIAL.items():
            Product.objects.create(sku=sku, name=sku, price=Decimal("1.00"), stock_on_hand=qty)
        # key -> (status, {sku: qty}); status in held | released | committed
        self.model: dict[str, tuple[str, dict[str, int]]] = {}

    def teardown(self) -> None:
        transaction.set_rollback(True)
        self._atomic.__exit__(None, None, None)

    def _held(self, sku: str) -> int:
        return sum(lines.get(sku, 0) for status, lines in self.model.values() if status == "held")

    def _sold(self, sku: str) -> int:
        return sum(
            lines.get(sku, 0) for status, lines in self.model.values() if status == "committed"
        )

    @rule(key=st.sampled_from(KEYS), lines=lines_strategy)
    def reserve(self, key: str, lines: list[tuple[str, int]]) -> None:
        wanted: dict[str, int] = {}
        for sku, qty in lines:
            wanted[sku] = wanted.get(sku, 0) + qty
        known = self.model.get(key)
        fits = all(
            sku in INITIAL and INITIAL[sku] - self._sold(sku) - self._held(sku) >= qty
            for sku, qty in wanted.items()
        )
        try:
            result = reservation_reserve(key=key, order_id=uuid.uuid4(), lines=lines)
        except OutOfStock:
            assert known is None and not fits
            return
        except ReservationRefused:
            assert known is not None and known[0] == "released"
            return
        if known is None:
            assert fits
            self.model[key] = ("held", wanted)
        else:
            assert known[0] in ("held", "committed")
        assert dict(result["lines"]) == self.model[key][1]

    @rule(key=st.sampled_from(KEYS))
    def release(self, key: str) -> None:
        known = self.model.get(key)
        try:
            result = reservation_release(key=f"{key}:undo", forward_key=key)
        except ReservationStateConflict:
            assert known is not None and known[0] == "committed"
            return
        assert known is None or known[0] in ("held", "released")
        assert result["status"] == "released"
        self.model[key] = ("released", known[1] if known else {})

    @rule(key=st.sampled_from(KEYS))
    def commit(self, key: str) -> None:
        known = self.model.get(key)
        try:
            result = reservation_commit(key=f"{key}:commit", forward_key=key)
        except ReservationNotFound:
            assert known is None
            return
        except ReservationStateConflict:
            assert known is not None and known[0] == "released"
            return
        assert known is not None and known[0] in ("held", "committed")
        assert result["status"] == "committed"
        self.model[key] = ("committed", known[1])

    @invariant()
    def books_balance(self) -> None:
        for product in Product.objects.all():
            assert 0 <= product.reserved <= product.stock_on_hand
            assert product.available >= 0
            assert product.reserved == self._held(product.sku)
            assert product.stock_on_hand == INITIAL[product.sku] - self._sold(product.sku)


@pytest.mark.django_db
def test_any_interleaving_keeps_stock_consistent():
    """Reserved stays within stock, nothing oversells, and stock falls by exactly what was
    committed, whatever order reserves, releases and commits arrive in."""
    run_state_machine_as_test(
        StockMachine,
        settings=settings(
            max_examples=80,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
