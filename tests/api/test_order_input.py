"""Every bad input to ``POST /orders/`` is a 4xx with the error shape, never a 5xx, and
creates nothing: no order, no saga, no idempotency record."""

from __future__ import annotations

import json

import pytest

from orders.models import IdempotencyRecord

from .conftest import ADDRESS, assert_error, counts, order_body

pytestmark = pytest.mark.django_db

GOOD = order_body([("lamp", 1)])


def with_items(*items) -> dict:
    return {**GOOD, "items": list(items)}


def with_address(**changes) -> dict:
    return {**GOOD, "shipping_address": {**ADDRESS, **changes}}


def without(key: str) -> dict:
    return {k: v for k, v in GOOD.items() if k != key}


def without_address_field(key: str) -> dict:
    return {**GOOD, "shipping_address": {k: v for k, v in ADDRESS.items() if k != key}}


BAD_BODIES = [
    # (id, body, expected code, offending field)
    ("empty items", with_items(), "empty_order", "items"),
    ("missing items", without("items"), "empty_order", "items"),
    ("items null", {**GOOD, "items": None}, "empty_order", "items"),
    ("items not a list", {**GOOD, "items": {"sku": "lamp"}}, "invalid_item", "items"),
    ("items a string", {**GOOD, "items": "lamp"}, "invalid_item", "items"),
    ("item not an object", with_items("lamp"), "invalid_item", "items[0]"),
    (
        "too many lines",
        with_items(*({"sku": f"s{i}", "quantity": 1} for i in range(101))),
        "too_many_items",
        "items",
    ),
    ("missing sku", with_items({"quantity": 1}), "invalid_item", "items[0].sku"),
    ("sku a number", with_items({"sku": 7, "quantity": 1}), "invalid_item", "items[0].sku"),
    ("sku blank", with_items({"sku": "  ", "quantity": 1}), "invalid_item", "items[0].sku"),
    ("sku too long", with_items({"sku": "x" * 65, "quantity": 1}), "invalid_item", "items[0].sku"),
    ("unknown sku", with_items({"sku": "unicorn", "quantity": 1}), "unknown_sku", "items[0].sku"),
    (
        "duplicate sku",
        with_items({"sku": "lamp", "quantity": 1}, {"sku": "lamp", "quantity": 2}),
        "duplicate_sku",
        "items[1].sku",
    ),
    (
        "quantity zero",
        with_items({"sku": "lamp", "quantity": 0}),
        "invalid_quantity",
        "items[0].quantity",
    ),
    (
        "quantity negative",
        with_items({"sku": "lamp", "quantity": -3}),
        "invalid_quantity",
        "items[0].quantity",
    ),
    (
        "quantity absurd",
        with_items({"sku": "lamp", "quantity": 10**12}),
        "invalid_quantity",
        "items[0].quantity",
    ),
    (
        "quantity huge",
        with_items({"sku": "lamp", "quantity": 10**400}),
        "invalid_quantity",
        "items[0].quantity",
    ),
    (
        "quantity a string",
        with_items({"sku": "lamp", "quantity": "2"}),
        "invalid_quantity",
        "items[0].quantity",
    ),
    (
        "quantity a float",
        with_items({"sku": "lamp", "quantity": 1.5}),
        "invalid_quantity",
        "items[0].quantity",
    ),
    (
        "quantity a bool",
        with_items({"sku": "lamp", "quantity": True}),
        "invalid_quantity",
        "items[0].quantity",
    ),
    (
        "quantity null",
        with_items({"sku": "lamp", "quantity": None}),
        "invalid_quantity",
        "items[0].quantity",
    ),
    (
        "missing payment method",
        without("payment_method"),
        "invalid_payment_method",
        "payment_method",
    ),
    (
        "unknown payment method",
        {**GOOD, "payment_method": "pm_card_amex"},
        "invalid_payment_method",
        "payment_method",
    ),
    (
        "payment method a list",
        {**GOOD, "payment_method": ["pm_card_visa"]},
        "invalid_payment_method",
        "payment_method",
    ),
    (
        "missing address",
        without("shipping_address"),
        "invalid_shipping_address",
        "shipping_address",
    ),
    (
        "address a string",
        {**GOOD, "shipping_address": "London"},
        "invalid_shipping_address",
        "shipping_address",
    ),
    (
        "missing city",
        without_address_field("city"),
        "invalid_shipping_address",
        "shipping_address.city",
    ),
    (
        "name too long",
        with_address(name="n" * 201),
        "invalid_shipping_address",
        "shipping_address.name",
    ),
    (
        "line1 too long",
        with_address(line1="l" * 201),
        "invalid_shipping_address",
        "shipping_address.line1",
    ),
    (
        "postal code too long",
        with_address(postal_code="9" * 21),
        "invalid_shipping_address",
        "shipping_address.postal_code",
    ),
    ("blank name", with_address(name=""), "invalid_shipping_address", "shipping_address.name"),
    ("name a number", with_address(name=42), "invalid_shipping_address", "shipping_address.name"),
    (
        "country a name",
        with_address(country="United Kingdom"),
        "invalid_shipping_address",
        "shipping_address.country",
    ),
    (
        "country three letters",
        with_address(country="GBR"),
        "invalid_shipping_address",
        "shipping_address.country",
    ),
    (
        "country not assigned",
        with_address(country="ZZ"),
        "invalid_shipping_address",
        "shipping_address.country",
    ),
    (
        "country digits",
        with_address(country="12"),
        "invalid_shipping_address",
        "shipping_address.country",
    ),
    (
        "country empty",
        with_address(country=""),
        "invalid_shipping_address",
        "shipping_address.country",
    ),
    # Names an order does not take are refused, not ignored (the order would be placed at
    # the full price for a client that believes its coupon or price took effect).
    ("a coupon", {**GOOD, "coupon": "FREE"}, "unknown_field", "coupon"),
    ("a total", {**GOOD, "total": "0.01"}, "read_only_field", "total"),
    (
        "an item's price",
        with_items({"sku": "lamp", "quantity": 1, "price": "0.01"}),
        "unknown_field",
        "items[0].price",
    ),
    (
        "an item's unit price",
        with_items({"sku": "lamp", "quantity": 1, "unit_price": "0.01"}),
        "read_only_field",
        "items[0].unit_price",
    ),
    (
        "an address's phone",
        with_address(phone="+44 20 7946 0000"),
        "unknown_field",
        "shipping_address.phone",
    ),
]


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [pytest.param(body, code, field, id=name) for name, body, code, field in BAD_BODIES],
)
def test_bad_order_input_is_400_with_code_and_field_and_creates_nothing(
    client_api, catalog, body, code, field
):
    """400 with the order error code and the offending input path; nothing created, with or
    without an Idempotency-Key (the key stays free for a corrected retry)."""
    before = counts()
    for headers in ({}, {"Idempotency-Key": "k-1"}):
        response = client_api.post("/api/v1/orders/", body, format="json", headers=headers)
        error = assert_error(response, 400, code)
        assert field in error["fields"], error
        assert counts() == before
        assert IdempotencyRecord.objects.count() == 0


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        pytest.param(
            with_items({"sku": 7, "quantity": 1}),
            "items[0].sku",
            "A sku is a string.",
            id="sku-a-number",
        ),
        pytest.param(
            with_items({"quantity": 1}), "items[0].sku", "A sku is required.", id="sku-missing"
        ),
        pytest.param(
            with_address(country=12),
            "shipping_address.country",
            "This field is a string.",
            id="country-a-number",
        ),
        pytest.param(
            with_address(name={"x": 1}),
            "shipping_address.name",
            "This field is a string.",
            id="name-an-object",
        ),
        pytest.param(
            with_address(name=None),
            "shipping_address.name",
            "This field is a string, not null.",
            id="name-null",
        ),
        pytest.param(
            with_address(name="\u200b"),
            "shipping_address.name",
            "This field is required.",
            id="name-a-zero-width-space",
        ),
        pytest.param(
            with_address(city="\ufeff \u202e"),
            "shipping_address.city",
            "This field is required.",
            id="city-a-byte-order-mark-and-a-direction-mark",
        ),
        pytest.param(
            without_address_field("line1"),
            "shipping_address.line1",
            "This field is required.",
            id="line1-missing",
        ),
        pytest.param(
            {**GOOD, "shipping_address": "London"},
            "shipping_address",
            "A shipping address is an object with name, line1, city, postal_code and country, "
            "not a string.",
            id="address-a-string",
        ),
        pytest.param(
            without("shipping_address"),
            "shipping_address",
            "A shipping address with name, line1, city, postal_code and country is required.",
            id="address-missing",
        ),
        pytest.param(
            {**GOOD, "payment_method": 7},
            "payment_method",
            "A payment method is a string, not a number; use one of pm_card_visa, "
            "pm_card_declined, pm_card_capture_declined, pm_card_refund_fails, "
            "pm_card_3ds_required.",
            id="payment-method-a-number",
        ),
        pytest.param(
            {**GOOD, "payment_method": "pm_card_amex"},
            "payment_method",
            "Unknown payment method; use one of pm_card_visa, pm_card_declined, "
            "pm_card_capture_declined, pm_card_refund_fails, pm_card_3ds_required.",
            id="payment-method-unknown",
        ),
        pytest.param(
            {**GOOD, "items": {"sku": "lamp", "quantity": 1}},
            "items",
            "Items are a list of objects with sku and quantity, not an object.",
            id="items-an-object",
        ),
        pytest.param(
            with_items(["lamp", 1]),
            "items[0]",
            "Each item is an object with sku and quantity, not a list.",
            id="item-a-list",
        ),
        pytest.param(
            with_items({"sku": "lamp", "quantity": "2"}),
            "items[0].quantity",
            "Quantity must be an integer.",
            id="quantity-a-string",
        ),
        pytest.param(
            with_items({"sku": "lamp"}),
            "items[0].quantity",
            "A quantity is required.",
            id="quantity-missing",
        ),
    ],
)
def test_a_value_of_the_wrong_type_is_told_apart_from_a_missing_one(
    client_api, catalog, body, field, message
):
    """A number where a string goes is not "required": the message says what is wrong."""
    error = assert_error(client_api.post("/api/v1/orders/", body, format="json"), 400)
    assert error["fields"][field] == [message], error


