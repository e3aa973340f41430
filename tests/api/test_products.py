"""``/api/v1/products/``: any authenticated user reads; staff create and change."""

from __future__ import annotations

from decimal import Decimal

import pytest

from inventory.models import Product

from .conftest import assert_error

pytestmark = pytest.mark.django_db

PRODUCTS = "/api/v1/products/"
FIELDS = {"sku", "name", "price", "currency", "stock_on_hand", "reserved", "available"}


def test_any_authenticated_user_lists_and_reads_products(client_api, catalog):
    """Sorted by sku, prices as decimal strings, available = stock_on_hand - reserved."""
    Product.objects.filter(sku="lamp").update(reserved=5)
    page = client_api.get(PRODUCTS).json()
    assert [p["sku"] for p in page["results"]] == ["desk", "lamp", "mug"]
    lamp = client_api.get(f"{PRODUCTS}lamp/").json()
    assert set(lamp) == FIELDS
    assert lamp == {
        "sku": "lamp",
        "name": "Lamp",
        "price": "19.90",
        "currency": "EUR",
        "stock_on_hand": 50,
        "reserved": 5,
        "available": 45,
    }


def test_anonymous_cannot_read_products(anon_api, catalog):
    """401 with the error shape."""
    assert_error(anon_api.get(PRODUCTS), 401, "not_authenticated")
    assert_error(anon_api.get(f"{PRODUCTS}lamp/"), 401, "not_authenticated")


def test_unknown_sku_is_404(client_api, catalog):
    assert_error(client_api.get(f"{PRODUCTS}unicorn/"), 404, "not_found")


@pytest.mark.parametrize("sku", ["%00", "lamp%00", "%00lamp"])
def test_a_sku_with_a_nul_byte_is_400_not_500(client_api, staff_api, catalog, sku):
    """PostgreSQL text cannot hold NUL: a URL with one is refused, for reads and changes."""
    assert_error(client_api.get(f"{PRODUCTS}{sku}/"), 400, "bad_request")
    assert_error(staff_api.patch(f"{PRODUCTS}{sku}/", {"name": "x"}, format="json"), 400)


def test_staff_create_a_product(staff_api):
    """201 with the product; price kept exactly; reserved starts at 0."""
    response = staff_api.post(
        PRODUCTS,
        {"sku": "SR-PEN.2", "name": "Pen", "price": "1.05", "currency": "EUR", "stock_on_hand": 7},
        format="json",
    )
    assert response.status_code == 201, response.content
    assert response.json() == {
        "sku": "SR-PEN.2",
        "name": "Pen",
        "price": "1.05",
        "currency": "EUR",
        "stock_on_hand": 7,
        "reserved": 0,
        "available": 7,
    }
    assert staff_api.get(f"{PRODUCTS}SR-PEN.2/").status_code == 200


def test_clients_cannot_create_or_change_products(client_api, catalog):
    """403 with the error shape; nothing changes."""
    assert_error(
        client_api.post(PRODUCTS, {"sku": "x", "name": "X", "price": "1.00"}, format="json"),
        403,
        "permission_denied",
    )
    assert_error(
        client_api.patch(f"{PRODUCTS}lamp/", {"price": "0.01"}, format="json"),
        403,
        "permission_denied",
    )
    assert str(Product.objects.get(sku="lamp").price) == "19.90"
    assert not Product.objects.filter(sku="x").exists()


