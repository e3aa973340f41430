"""Placing an order: validation, prices captured at order time, one transaction with its saga."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from orders.errors import OrderInvalid
from orders.models import Order, OrderItem
from orders.selectors import OrderStatus
from orders.services import order_create, order_request_cancel
from sagas.exceptions import SagaOperationRefused
from sagas.models import Saga, SagaState
from tests.api.test_order_input import BAD_BODIES as API_BAD_BODIES

from .conftest import ADDRESS, make_product, place

pytestmark = pytest.mark.django_db


@pytest.fixture
def catalog():
    return [
        make_product("lamp", price="19.90", stock=5),
        make_product("desk", price="249.00", stock=2),
    ]


def test_order_is_priced_from_the_catalog_and_starts_its_saga(customer, catalog):
    """The order captures unit prices and the total, and its saga starts at reserve_inventory
    with ids, amounts and codes only (no name, address or payment method)."""
    order = place(customer, [("lamp", 2), ("desk", 1)], payment_method="pm_card_visa")

    order = Order.objects.select_related("saga").get(pk=order.pk)
    assert order.total == Decimal("288.80")
    assert order.currency == "EUR"
    assert {(i.sku, i.quantity, i.unit_price) for i in order.items.all()} == {
        ("lamp", 2, Decimal("19.90")),
        ("desk", 1, Decimal("249.00")),
    }
    assert order.shipping_address == ADDRESS
    assert order.status == OrderStatus.PROCESSING
    assert order.step == "reserve_inventory"
    assert order.cancellation_reason is None
    saga = order.saga
    assert saga.saga_type == "order"
    assert saga.correlation_id == str(order.id)
    assert saga.data == {
        "order_id": str(order.id),
        "amount": "288.80",
        "currency": "EUR",
        "lines": [["desk", 1], ["lamp", 2]],
    }
    flat = repr(saga.data)
    for personal in (*ADDRESS.values(), "pm_card_visa", customer.email):
        assert personal not in flat


def test_placing_an_order_reads_the_catalog_once_and_writes_order_and_items_together(
    customer, catalog
):
    """Every order placed pays these: the catalog read in a text built once (any number of
    skus, one text), and the order with its items in one INSERT statement."""
    with CaptureQueriesContext(connection) as ctx:
        order = place(customer, [("lamp", 2), ("desk", 1)])
    sql = [q["sql"] for q in ctx.captured_queries]
    reads = [s for s in sql if 'FROM "inventory_product"' in s]
    assert len(reads) == 1 and '"sku" = ANY(' in reads[0], reads
    writes = [s for s in sql if '"orders_order' in s]
    assert len(writes) == 1, writes
    assert writes[0].startswith('WITH p AS (INSERT INTO "orders_order" (')
    assert 'INSERT INTO "orders_orderitem"' in writes[0]
    assert sorted(order.items.values_list("sku", "quantity")) == [("desk", 1), ("lamp", 2)]
    # Opening and closing its transaction (a savepoint inside this test's), the catalog, the
    # client's webhook subscription, the saga's start, the order with its items.
    assert len(sql) == 6, "\n".join(s[:80] for s in sql)


def test_a_later_price_change_does_not_touch_the_order(customer, catalog):
    """Prices are captured when the order is placed."""
    order = place(customer, [("lamp", 1)])
    catalog[0].price = Decimal("99.00")
    catalog[0].save()

    assert OrderItem.objects.get(order=order).unit_price == Decimal("19.90")
    assert Order.objects.get(pk=order.pk).total == Decimal("19.90")


def test_country_code_is_normalised_to_upper_case(customer, catalog):
    """A lower-case country code is accepted and stored upper-case."""
    order = order_create(
        owner=customer,
        items=[{"sku": "lamp", "quantity": 1}],
        payment_method="pm_card_visa",
        shipping_address={**ADDRESS, "country": "de"},
    )
    assert order.shipping_country == "DE"


GOOD = {
    "items": [{"sku": "lamp", "quantity": 1}],
    "payment_method": "pm_card_visa",
    "shipping_address": ADDRESS,
}


@pytest.mark.parametrize(
    ("change", "code", "field"),
    [
        ({"items": []}, "empty_order", "items"),
        ({"items": "lamp"}, "invalid_item", "items"),
        ({"items": [{"sku": "lamp", "quantity": 0}]}, "invalid_quantity", "items[0].quantity"),
        ({"items": [{"sku": "lamp", "quantity": 1001}]}, "invalid_quantity", "items[0].quantity"),
        ({"items": [{"sku": "lamp", "quantity": "2"}]}, "invalid_quantity", "items[0].quantity"),
        ({"items": [{"sku": "lamp", "quantity": True}]}, "invalid_quantity", "items[0].quantity"),
        ({"items": [{"sku": "", "quantity": 1}]}, "invalid_item", "items[0].sku"),
        ({"items": ["lamp"]}, "invalid_item", "items[0]"),
        ({"items": [{"sku": "nope", "quantity": 1}]}, "unknown_sku", "items[0].sku"),
        (
            {"items": [{"sku": "lamp", "quantity": 1}, {"sku": "lamp", "quantity": 2}]},
            "duplicate_sku",
            "items[1].sku",
        ),
        (
            {"items": [{"sku": f"s{i}", "quantity": 1} for i in range(101)]},
            "too_many_items",
            "items",
        ),
        ({"payment_method": "pm_card_amex"}, "invalid_payment_method", "payment_method"),
        ({"payment_method": None}, "invalid_payment_method", "payment_method"),
        ({"shipping_address": None}, "invalid_shipping_address", "shipping_address"),
        (
            {"shipping_address": {**ADDRESS, "country": "GBR"}},
            "invalid_shipping_address",
            "shipping_address.country",
        ),
        (
            {"shipping_address": {**ADDRESS, "country": "ZZ"}},
            "invalid_shipping_address",
            "shipping_address.country",
        ),
        (
            {"shipping_address": {**ADDRESS, "city": "  "}},
            "invalid_shipping_address",
            "shipping_address.city",
        ),
        (
            {"shipping_address": {**ADDRESS, "postal_code": "9" * 21}},
            "invalid_shipping_address",
            "shipping_address.postal_code",
        ),
    ],
)
def test_bad_input_is_refused_with_a_code_and_the_field_and_nothing_is_created(
    customer, catalog, change, code, field
):
    """Each malformed request raises OrderInvalid naming the problem and the field; no order,
    item or saga is written."""
    with pytest.raises(OrderInvalid) as refused:
        order_create(owner=customer, **{**GOOD, **change})

    assert refused.value.code == code
    assert field in refused.value.fields
    assert refused.value.detail
    assert not Order.objects.exists()
    assert not Saga.objects.exists()


def test_every_problem_is_reported_at_once(customer, catalog):
    """A request with several problems names each offending field."""
    with pytest.raises(OrderInvalid) as refused:
        order_create(
            owner=customer,
            items=[{"sku": "nope", "quantity": 1}, {"sku": "lamp", "quantity": -1}],
            payment_method="cash",
            shipping_address={**ADDRESS, "country": ""},
        )
    assert set(refused.value.fields) == {
        "items[0].sku",
        "items[1].quantity",
        "payment_method",
        "shipping_address.country",
    }


def test_items_in_two_currencies_are_refused(customer, catalog):
    """One order is paid in one currency."""
    make_product("kettle", price="30.00", currency="GBP")
    with pytest.raises(OrderInvalid) as refused:
        place(customer, [("lamp", 1), ("kettle", 1)])
    assert refused.value.code == "mixed_currency"


def test_a_total_beyond_the_money_column_is_refused(customer):
    """A total that would not fit Decimal(12, 2) is a 400, not a database error."""
    make_product("yacht", price="9999999999.99")
    with pytest.raises(OrderInvalid) as refused:
        place(customer, [("yacht", 2)])
    assert refused.value.code == "total_too_large"


def test_cancel_request_on_a_running_saga_makes_the_order_cancelling(customer, catalog):
    """A cancel before capture is recorded on the saga: the order shows cancelling with the
    customer's reason, and asking twice is harmless."""
    order = place(customer, [("lamp", 1)])

    order = order_request_cancel(order=order, actor=customer)
    order_request_cancel(order=order, actor="ada")

    order = Order.objects.select_related("saga").get(pk=order.pk)
    assert order.saga.cancel_reason == "customer_cancelled"
    assert order.status == OrderStatus.CANCELLING
    assert order.cancellation_reason == "customer_cancelled"
    assert order.saga.events.filter(kind="cancel_requested").count() == 1


