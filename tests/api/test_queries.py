"""SQL queries per request: the order detail runs a constant number, whatever its item count;
the order list has no N+1, whatever the page size."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from payments.models import Payment
from shipping.models import Shipment

from .conftest import make_product

pytestmark = pytest.mark.django_db

#: Token lookup (with its user), order + saga, items, payment, shipment.
DETAIL_MAX_QUERIES = 5
#: The same plus the page count.
LIST_MAX_QUERIES = 6


@pytest.fixture
def many_products(db):
    return [make_product(f"sku-{i:02d}", price="1.50") for i in range(20)]


def with_money_and_shipment(order_id) -> None:
    """Give an order a payment and a shipment, so the queries that read them find rows."""
    Payment.objects.create(
        order_id=order_id, currency="EUR", amount=Decimal("1.50"), authorized_amount=Decimal("1.50")
    )
    Shipment.objects.create(
        key=f"k:{order_id}", order_id=order_id, status="arranged", carrier="C", tracking_number=""
    )


def queries_for(api, path: str) -> int:
    with CaptureQueriesContext(connection) as ctx:
        response = api.get(path)
    assert response.status_code == 200, response.content
    return len(ctx.captured_queries)


def test_order_detail_runs_the_same_queries_for_1_and_10_items(client_api, place, many_products):
    """1 item or 10: the same number of queries, at most DETAIL_MAX_QUERIES."""
    small = place(client_api, [("sku-00", 1)])
    large = place(client_api, [(f"sku-{i:02d}", 1) for i in range(10)])
    for order in (small, large):
        with_money_and_shipment(order["id"])
    small_n = queries_for(client_api, f"/api/v1/orders/{small['id']}/")
    large_n = queries_for(client_api, f"/api/v1/orders/{large['id']}/")
    assert small_n == large_n <= DETAIL_MAX_QUERIES, (small_n, large_n)


def test_order_list_runs_the_same_queries_for_1_and_20_orders(
    client_api, other_api, place, many_products
):
    """A page of 1 order or of 20 (with 3 items each, payments and shipments): the same number
    of queries, at most LIST_MAX_QUERIES: no query per order."""
    place(other_api, [("sku-00", 1)])
    one = queries_for(other_api, "/api/v1/orders/")
    for i in range(20):
        lines = [(f"sku-{(i + j) % 20:02d}", j + 1) for j in range(3)]
        order = place(client_api, lines)
        with_money_and_shipment(order["id"])
    twenty = queries_for(client_api, "/api/v1/orders/")
    assert client_api.get("/api/v1/orders/").json()["count"] == 20
    assert one == twenty <= LIST_MAX_QUERIES, (one, twenty)


def test_timeline_and_staff_views_are_bounded(client_api, staff_api, place, many_products):
    """The timeline and the staff saga list do not grow with the number of events or sagas."""
    orders = [place(client_api, [("sku-00", 1)]) for _ in range(10)]
    assert queries_for(client_api, f"/api/v1/orders/{orders[0]['id']}/timeline/") <= 4
    assert queries_for(staff_api, "/api/v1/sagas/") <= 4
    assert queries_for(staff_api, "/api/v1/products/") <= 3