@pytest.mark.parametrize(
    ("country", "message"),
    [
        ("XX", "XX is not a known ISO 3166-1 country code."),
        ("zz", "ZZ is not a known ISO 3166-1 country code."),
        ("GBR", "A two-letter ISO 3166-1 country code is required."),
        ("G1", "A two-letter ISO 3166-1 country code is required."),
        ("United Kingdom", "A two-letter ISO 3166-1 country code is required."),
    ],
)
def test_a_country_of_two_letters_no_country_has_is_told_so(client_api, catalog, country, message):
    """``XX`` is two letters: it is told it is no known code, not that two letters are
    required; a value of another shape is still told the shape. The code is unchanged."""
    body = with_address(country=country)
    error = assert_error(client_api.post("/api/v1/orders/", body, format="json"), 400)
    assert error["code"] == "invalid_shipping_address"
    assert error["fields"]["shipping_address.country"] == [message], error


def test_names_an_order_does_not_take_are_each_refused_under_their_path(client_api, catalog):
    """A coupon, an item's price and an address's phone: one 400 naming each (an order, an
    item, an address each says what it takes), the unknown names first and their code the
    error's, beside the other problems of the body; nothing is placed."""
    body = {
        **GOOD,
        "coupon": "FREE",
        "currency": "USD",
        "items": [{"sku": "lamp", "quantity": 0, "price": "0.01"}],
        "shipping_address": {**ADDRESS, "phone": "+44 20 7946 0000"},
    }
    before = counts()
    error = assert_error(client_api.post("/api/v1/orders/", body, format="json"), 400)
    assert error["code"] == "unknown_field", error
    assert error["fields"] == {
        "coupon": ["Unknown field: an order takes items, payment_method and shipping_address."],
        "currency": ["Read-only: an order is in its products' currency."],
        "items[0].price": ["Unknown field: an item takes sku and quantity."],
        "shipping_address.phone": [
            "Unknown field: a shipping address takes name, line1, city, postal_code and country."
        ],
        "items[0].quantity": ["Quantity must be between 1 and 1000."],
    }, error
    assert error["detail"].startswith("coupon: Unknown field"), error
    assert counts() == before


