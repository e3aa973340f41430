"""Text that PostgreSQL cannot hold, or that is not text at all, is a 4xx, never a 500.

JSON can spell a lone UTF-16 surrogate (``"\\ud800"``) and a NUL (``"\\u0000"``); neither can
be encoded as UTF-8 or stored in a ``text`` or ``jsonb`` column, so every route that takes a
body refuses them when it reads it, whatever field they sit in. Headers and URLs are checked
where they reach the database.
"""

from __future__ import annotations

import json

import pytest

from orders.models import Order
from webhooks.models import Endpoint

from .conftest import ADDRESS, assert_error, order_body

SURROGATE = "\\ud800"  # as JSON spells it: the parsed string holds the lone surrogate
NUL = "\\u0000"


def _raw(client, path: str, text: str, **headers):
    return client.generic("POST", path, text, content_type="application/json", headers=headers)


def _with(bad: str, where: str) -> str:
    """An order body, as JSON text, with ``bad`` spliced into one string (or key)."""
    body = order_body([("lamp", 1)])
    if where == "sku":
        body["items"][0]["sku"] = "@@"
    elif where == "name":
        body["shipping_address"] = {**ADDRESS, "name": "@@"}
    elif where == "key":
        body["shipping_address"] = {**ADDRESS, "@@": "x"}
    return json.dumps(body).replace("@@", f"la{bad}mp")


@pytest.mark.parametrize("bad", [SURROGATE, NUL], ids=["surrogate", "nul"])
@pytest.mark.parametrize("where", ["sku", "name", "key"])
def test_an_order_body_with_unstorable_text_is_a_400_and_places_nothing(
    client_api, catalog, bad, where
):
    body = assert_error(_raw(client_api, "/api/v1/orders/", _with(bad, where)), 400, "parse_error")
    assert "surrogate" in body["detail"] or "NUL" in body["detail"]
    assert not Order.objects.exists()


def test_a_refused_body_leaves_its_idempotency_key_free(client_api, catalog):
    bad = _raw(client_api, "/api/v1/orders/", _with(SURROGATE, "name"), **{"Idempotency-Key": "k"})
    assert_error(bad, 400, "parse_error")
    good = client_api.post(
        "/api/v1/orders/",
        order_body([("lamp", 1)]),
        format="json",
        headers={"Idempotency-Key": "k"},
    )
    assert good.status_code == 201, good.content


@pytest.mark.parametrize("bad", [SURROGATE, NUL], ids=["surrogate", "nul"])
def test_a_webhook_registration_with_unstorable_text_is_a_400(client_api, bad):
    text = json.dumps({"url": "https://93.184.215.14/hooks", "events": ["@@"]})
    assert_error(_raw(client_api, "/api/v1/webhooks/", text.replace("@@", bad)), 400)
    assert not Endpoint.objects.exists()


@pytest.mark.parametrize("bad", [SURROGATE, NUL], ids=["surrogate", "nul"])
def test_a_signal_payload_with_unstorable_text_is_a_400(client_api, place, bad):
    order = place(client_api, payment_method="pm_card_3ds_required")  # it will wait for it
    text = json.dumps({"payload": {"approved": True, "note": "@@"}}).replace("@@", bad)
    path = f"/api/v1/orders/{order['id']}/signals/3ds_confirmed/"
    assert_error(_raw(client_api, path, text), 400, "parse_error")


@pytest.mark.parametrize("number", ["1e400", "-1e400"])
def test_a_number_jsonb_cannot_hold_is_a_400_in_any_body(client_api, catalog, place, number):
    """``1e400`` parses to infinity, which no ``jsonb`` column (a signal's payload) holds."""
    order = place(client_api, payment_method="pm_card_3ds_required")  # it will wait for it
    path = f"/api/v1/orders/{order['id']}/signals/3ds_confirmed/"
    text = f'{{"payload": {{"approved": true, "n": {number}}}}}'
    body = assert_error(_raw(client_api, path, text), 400, "parse_error")
    problem = "a number JSON cannot hold (too large, NaN or Infinity)"
    assert body["fields"] == {"payload.n": [problem]}
    order_text = json.dumps(order_body([("lamp", 1)])).replace(
        '"quantity": 1', f'"quantity": {number}'
    )
    assert number in order_text
    assert_error(_raw(client_api, "/api/v1/orders/", order_text), 400, "parse_error")
    assert Order.objects.count() == 1  # the placed one only
    good = client_api.post(path, {"payload": {"approved": True}}, format="json")
    assert good.status_code == 202, good.content


@pytest.mark.parametrize("token", ["\xff\xfe", "abc\x00def", "ab\u00e9cd"], ids=repr)
def test_a_token_that_is_not_ascii_text_is_a_401(anon_api, token):
    anon_api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert_error(anon_api.get("/api/v1/orders/"), 401)


