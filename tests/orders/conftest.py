"""Helpers for the order tests: a customer, a catalog, placing an order, waiting for it."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from inventory.models import Product
from orders.models import Order
from orders.selectors import OrderStatus
from orders.services import order_create
from sagas.models import SagaEvent

ADDRESS = {
    "name": "Ada Lovelace",
    "line1": "12 St James's Square",
    "city": "London",
    "postal_code": "SW1Y 4JH",
    "country": "GB",
}


@pytest.fixture
def customer(django_user_model):
    return django_user_model.objects.create_user("ada", email="ada@example.com")


def make_product(sku: str, *, price: str = "10.00", stock: int = 10, currency: str = "EUR"):
    return Product.objects.create(
        sku=sku, name=sku.title(), price=Decimal(price), currency=currency, stock_on_hand=stock
    )


def place(
    owner,
    lines: list[tuple[str, int]],
    *,
    payment_method: str = "pm_card_visa",
    country: str = "GB",
) -> Order:
    return order_create(
        owner=owner,
        items=[{"sku": sku, "quantity": qty} for sku, qty in lines],
        payment_method=payment_method,
        shipping_address={**ADDRESS, "country": country},
    )


def fresh(order: Order) -> Order:
    return Order.objects.select_related("saga").get(pk=order.pk)


def describe(order: Order) -> Callable[[], dict[str, Any]]:
    """What a failing wait shows: the saga row and the tail of its timeline."""

    def show() -> dict[str, Any]:
        o = fresh(order)
        events = list(
            SagaEvent.objects.filter(saga_id=o.saga_id)
            .order_by("-id")
            .values_list("kind", "step", "detail")[:8]
        )
        return {
            "status": o.status,
            "saga": o.saga.state,
            "step": o.saga.current_step,
            "last_error": o.saga.last_error,
            "events (newest first)": events,
        }

    return show


@pytest.fixture
def settle(wait_for) -> Callable[..., Order]:
    """``settle(order, timeout=30)``: wait until the order is confirmed, cancelled or
    needs_attention, and return it freshly read."""

    def wait(order: Order, timeout: float = 30) -> Order:
        def settled() -> Order | None:
            o = fresh(order)
            return o if o.status in OrderStatus.SETTLED else None

        return wait_for(settled, timeout=timeout, describe=describe(order))

    return wait