def test_a_currency_in_lower_case_is_taken_and_stored_upper_case(staff_api, catalog):
    """The one rule for codes: either case, stored upper case (``eur`` is EUR, as an order's
    ``gb`` is GB), on create and on change."""
    body = {"sku": "x", "name": "X", "price": "1.00", "currency": "eur"}
    created = staff_api.post(PRODUCTS, body, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["currency"] == "EUR"
    changed = staff_api.patch(f"{PRODUCTS}lamp/", {"currency": "gbp"}, format="json")
    assert changed.status_code == 200, changed.content
    assert changed.json()["currency"] == "GBP"
    assert dict(Product.objects.values_list("sku", "currency").filter(sku__in=["x", "lamp"])) == {
        "x": "EUR",
        "lamp": "GBP",
    }


@pytest.mark.parametrize("currency", ["EURO", "E1R", "eu", "xau", "kwd"])
def test_a_currency_that_is_no_code_in_use_is_told_what_it_should_be(staff_api, catalog, currency):
    body = {"sku": "x", "name": "X", "price": "1.00", "currency": currency}
    error = assert_error(staff_api.post(PRODUCTS, body, format="json"), 400, "invalid")
    assert list(error["fields"]) == ["currency"], error
    assert not Product.objects.filter(sku="x").exists()
    patched = staff_api.patch(f"{PRODUCTS}lamp/", {"currency": currency}, format="json")
    assert list(assert_error(patched, 400, "invalid")["fields"]) == ["currency"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "X", "price": "1.00"}, "sku"),
        ({"sku": "", "name": "X", "price": "1.00"}, "sku"),
        ({"sku": "has space", "name": "X", "price": "1.00"}, "sku"),
        ({"sku": "a/b", "name": "X", "price": "1.00"}, "sku"),
        ({"sku": "x" * 65, "name": "X", "price": "1.00"}, "sku"),
        ({"sku": "lamp", "name": "Dup", "price": "1.00"}, "sku"),
        ({"sku": "x", "price": "1.00"}, "name"),
        # A number or a boolean is no name or sku (it was stored as "5", "True").
        ({"sku": 5, "name": "X", "price": "1.00"}, "sku"),
        ({"sku": "x", "name": 5, "price": "1.00"}, "name"),
        ({"sku": "x", "name": True, "price": "1.00"}, "name"),
        ({"sku": "x", "name": "n" * 201, "price": "1.00"}, "name"),
        ({"sku": "x", "name": "X"}, "price"),
        ({"sku": "x", "name": "X", "price": "-1.00"}, "price"),
        ({"sku": "x", "name": "X", "price": "1.001"}, "price"),
        ({"sku": "x", "name": "X", "price": "NaN"}, "price"),
        ({"sku": "x", "name": "X", "price": "Infinity"}, "price"),
        ({"sku": "x", "name": "X", "price": "1e400"}, "price"),
        ({"sku": "x", "name": "X", "price": "99999999999.00"}, "price"),
        ({"sku": "x", "name": "X", "price": "cheap"}, "price"),
        ({"sku": "x", "name": "X", "price": "1.00", "currency": "EURO"}, "currency"),
        # Not a currency in use (was taken: every order of it then failed at the payment).
        ({"sku": "x", "name": "X", "price": "1.00", "currency": "ZAZ"}, "currency"),
        ({"sku": "x", "name": "X", "price": "1.00", "currency": "XAU"}, "currency"),
        # Three decimal places: the amount columns have two.
        ({"sku": "x", "name": "X", "price": "1.00", "currency": "KWD"}, "currency"),
        # Cents in a currency without minor units: the payment could not be asked for.
        ({"sku": "x", "name": "X", "price": "10.50", "currency": "JPY"}, "price"),
        ({"sku": "x", "name": "X", "price": "1.00", "stock_on_hand": -1}, "stock_on_hand"),
        ({"sku": "x", "name": "X", "price": "1.00", "stock_on_hand": 2**31}, "stock_on_hand"),
        ({"sku": "x", "name": "X", "price": "1.00", "stock_on_hand": "many"}, "stock_on_hand"),
        # Strictly a JSON integer, as an order's quantity (DRF took "5", 5.0 and true).
        ({"sku": "x", "name": "X", "price": "1.00", "stock_on_hand": "5"}, "stock_on_hand"),
        ({"sku": "x", "name": "X", "price": "1.00", "stock_on_hand": 5.0}, "stock_on_hand"),
        ({"sku": "x", "name": "X", "price": "1.00", "stock_on_hand": True}, "stock_on_hand"),
        # A price in ASCII digits with an optional sign and decimals (DRF took these).
        ({"sku": "x", "name": "X", "price": "\uff11\uff12"}, "price"),  # fullwidth 12
        ({"sku": "x", "name": "X", "price": "\u0663"}, "price"),  # Arabic-Indic 3
        ({"sku": "x", "name": "X", "price": "1_000"}, "price"),
        ({"sku": "x", "name": "X", "price": "1e5"}, "price"),
        ({"sku": "x", "name": "X", "price": " 12.00 "}, "price"),
        ({"sku": "x", "name": "X", "price": True}, "price"),
    ],
)
def test_bad_product_input_is_400_and_creates_nothing(staff_api, catalog, body, field):
    """400 ``invalid`` naming the field; the catalog is unchanged."""
    before = Product.objects.count()
    error = assert_error(staff_api.post(PRODUCTS, body, format="json"), 400, "invalid")
    assert field in error["fields"], error
    assert Product.objects.count() == before


