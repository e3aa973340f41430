"""Helpers for the API tests: users with tokens, a catalog, an order body, a placed order."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import Group
from knox.models import AuthToken
from rest_framework.test import APIClient

from inventory.models import Product
from lab.stack import answers, spare_port
from lab.supervisor import Process
from orders.models import Order
from tests.conftest import wait_until

ADDRESS = {
    "name": "Ada Lovelace",
    "line1": "12 St James's Square",
    "city": "London",
    "postal_code": "SW1Y 4JH",
    "country": "GB",
}


def order_body(
    lines: list[tuple[str, int]] | None = None,
    *,
    payment_method: str = "pm_card_visa",
    country: str = "GB",
) -> dict[str, Any]:
    lines = lines if lines is not None else [("lamp", 1)]
    return {
        "items": [{"sku": sku, "quantity": qty} for sku, qty in lines],
        "payment_method": payment_method,
        "shipping_address": {**ADDRESS, "country": country},
    }


def make_product(sku: str, *, price: str = "10.00", stock: int = 100, currency: str = "EUR"):
    return Product.objects.create(
        sku=sku, name=sku.title(), price=Decimal(price), currency=currency, stock_on_hand=stock
    )


def api_client_for(user) -> APIClient:
    """An API client for ``user`` (``None``: anonymous) with a new API token, also kept as
    ``client.token`` (tokens are stored hashed: the database cannot give it back)."""
    client = APIClient()
    client.token = None
    if user is not None:
        _, client.token = AuthToken.objects.create(user=user)
        client.credentials(HTTP_AUTHORIZATION=f"Token {client.token}")
    client.user = user
    return client


def assert_error(response, status: int, code: str | None = None) -> dict:
    """The response is ``status`` with the one error shape (and ``code``, if given)."""
    assert response.status_code == status, (response.status_code, response.content[:500])
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    body = response.json()
    assert set(body) == {"code", "detail", "fields"}, body
    assert isinstance(body["code"], str) and body["code"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert isinstance(body["fields"], dict)
    if code is not None:
        assert body["code"] == code, body
    # Written as DRF writes JSON whichever layer answered (Django's own errors, the middleware,
    # DRF): one error reads byte for byte alike.
    compact = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    assert response.content.decode() == compact.replace("\u2028", "\\u2028").replace(
        "\u2029", "\\u2029"
    ), response.content[:500]
    return body


@pytest.fixture
def customer(django_user_model):
    return django_user_model.objects.create_user("ada", email="ada@example.com")


@pytest.fixture
def other_customer(django_user_model):
    return django_user_model.objects.create_user("grace", email="grace@example.com")


@pytest.fixture
def staff(django_user_model):
    """Support staff without the ops permission: may read, may not operate sagas."""
    return django_user_model.objects.create_user("sam", is_staff=True)


@pytest.fixture
def ops(django_user_model):
    """Staff in the "ops" group (the ``sagas.operate_saga`` permission)."""
    user = django_user_model.objects.create_user("olivia", is_staff=True)
    user.groups.add(Group.objects.get(name="ops"))
    return user


@pytest.fixture
def client_api(customer) -> APIClient:
    return api_client_for(customer)


@pytest.fixture
def other_api(other_customer) -> APIClient:
    return api_client_for(other_customer)


@pytest.fixture
def staff_api(staff) -> APIClient:
    return api_client_for(staff)


@pytest.fixture
def ops_api(ops) -> APIClient:
    return api_client_for(ops)


@pytest.fixture
def anon_api() -> APIClient:
    return api_client_for(None)


@pytest.fixture
def catalog(db) -> dict[str, Product]:
    return {
        "lamp": make_product("lamp", price="19.90", stock=50),
        "desk": make_product("desk", price="249.00", stock=20),
        "mug": make_product("mug", price="12.00", stock=500),
    }


@pytest.fixture
def place(catalog) -> Callable[..., dict]:
    """``place(api, lines=None, **kw)``: POST an order, assert 201, return the body."""

    def do(api: APIClient, lines=None, headers: dict | None = None, **kwargs) -> dict:
        response = api.post(
            "/api/v1/orders/", order_body(lines, **kwargs), format="json", headers=headers or {}
        )
        assert response.status_code == 201, response.content
        return response.json()

    return do


def counts() -> tuple[int, int]:
    """(orders, sagas) in the database: bad input must leave both unchanged."""
    from sagas.models import Saga

    return Order.objects.count(), Saga.objects.count()


@contextmanager
def gunicorn_web(env: dict[str, str], log_dir: Path, args: Sequence[str] = ()) -> Iterator[str]:
    """gunicorn serving ``config.wsgi`` as deployed, with ``env`` and any further command-line
    ``args``; yields its base URL (``http://127.0.0.1:PORT``) once it answers, and stops it
    afterwards. Its log is ``log_dir / "web.log"``."""
    port = spare_port()
    web = Process(
        "web",
        [sys.executable, "-m", "gunicorn", "config.wsgi", "--bind", f"127.0.0.1:{port}", *args],
        env=env,
        log_path=log_dir / "web.log",
    )
    web.start()
    try:
        wait_until(lambda: answers("127.0.0.1", port) or not web.alive, timeout=60)
        assert web.alive, web.log_tail()
        yield f"http://127.0.0.1:{port}"
    finally:
        web.stop(timeout=15)