def test_a_signal_idempotency_key_with_a_control_character_is_a_400(client_api, place):
    order = place(client_api, payment_method="pm_card_3ds_required")
    path = f"/api/v1/orders/{order['id']}/signals/3ds_confirmed/"
    body = {"payload": {"approved": True}}
    refused = client_api.post(path, body, format="json", headers={"Idempotency-Key": "k\x00"})
    assert_error(refused, 400, "invalid_idempotency_key")
    accepted = client_api.post(path, body, format="json", headers={"Idempotency-Key": "k"})
    assert accepted.status_code == 202, accepted.content


@pytest.mark.parametrize("path", ["/admin/", "/api/v1/orders/"])
def test_a_nul_in_a_cookie_is_a_400(client, db, path):
    """Django decodes octal escapes in a quoted cookie: a session key with a NUL would reach
    the session table (the ops console, and the API's session authentication)."""
    response = client.get(path, HTTP_COOKIE='sessionid="abcdefgh\\000x"')
    assert response.status_code == 400


def test_a_nul_in_a_url_is_a_400(client_api, catalog):
    body = assert_error(client_api.get("/api/v1/products/la%00mp/"), 400, "bad_request")
    assert body["detail"] == "A NUL character in the URL."
    assert_error(client_api.get("/api/v1/orders/?status=%00"), 400, "bad_request")


def test_a_nul_in_a_url_is_a_json_400_with_debug_on_too(client_api, settings):
    """`make run` runs with DEBUG on, where Django answers a raised BadRequest with its HTML
    debug page (a traceback and the settings): the refusal must not go that way."""
    settings.DEBUG = True
    response = client_api.get("/api/v1/sagas/?correlation_id=%00")
    body = assert_error(response, 400, "bad_request")
    assert response["Content-Type"] == "application/json"
    assert body["detail"] == "A NUL character in the URL."


def test_a_nul_in_an_ops_console_filter_is_a_400(admin_client):
    response = admin_client.get("/admin/sagas/saga/?waiting_for=%00")
    assert response.status_code == 400


def test_an_integer_of_thousands_of_digits_is_a_400_that_speaks_of_the_body(client_api):
    """Python refuses to convert it; the client is told what is wrong with its body, not how to
    change Python's limit."""
    digits = "9" * 5000
    text = json.dumps(order_body([("lamp", 1)])).replace('"quantity": 1', f'"quantity": {digits}')
    body = assert_error(_raw(client_api, "/api/v1/orders/", text), 400, "parse_error")
    assert "more than 4300 digits" in body["detail"], body
    assert "sys." not in body["detail"], body
    assert not Order.objects.exists()


def _nested(levels: int) -> str:
    """A JSON value of ``levels`` nested arrays."""
    return "[" * levels + "]" * levels


@pytest.mark.parametrize("levels", [64, 400, 915, 960])
def test_a_signal_payload_nested_past_the_limit_is_a_400_never_a_500(client_api, place, levels):
    """A body may nest 64 levels (``config.text.MAX_DEPTH``). Past that the parser refuses it,
    at any depth: about 900 levels parsed, then overflowed the stack in the database driver's
    JSON encoder while the signal was stored (a 500). Nothing is stored, and the saga still
    takes a good signal."""
    order = place(client_api, payment_method="pm_card_3ds_required")  # it will wait for it
    path = f"/api/v1/orders/{order['id']}/signals/3ds_confirmed/"
    text = f'{{"payload": {{"approved": true, "x": {_nested(levels)}}}}}'
    body = assert_error(_raw(client_api, path, text), 400, "parse_error")
    assert body["detail"] == "JSON parse error - the body is nested too deeply (at most 64 levels)"
    good = client_api.post(path, {"payload": {"approved": True}}, format="json")
    assert good.status_code == 202, good.content


def test_a_body_nested_exactly_to_the_limit_is_read(client_api, place):
    order = place(client_api, payment_method="pm_card_3ds_required")
    path = f"/api/v1/orders/{order['id']}/signals/3ds_confirmed/"
    text = f'{{"payload": {{"approved": true, "x": {_nested(62)}}}}}'  # 64 levels in all
    assert _raw(client_api, path, text).status_code == 202


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize("path", ["/api/v1/orders/", "/healthz", "/admin/"])
def test_more_query_parameters_than_django_reads_is_a_400(client_api, settings, debug, path):
    """Past ``DATA_UPLOAD_MAX_NUMBER_FIELDS`` Django refuses to read the query string. In
    production that was its 400; under DEBUG (``make run``) its debug page read the query
    string again while rendering, raised again and ended in a 500 on every path."""
    settings.DEBUG = debug
    response = client_api.get(f"{path}?" + "&".join(["a"] * 1500))
    assert response.status_code == 400, response.content[:300]
    if path.startswith("/api/"):
        body = assert_error(response, 400, "bad_request")
        assert body["detail"] == "Too many query parameters or form fields: at most 1000."


def test_an_order_sent_with_too_many_query_parameters_is_refused_and_places_nothing(
    client_api, catalog, settings
):
    settings.DEBUG = True
    query = "&".join(["a"] * 1500)
    response = client_api.post(f"/api/v1/orders/?{query}", order_body([("lamp", 1)]), format="json")
    assert_error(response, 400, "bad_request")
    assert not Order.objects.exists()