def test_cancel_request_after_the_saga_finished_is_refused(customer, catalog):
    """Once confirmed, a cancel is refused by the engine and nothing changes."""
    order = place(customer, [("lamp", 1)])
    Saga.objects.filter(pk=order.saga_id).update(state=SagaState.SUCCEEDED)
    order = Order.objects.select_related("saga").get(pk=order.pk)

    with pytest.raises(SagaOperationRefused) as refused:
        order_request_cancel(order=order, actor=customer)

    assert refused.value.code == "not_running"
    assert Order.objects.select_related("saga").get(pk=order.pk).status == OrderStatus.CONFIRMED


@pytest.mark.parametrize(
    "body, code, field",
    [pytest.param(body, code, field, id=name) for name, body, code, field in API_BAD_BODIES],
)
def test_the_service_alone_refuses_every_bad_api_body_with_the_api_code(
    customer, catalog, body, code, field
):
    """Order input is checked in one place, ``order_create``: each bad body of the API's own
    table, handed to the service as it came (no serializer in between), is refused with the
    code and field the API answers with, and writes nothing."""
    keys = ("items", "payment_method", "shipping_address")
    with pytest.raises(OrderInvalid) as refused:
        order_create(owner=customer, **{k: body.get(k) for k in keys}, body_fields=body)
    assert (refused.value.code, field in refused.value.fields) == (code, True)
    assert not Order.objects.exists()


def test_the_service_alone_refuses_a_nul_in_a_sku(customer, catalog):
    """The API refuses a NUL anywhere in a body before the service sees it (parse_error, see
    tests/api/test_unstorable_text.py); other callers of the service get invalid_item."""
    items = [{"sku": "la\x00mp", "quantity": 1}]
    with pytest.raises(OrderInvalid) as refused:
        order_create(owner=customer, **{**GOOD, "items": items})
    assert refused.value.code == "invalid_item" and "items[0].sku" in refused.value.fields
    assert not Order.objects.exists()


@pytest.mark.parametrize(
    ("method", "says"),
    [
        (None, "A payment method is required"),
        ("", "A payment method is required"),
        ("cash", "Unknown payment method"),
    ],
)
def test_a_missing_payment_method_is_called_missing_not_unknown(customer, catalog, method, says):
    with pytest.raises(OrderInvalid) as refused:
        order_create(owner=customer, **{**GOOD, "payment_method": method})
    assert refused.value.fields["payment_method"][0].startswith(says), refused.value.fields