@pytest.mark.parametrize(("price", "shown"), [("-0", "0.00"), (-0.0, "0.00"), (12, "12.00")])
def test_a_price_is_answered_as_it_is_stored(staff_api, catalog, price, shown):
    """``-0`` was answered ``"-0.00"`` while the database kept ``0.00``."""
    response = staff_api.post(
        PRODUCTS, {"sku": "free", "name": "Free", "price": price}, format="json"
    )
    assert response.status_code == 201, response.content
    assert response.json()["price"] == shown
    assert staff_api.get(f"{PRODUCTS}free/").json()["price"] == shown


@pytest.mark.parametrize("stock", ["5", 5.0, True])
def test_a_change_of_stock_is_a_json_integer_too(staff_api, catalog, stock):
    response = staff_api.patch(f"{PRODUCTS}lamp/", {"stock_on_hand": stock}, format="json")
    assert "stock_on_hand" in assert_error(response, 400, "invalid")["fields"]
    assert Product.objects.get(sku="lamp").stock_on_hand == 50


def test_staff_change_a_product_with_patch(staff_api, catalog):
    """PATCH changes only what it names."""
    response = staff_api.patch(f"{PRODUCTS}lamp/", {"price": "21.00"}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["price"] == "21.00"
    assert response.json()["sku"] == "lamp"
    lamp = Product.objects.get(sku="lamp")
    assert (str(lamp.price), lamp.name, lamp.stock_on_hand) == ("21.00", "Lamp", 50)


def test_a_name_that_is_not_a_string_is_refused_on_change(staff_api, catalog):
    error = assert_error(staff_api.patch(f"{PRODUCTS}lamp/", {"name": 42}, format="json"), 400)
    assert error["fields"] == {"name": ["Not a valid string."]}, error
    assert Product.objects.get(sku="lamp").name == "Lamp"


def test_a_patch_that_renames_the_sku_is_refused_and_changes_nothing(staff_api, catalog):
    """The sku is the product's address: a new one is 400 read_only_field, not a 200 that
    kept the old sku (and the price sent beside it is not taken either)."""
    response = staff_api.patch(
        f"{PRODUCTS}lamp/", {"price": "21.00", "sku": "renamed"}, format="json"
    )
    error = assert_error(response, 400, "read_only_field")
    assert error["fields"] == {
        "sku": ["A product's sku cannot be changed: it is the product's address (its URL)."]
    }
    lamp = Product.objects.get(sku="lamp")
    assert str(lamp.price) == "19.90"
    assert not Product.objects.filter(sku="renamed").exists()


@pytest.mark.parametrize(
    ("method", "path", "body", "code", "field"),
    [
        ("post", PRODUCTS, {"colour": "red"}, "unknown_field", "colour"),
        ("post", PRODUCTS, {"reserved": 0}, "read_only_field", "reserved"),
        ("post", PRODUCTS, {"available": 7}, "read_only_field", "available"),
        ("patch", f"{PRODUCTS}lamp/", {"discount": "10%"}, "unknown_field", "discount"),
        ("patch", f"{PRODUCTS}lamp/", {"available": 1}, "read_only_field", "available"),
    ],
)
def test_a_name_a_product_does_not_take_is_refused(
    staff_api, catalog, method, path, body, code, field
):
    """Refused, not ignored, beside an otherwise good body: nothing is created or changed."""
    good = {"sku": "SR-NEW", "name": "New", "price": "1.00"} if method == "post" else {}
    before = list(Product.objects.order_by("sku").values_list("sku", "name", "price"))
    response = getattr(staff_api, method)(path, {**good, "name": "Renamed", **body}, format="json")
    error = assert_error(response, 400, code)
    assert list(error["fields"]) == [field], error
    assert list(Product.objects.order_by("sku").values_list("sku", "name", "price")) == before


def test_a_price_and_its_currency_must_fit_together_also_when_one_changes(staff_api, catalog):
    """Whole yen are taken; a change of the currency alone to one the price does not fit is a
    400 on the currency, of the price alone on the price; nothing changes."""
    created = staff_api.post(
        PRODUCTS,
        {"sku": "yen-cup", "name": "Cup", "price": "1200", "currency": "JPY"},
        format="json",
    )
    assert created.status_code == 201, created.content
    assert assert_error(
        staff_api.patch(f"{PRODUCTS}lamp/", {"currency": "JPY"}, format="json"), 400, "invalid"
    )["fields"].keys() == {"currency"}
    lamp = Product.objects.get(sku="lamp")
    assert (lamp.price, lamp.currency) == (Decimal("19.90"), "EUR")
    assert assert_error(
        staff_api.patch(f"{PRODUCTS}yen-cup/", {"price": "1200.50"}, format="json"), 400
    )["fields"].keys() == {"price"}
    both = staff_api.patch(f"{PRODUCTS}lamp/", {"price": "20", "currency": "JPY"}, format="json")
    assert both.status_code == 200, both.content
    lamp = Product.objects.get(sku="lamp")
    assert (lamp.price, lamp.currency) == (Decimal("20"), "JPY")
    assert Product.objects.get(sku="yen-cup").price == Decimal("1200")


def test_a_pair_stored_before_the_rule_does_not_block_other_changes(staff_api, catalog):
    """A product stored as 10.50 JPY (or in a code no longer in use) before prices were checked
    against currencies: its stock and name still change; its price is checked when it does."""
    Product.objects.filter(sku="lamp").update(price=Decimal("10.50"), currency="JPY")
    response = staff_api.patch(
        f"{PRODUCTS}lamp/", {"stock_on_hand": 7, "name": "Old lamp"}, format="json"
    )
    assert response.status_code == 200, response.content
    assert_error(staff_api.patch(f"{PRODUCTS}lamp/", {"price": "11.50"}, format="json"), 400)
    assert staff_api.patch(f"{PRODUCTS}lamp/", {"price": "11"}, format="json").status_code == 200


def test_the_pair_is_checked_again_under_the_rows_lock(staff, catalog):
    """Two changes each checked against the other's old value (a price of 10.50 while the
    product was in EUR, a currency of JPY while the price was whole): the second to take the
    lock is refused instead of storing 10.50 JPY."""
    from django.core.exceptions import ValidationError

    from inventory import catalog as writes

    Product.objects.filter(sku="desk").update(price=Decimal("10.50"))  # the first committed
    with pytest.raises(ValidationError) as refused:
        writes.product_update(actor=staff, sku="desk", changes={"currency": "JPY"})
    assert set(refused.value.message_dict) == {"currency"}
    desk = Product.objects.get(sku="desk")
    assert (desk.price, desk.currency) == (Decimal("10.50"), "EUR")


def test_stock_cannot_go_below_what_is_reserved(staff_api, catalog):
    """Lowering stock_on_hand below reserved is a 400 on stock_on_hand, not a 500."""
    Product.objects.filter(sku="lamp").update(reserved=10)
    error = assert_error(
        staff_api.patch(f"{PRODUCTS}lamp/", {"stock_on_hand": 9}, format="json"), 400, "invalid"
    )
    assert error["fields"]["stock_on_hand"] == [
        "Open orders have reserved 10 units; stock on hand cannot go below that."
    ]
    assert Product.objects.get(sku="lamp").stock_on_hand == 50
    Product.objects.filter(sku="lamp").update(reserved=1)
    one = staff_api.patch(f"{PRODUCTS}lamp/", {"stock_on_hand": 0}, format="json")
    assert "reserved 1 unit;" in assert_error(one, 400)["fields"]["stock_on_hand"][0]
    Product.objects.filter(sku="lamp").update(reserved=10)
    ok = staff_api.patch(f"{PRODUCTS}lamp/", {"stock_on_hand": 10}, format="json")
    assert ok.status_code == 200 and ok.json()["available"] == 0


def test_put_and_delete_are_405(staff_api, catalog):
    """Only PATCH changes a product; PUT and DELETE are 405 with the error shape."""
    assert_error(staff_api.put(f"{PRODUCTS}lamp/", {}, format="json"), 405, "method_not_allowed")
    assert_error(staff_api.delete(f"{PRODUCTS}lamp/"), 405, "method_not_allowed")