def test_the_read_only_names_are_those_of_the_order_the_api_returns():
    """Each name of the order's representation but the three a request sends is read-only,
    and so is each of an item's but sku and quantity: a client that sends back what it read
    is told the field is the server's, not that it does not exist."""
    from orders.representation import OrderItemSerializer, OrderSerializer
    from orders.services import ITEM_FIELDS, ITEM_READ_ONLY, ORDER_FIELDS, ORDER_READ_ONLY

    assert set(ORDER_READ_ONLY) == set(OrderSerializer.Meta.fields) - set(ORDER_FIELDS)
    assert set(ITEM_READ_ONLY) == set(OrderItemSerializer.Meta.fields) - set(ITEM_FIELDS)


def test_a_replay_is_answered_before_the_body_is_checked(client_api, catalog):
    """A key whose order was placed from a body with an extra name (before such names were
    refused) still replays that order for the same body: the replay compares the body as
    sent, and only a request that may place an order is checked."""
    from config.idempotency import request_fingerprint

    headers = {"Idempotency-Key": "placed-before"}
    first = client_api.post("/api/v1/orders/", GOOD, format="json", headers=headers)
    assert first.status_code == 201, first.content
    with_coupon = {**GOOD, "coupon": "FREE"}
    IdempotencyRecord.objects.update(fingerprint=request_fingerprint(with_coupon))
    again = client_api.post("/api/v1/orders/", with_coupon, format="json", headers=headers)
    assert again.status_code == 201, again.content
    assert again["Idempotent-Replayed"] == "true" and again.json()["id"] == first.json()["id"]
    assert counts() == (1, 1)


