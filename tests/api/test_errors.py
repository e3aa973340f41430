"""One JSON error shape for every 4xx, from one exception handler."""

from __future__ import annotations

import pytest
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.test import RequestFactory
from rest_framework import exceptions
from rest_framework.test import APIClient

from config import api_errors
from orders.errors import OrderInvalid
from sagas.exceptions import SagaOperationRefused

from .conftest import assert_error

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/nothing-here/",
        "/api/v1/orders",  # no trailing slash
        "/api/v2/orders/",
        "/api/",
        "/api/v1/orders/x/y/z/",
    ],
)
def test_unrouted_paths_under_api_are_404_json(client_api, anon_api, path):
    """Authenticated or not, any method: 404 with the error shape, never Django's HTML."""
    for api in (client_api, anon_api):
        assert_error(api.get(path), 404, "not_found")
        assert_error(api.post(path, {}, format="json"), 404, "not_found")
        assert_error(api.delete(path), 404, "not_found")


def test_an_unrouted_path_says_routes_end_with_a_slash(client_api):
    body = assert_error(client_api.get("/api/v1/orders"), 404, "not_found")
    assert "routes end with a slash" in body["detail"], body


def test_an_unrouted_path_that_ends_with_a_slash_is_pointed_at_the_docs(client_api):
    """Telling it to end the path with a slash, which it did, sent the reader looking for the
    wrong mistake."""
    for path in ("/api/v1/foo/", "/api/v1/webhooks/1/deliveries/"):
        body = assert_error(client_api.get(path), 404, "not_found")
        assert (
            body["detail"] == "No API route matches this path; the routes are listed at /api/docs/."
        )


@pytest.mark.parametrize(
    ("path", "crumbs"),
    [
        ("/api/v1/", ["Api Root"]),
        ("/api/v1/orders/", ["Api Root", "Order List"]),
        ("/api/v1/orders/{id}/timeline/", ["Api Root", "Order List", "Order Instance", "Timeline"]),
        ("/api/v1/products/lamp/", ["Api Root", "Product List", "Product Instance"]),
        ("/api/v1/auth/token/", ["Api Root", "Current Token"]),
    ],
)
def test_the_browsable_apis_breadcrumbs_name_real_pages_only(customer, place, path, crumbs):
    """Each prefix without its slash (``/api/v1/orders``) is the JSON 404 of an unrouted path,
    which is no page: the breadcrumbs list the pages above this one, with no "Not Found"
    between them."""
    from rest_framework.test import APIClient

    api = APIClient()
    api.force_login(customer)
    order = place(api)
    # (The token page answers a session's call 400, in a page with the same breadcrumbs.)
    page = api.get(path.format(id=order["id"]), HTTP_ACCEPT="text/html")
    assert page["Content-Type"].startswith("text/html"), page.content[:300]
    html = page.content.decode()
    trail = html.split('<ul class="breadcrumb">', 1)[1].split("</ul>", 1)[0]
    names = [part.split("<", 1)[0].strip() for part in trail.split(">")]
    assert [n for n in names if n] == crumbs, trail


def test_not_acceptable_is_406_json(client_api):
    """Asking for a media type the API cannot render: 406 with the error shape (in JSON)."""
    response = client_api.get("/api/v1/orders/", HTTP_ACCEPT="application/xml")
    assert_error(response, 406, "not_acceptable")


def test_session_auth_without_csrf_is_403_json(customer, catalog):
    """The browsable API's session auth enforces CSRF on writes: 403 JSON, not an HTML page."""
    api = APIClient(enforce_csrf_checks=True)
    api.force_login(customer)
    assert api.get("/api/v1/orders/").status_code == 200
    body = assert_error(api.post("/api/v1/orders/", {}, format="json"), 403, "permission_denied")
    assert "CSRF" in body["detail"]


def test_the_browsable_api_renders_for_a_logged_in_user(customer):
    """Session auth and an HTML Accept header give the browsable API."""
    api = APIClient()
    api.force_login(customer)
    response = api.get("/api/v1/orders/", HTTP_ACCEPT="text/html")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (exceptions.Throttled(wait=7), 429, "throttled"),
        (exceptions.NotAuthenticated(), 401, "not_authenticated"),
        (exceptions.AuthenticationFailed(), 401, "authentication_failed"),
        (exceptions.PermissionDenied(), 403, "permission_denied"),
        (DjangoPermissionDenied("ops only"), 403, "permission_denied"),
        (exceptions.NotFound(), 404, "not_found"),
        (exceptions.MethodNotAllowed("PUT"), 405, "method_not_allowed"),
        (exceptions.UnsupportedMediaType("text/xml"), 415, "unsupported_media_type"),
        (exceptions.ParseError(), 400, "parse_error"),
        (exceptions.ValidationError({"a": ["bad"]}), 400, "invalid"),
        (SagaOperationRefused("pivot_reached", "too late"), 409, "pivot_reached"),
        (SagaOperationRefused("not_found", "No such saga."), 404, "not_found"),
        (OrderInvalid("unknown_sku", "no", {"items[0].sku": ["no"]}), 400, "unknown_sku"),
    ],
)
def test_the_handler_gives_every_error_the_same_shape(exc, status, code):
    """Each kind of error the API can raise maps to its status and a machine-readable code,
    with detail and fields; throttling carries Retry-After."""
    response = api_errors.exception_handler(exc, {})
    assert response.status_code == status
    assert set(response.data) == {"code", "detail", "fields"}
    assert response.data["code"] == code
    assert response.data["detail"]
    if status == 429:
        assert response["Retry-After"] == "7"
    if code == "unknown_sku":
        assert response.data["fields"] == {"items[0].sku": ["no"]}
    if code == "invalid":
        assert response.data["fields"] == {"a": ["bad"]}


def test_a_validation_error_with_a_refused_name_takes_its_code():
    """Among a body's problems, a name it may not carry (unknown_field, read_only_field; the
    first in field order) is the error's code: what the client most needs told."""
    from rest_framework.exceptions import ErrorDetail

    detail = {
        "price": [ErrorDetail("bad", code="invalid")],
        "items": [{}, {"price": [ErrorDetail("no", code="read_only_field")]}],
        "coupon": [ErrorDetail("no", code="unknown_field")],
    }
    response = api_errors.exception_handler(exceptions.ValidationError(detail), {})
    assert response.data["code"] == "read_only_field"
    assert set(response.data["fields"]) == {"price", "items[1].price", "coupon"}


def test_every_request_body_of_the_schema_is_closed(anon_api):
    """``additionalProperties: false`` on each body's object and on the objects it holds (an
    order's items and address): a client built from the schema is not told other names are
    taken. A signal's free-form payload stays open."""
    document = anon_api.get("/api/schema/?format=json").json()
    schemas = document["components"]["schemas"]
    for name in (
        "OrderCreateRequest",
        "OrderItemInputRequest",
        "ShippingAddressRequest",
        "ProductRequest",
        "PatchedProductUpdateRequest",
        "EndpointInputRequest",
        "SignalInputRequest",
        "CompensateRequest",
        "ResolveRequest",
        "UndoDoneRequest",
    ):
        assert schemas[name]["additionalProperties"] is False, name
    assert schemas["SignalInputRequest"]["properties"]["payload"]["additionalProperties"] == {}


def test_unknown_exceptions_are_left_to_djangos_500_handling():
    """A bug is not dressed up as a 4xx: the handler returns None (Django logs a 500)."""
    assert api_errors.exception_handler(RuntimeError("bug"), {}) is None


def test_nested_field_errors_are_flattened_to_input_paths():
    """DRF's nested errors become ``items[1].quantity``-style paths."""
    detail = {
        "items": [{}, {"quantity": ["too big"]}],
        "shipping_address": {"country": ["bad"], "non_field_errors": ["odd"]},
        "non_field_errors": ["whole"],
    }
    assert api_errors.flatten_errors(detail) == {
        "items[1].quantity": ["too big"],
        "shipping_address.country": ["bad"],
        "shipping_address": ["odd"],
        "non_field_errors": ["whole"],
    }


@pytest.mark.parametrize(
    ("handler", "status", "code"),
    [
        (api_errors.handler400, 400, "bad_request"),
        (api_errors.handler403, 403, "permission_denied"),
        (api_errors.handler404, 404, "not_found"),
    ],
)
def test_djangos_own_error_pages_are_json_under_api(handler, status, code):
    """Errors Django answers before any view (a bad Host header, ...) are JSON under /api/ and
    Django's usual pages elsewhere."""
    factory = RequestFactory()
    response = handler(factory.get("/api/v1/orders/"), Exception())
    assert response.status_code == status
    assert response["Content-Type"] == "application/json"
    assert __import__("json").loads(response.content)["code"] == code
    other = handler(factory.get("/admin/"), Exception())
    assert other.status_code == status
    assert not other["Content-Type"].startswith("application/json")