def test_every_problem_is_reported_at_once(client_api, catalog):
    """Several mistakes: one 400 naming each field."""
    body = {
        "items": [{"sku": "lamp", "quantity": 0}, {"sku": 5, "quantity": 1}],
        "payment_method": "cash",
        "shipping_address": {**ADDRESS, "country": "Narnia"},
    }
    error = assert_error(client_api.post("/api/v1/orders/", body, format="json"), 400)
    assert set(error["fields"]) >= {
        "items[0].quantity",
        "items[1].sku",
        "payment_method",
        "shipping_address.country",
    }


@pytest.mark.parametrize(
    ("raw", "content_type", "status", "code"),
    [
        pytest.param(b'{"items": [', "application/json", 400, "parse_error", id="truncated"),
        pytest.param(b"not json at all", "application/json", 400, "parse_error", id="garbage"),
        pytest.param(b'{"items": NaN}', "application/json", 400, "parse_error", id="nan"),
        pytest.param(b"\xff\xfe\xfd", "application/json", 400, "parse_error", id="bad-utf8"),
        pytest.param(
            b"[" * 100_000 + b"]" * 100_000,
            "application/json",
            400,
            "parse_error",
            id="deep-nesting",
        ),
        pytest.param(
            b"{}", "application/json; charset=bz2_codec", 400, "parse_error", id="bad-charset"
        ),
        pytest.param(
            b"{}", "application/json; charset=no-such", 400, "empty_order", id="unknown-charset"
        ),
        pytest.param(b"[]", "application/json", 400, "invalid", id="array"),
        pytest.param(b'"order"', "application/json", 400, "invalid", id="string"),
        pytest.param(b"null", "application/json", 400, "invalid", id="null"),
        pytest.param(b"", "application/json", 400, "empty_order", id="empty-body"),
        pytest.param(
            b"items=1",
            "application/x-www-form-urlencoded",
            415,
            "unsupported_media_type",
            id="form",
        ),
        pytest.param(b"<order/>", "application/xml", 415, "unsupported_media_type", id="xml"),
    ],
)
def test_unreadable_bodies_are_4xx_json(client_api, catalog, raw, content_type, status, code):
    """Malformed JSON, a non-object body, a wrong media type or a charset we cannot decode:
    a 4xx with the error shape, nothing created."""
    before = counts()
    response = client_api.generic("POST", "/api/v1/orders/", raw, content_type=content_type)
    body = assert_error(response, status, code)
    if raw in (b"[]", b'"order"', b"null"):  # the order's own words, what it needs
        assert "items, payment_method and shipping_address" in body["detail"], body
    assert counts() == before


def test_a_line_with_an_unknown_sku_and_a_bad_quantity_reports_both(client_api, catalog):
    body = {**GOOD, "items": [{"sku": "NOPE", "quantity": 0}]}
    error = assert_error(client_api.post("/api/v1/orders/", body, format="json"), 400)
    assert set(error["fields"]) == {"items[0].sku", "items[0].quantity"}, error
    assert "No product with sku 'NOPE'" in error["fields"]["items[0].sku"][0]


def test_a_sku_ordered_twice_is_reported_whatever_its_first_quantity(client_api, catalog):
    body = {**GOOD, "items": [{"sku": "lamp", "quantity": 0}, {"sku": "lamp", "quantity": 1}]}
    error = assert_error(client_api.post("/api/v1/orders/", body, format="json"), 400)
    assert set(error["fields"]) == {"items[0].quantity", "items[1].sku"}, error
    assert "appears twice" in error["fields"]["items[1].sku"][0]


def test_a_key_twice_in_one_object_is_a_parse_error_and_places_nothing(client_api, catalog):
    """JSON leaves open which one counts (Python keeps the last): refused, not guessed."""
    before = counts()
    text = json.dumps(GOOD)[:-1] + ', "payment_method": "pm_card_declined"}'
    response = client_api.generic("POST", "/api/v1/orders/", text, content_type="application/json")
    body = assert_error(response, 400, "parse_error")
    assert "'payment_method' appears twice" in body["detail"], body
    nested = json.dumps({**GOOD, "shipping_address": {}})
    nested = nested.replace(
        '"shipping_address": {}', '"shipping_address": {"city": "A", "city": "B"}'
    )
    response = client_api.generic(
        "POST", "/api/v1/orders/", nested, content_type="application/json"
    )
    assert "'city' appears twice" in assert_error(response, 400, "parse_error")["detail"]
    assert counts() == before


def test_a_body_nested_too_deeply_says_so(client_api, catalog):
    raw = b"[" * 100_000 + b"]" * 100_000
    response = client_api.generic("POST", "/api/v1/orders/", raw, content_type="application/json")
    body = assert_error(response, 400, "parse_error")
    assert body["detail"] == "JSON parse error - the body is nested too deeply (at most 64 levels)"


def test_a_body_over_the_upload_limit_is_413(client_api, catalog, settings):
    """Bigger than DATA_UPLOAD_MAX_MEMORY_SIZE: 413 ``payload_too_large``."""
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    body = json.dumps({**GOOD, "padding": "x" * 2000})
    response = client_api.generic("POST", "/api/v1/orders/", body, content_type="application/json")
    assert_error(response, 413, "payload_too_large")


@pytest.mark.parametrize(
    ("key", "code"),
    [
        ("", "invalid_idempotency_key"),
        ("k" * 256, "invalid_idempotency_key"),
        ("a\tb", "invalid_idempotency_key"),
    ],
)
def test_bad_idempotency_keys_are_400(client_api, catalog, key, code):
    """An empty, over-long (256 characters) or control-character key: 400, nothing created."""
    before = counts()
    response = client_api.post(
        "/api/v1/orders/", GOOD, format="json", headers={"Idempotency-Key": key}
    )
    assert_error(response, 400, code)
    assert counts() == before


def test_a_255_character_key_is_accepted(client_api, catalog):
    """The documented limit is inclusive."""
    response = client_api.post(
        "/api/v1/orders/", GOOD, format="json", headers={"Idempotency-Key": "k" * 255}
    )
    assert response.status_code == 201


def test_lower_case_country_is_accepted_and_normalised(client_api, catalog):
    """``gb`` is GB."""
    from orders.models import Order

    response = client_api.post("/api/v1/orders/", with_address(country="gb"), format="json")
    assert response.status_code == 201
    assert Order.objects.get(pk=response.json()["id"]).shipping_country == "GB"


def test_a_sku_is_taken_exactly_as_written_case_included(client_api, staff_api, catalog):
    """Unlike a currency or country code, a sku is not upper-cased: ``LAMP`` is not the
    ``lamp`` of the catalog (an order naming it is ``unknown_sku``, nothing placed), and a
    product ``LAMP`` is another product beside ``lamp``."""
    before = counts()
    refused = client_api.post("/api/v1/orders/", order_body([("LAMP", 1)]), format="json")
    error = assert_error(refused, 400, "unknown_sku")
    assert list(error["fields"]) == ["items[0].sku"]
    assert counts() == before
    created = staff_api.post(
        "/api/v1/products/", {"sku": "LAMP", "name": "Lamp, loud", "price": "5.00"}, format="json"
    )
    assert created.status_code == 201, created.content
    assert staff_api.get("/api/v1/products/lamp/").json()["price"] == "19.90"