def test_a_500_under_api_is_json():
    """The 500 page under /api/ is JSON too (with nothing internal in it)."""
    response = api_errors.handler500(RequestFactory().get("/api/v1/orders/"))
    assert response.status_code == 500
    assert __import__("json").loads(response.content)["code"] == "server_error"


@pytest.mark.parametrize("debug", [False, True])
def test_a_disallowed_host_is_400_json(client_api, settings, debug):
    """A Host header outside ALLOWED_HOSTS is a 400 with the error shape, under `make run`'s
    DEBUG too (Django would answer its HTML debug page there)."""
    settings.DEBUG = debug
    response = client_api.get("/api/v1/orders/", HTTP_HOST="evil.example")
    body = assert_error(response, 400, "bad_request")
    # It says which setting lists the served names (a bare "Bad request." left a new user of
    # `make run`, reaching it by the machine's address, with nothing to go on), and neither
    # the name sent nor the names served.
    assert "ALLOWED_HOSTS" in body["detail"] and "evil.example" not in body["detail"]
    assert "localhost" not in body["detail"]


@pytest.mark.parametrize("route", ["/api/v1/orders/", "/api/v1/webhooks/"])
def test_a_body_of_thousands_of_made_up_names_is_refused_with_the_first_twenty(
    client_api, catalog, route
):
    """5,000 names no route takes: one 400 ``unknown_field`` listing the first 20 in the order
    sent, not an error per name for the web process to build and send; nothing is created."""
    from config.errors import MAX_REFUSED_NAMES
    from orders.models import Order
    from webhooks.models import Endpoint

    from .conftest import order_body

    body = (
        order_body()
        if "orders" in route
        else {"url": "https://example.com/hook", "events": ["order.updated"]}
    )
    names = [f"made_up_{i}" for i in range(5000)]
    response = client_api.post(route, {**body, **dict.fromkeys(names, 1)}, format="json")
    error = assert_error(response, 400, "unknown_field")
    assert list(error["fields"]) == names[:MAX_REFUSED_NAMES]
    assert not Order.objects.exists() and not Endpoint.objects.exists()


@pytest.mark.parametrize(
    "path",
    ["//api/v1/orders/", "/API/v1/orders/", "/Api/v1/orders/", "///api/v1/", "/API"],
)
@pytest.mark.parametrize("debug", [False, True])
def test_a_path_meant_for_the_api_is_404_json_saying_how_routes_are_spelt(
    anon_api, settings, path, debug
):
    """A base URL ending in a slash joined to ``/api/...``, or the prefix in capitals, missed
    every route and got Django's HTML 404 page: an API client reads the one JSON error shape,
    told that routes are lower-case under a single /api/. With DEBUG on too (``make run``),
    where Django answers a 404 with its own page and never asks the project's handler.
    (``PATH_INFO`` is set directly: the test client would read ``//api`` as a host name.)"""
    settings.DEBUG = debug
    body = assert_error(anon_api.get("/", PATH_INFO=path), 404, "not_found")
    assert "lower-case, under one leading /api/" in body["detail"], body
    post = anon_api.post("/", {}, format="json", PATH_INFO=path)
    assert_error(post, 404, "not_found")


@pytest.mark.parametrize("path", ["/apix/", "/static-api/", "/nothing/api/"])
def test_a_path_not_meant_for_the_api_keeps_the_html_404(anon_api, path):
    response = anon_api.get("/", PATH_INFO=path, HTTP_ACCEPT="text/html")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html"), response.content[:200]


def test_an_answer_outside_drf_is_written_byte_for_byte_as_drf_writes_it():
    """U+2028 and U+2029 included, which DRF's renderer escapes (JavaScript took them for line
    ends) and json.dumps does not."""
    from rest_framework.renderers import JSONRenderer

    from config.api_errors import error_body, json_response

    body = error_body("bad_request", "a\u2028b\u2029c é 日本")
    assert json_response(body, 400).content == JSONRenderer().render(body)
