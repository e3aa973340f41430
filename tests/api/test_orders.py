"""Orders over HTTP: placing, reading, listing, the timeline, cancelling; who sees what.

No worker runs here (plain ``db`` tests): sagas stay where the test puts them, so every state
of an order can be set up exactly by writing the saga row.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from drf_spectacular.generators import SchemaGenerator

from orders.models import Order
from orders.saga import order_saga
from payments.models import Payment
from sagas.models import Saga, SagaEvent, SagaState
from shipping.models import Shipment

from .conftest import assert_error, order_body

pytestmark = pytest.mark.django_db

ORDER_FIELDS = {
    "id",
    "status",
    "step",
    "cancellation_reason",
    "total",
    "currency",
    "items",
    "created_at",
    "updated_at",
    "saga",
    "payment",
    "shipment",
}


def set_saga(order_id, **fields) -> None:
    """Move an order's saga by writing its row (the state field is protected on instances)."""
    Saga.objects.filter(order__id=order_id).update(**fields)


# -- placing --------------------------------------------------------------------------------------
def test_post_creates_the_order_and_returns_it_as_the_contract_lists(client_api, place, customer):
    """201 with exactly the documented fields: processing at reserve_inventory, the total priced
    from the catalog as a decimal string, zero payment amounts, no shipment yet, and a
    Location header; the order belongs to the caller and has a running saga."""
    response = client_api.post(
        "/api/v1/orders/", order_body([("lamp", 2), ("desk", 1)]), format="json"
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert set(body) == ORDER_FIELDS
    assert body["status"] == "processing"
    assert body["step"] == "reserve_inventory"
    assert body["cancellation_reason"] is None
    assert body["total"] == "288.80"
    assert body["currency"] == "EUR"
    assert body["items"] == [
        {"sku": "desk", "quantity": 1, "unit_price": "249.00"},
        {"sku": "lamp", "quantity": 2, "unit_price": "19.90"},
    ]
    assert body["payment"] == {
        "authorized": "0.00",
        "captured": "0.00",
        "voided": "0.00",
        "refunded": "0.00",
    }
    assert body["shipment"] is None
    assert body["saga"]["state"] == "running"
    assert body["saga"]["current_step"] == "reserve_inventory"
    assert response["Location"] == f"/api/v1/orders/{body['id']}/"
    order = Order.objects.get(pk=body["id"])
    assert order.owner == customer
    assert str(order.saga_id) == body["saga"]["id"]


def test_without_an_idempotency_key_every_post_creates_an_order(client_api, catalog):
    """Two identical POSTs without a key are two orders."""
    first = client_api.post("/api/v1/orders/", order_body(), format="json")
    second = client_api.post("/api/v1/orders/", order_body(), format="json")
    assert (first.status_code, second.status_code) == (201, 201)
    assert first.json()["id"] != second.json()["id"]
    assert Order.objects.count() == 2


# -- reading --------------------------------------------------------------------------------------
def test_owner_reads_the_order_with_payment_and_shipment(client_api, place):
    """The detail shows the payment amounts and the shipment once the participants have them."""
    order = place(client_api)
    Payment.objects.create(
        order_id=order["id"],
        currency="EUR",
        amount=Decimal("19.90"),
        authorized_amount=Decimal("19.90"),
        captured_amount=Decimal("19.90"),
    )
    shipment = Shipment.objects.create(
        key=f"saga:x:{order['id']}",
        order_id=order["id"],
        status="arranged",
        carrier="FakeCarrier",
        tracking_number="TRK123",
        country="GB",
    )
    response = client_api.get(f"/api/v1/orders/{order['id']}/")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == ORDER_FIELDS
    assert body["payment"] == {
        "authorized": "19.90",
        "captured": "19.90",
        "voided": "0.00",
        "refunded": "0.00",
    }
    assert body["shipment"] == {
        "id": str(shipment.id),
        "status": "arranged",
        "carrier": "FakeCarrier",
        "tracking_number": "TRK123",
    }


@pytest.mark.parametrize(
    ("saga_fields", "status", "step", "reason"),
    [
        ({"current_step": "arrange_shipment"}, "processing", "arrange_shipment", None),
        ({"cancel_reason": "customer_cancelled"}, "cancelling", None, "customer_cancelled"),
        (
            {"state": SagaState.COMPENSATING, "failure_code": "payment_declined"},
            "cancelling",
            None,
            "payment_declined",
        ),
        ({"state": SagaState.SUCCEEDED}, "confirmed", None, None),
        (
            {"state": SagaState.COMPENSATED, "failure_code": "out_of_stock"},
            "cancelled",
            None,
            "out_of_stock",
        ),
        ({"state": SagaState.NEEDS_MANUAL}, "needs_attention", None, None),
        (
            {"state": SagaState.NEEDS_MANUAL, "failure_code": "payment_declined"},
            "needs_attention",
            None,
            "payment_declined",
        ),
        # Closed by a person: final. Stopped while undoing: cancelled; past the pivot: confirmed.
        (
            {"state": SagaState.RESOLVED, "escalated_from": "compensating", "failure_code": "x"},
            "cancelled",
            None,
            "x",
        ),
        ({"state": SagaState.RESOLVED, "escalated_from": "running"}, "confirmed", None, None),
        # Given up before its pivot (a wait that timed out): resolving it set failure_code.
        (
            {"state": SagaState.RESOLVED, "escalated_from": "running", "failure_code": "timed_out"},
            "cancelled",
            None,
            "timed_out",
        ),
    ],
)
def test_status_step_and_reason_are_derived_from_the_saga(
    client_api, place, saga_fields, status, step, reason
):
    """The client view follows the saga row: status, step and cancellation_reason as the
    contract maps them, and the saga summary shows the saga's own state."""
    order = place(client_api)
    set_saga(order["id"], **saga_fields)
    body = client_api.get(f"/api/v1/orders/{order['id']}/").json()
    assert (body["status"], body["step"], body["cancellation_reason"]) == (status, step, reason)
    assert body["saga"]["state"] == Saga.objects.get(order__id=order["id"]).state


def test_another_clients_order_is_404_not_403(client_api, other_api, place):
    """A client cannot see, list, follow or cancel another client's order: 404 everywhere."""
    order = place(client_api)
    for path in (f"/api/v1/orders/{order['id']}/", f"/api/v1/orders/{order['id']}/timeline/"):
        assert_error(other_api.get(path), 404, "not_found")
    assert_error(other_api.post(f"/api/v1/orders/{order['id']}/cancel/"), 404, "not_found")
    assert other_api.get("/api/v1/orders/").json()["count"] == 0
    assert Saga.objects.get(order__id=order["id"]).cancel_reason == ""


def test_staff_see_every_order(client_api, other_api, staff_api, place):
    """Staff list all clients' orders and read any of them; clients list only their own."""
    mine = place(client_api)
    theirs = place(other_api)
    listed = {o["id"] for o in staff_api.get("/api/v1/orders/").json()["results"]}
    assert listed == {mine["id"], theirs["id"]}
    assert staff_api.get(f"/api/v1/orders/{theirs['id']}/").status_code == 200
    assert staff_api.get(f"/api/v1/orders/{theirs['id']}/timeline/").status_code == 200
    assert {o["id"] for o in client_api.get("/api/v1/orders/").json()["results"]} == {mine["id"]}


def test_anonymous_gets_401_json_on_every_order_route(anon_api, client_api, place):
    """No credentials: 401 with the error shape and a WWW-Authenticate challenge."""
    order = place(client_api)
    for method, path in [
        ("get", "/api/v1/orders/"),
        ("post", "/api/v1/orders/"),
        ("get", f"/api/v1/orders/{order['id']}/"),
        ("get", f"/api/v1/orders/{order['id']}/timeline/"),
        ("post", f"/api/v1/orders/{order['id']}/cancel/"),
    ]:
        response = getattr(anon_api, method)(path, format="json")
        assert_error(response, 401, "not_authenticated")
        assert response["WWW-Authenticate"] == "Token"


def test_a_bad_token_is_401(client_api, anon_api):
    """An unknown token is 401 ``authentication_failed``, not a 500 or an anonymous view."""
    anon_api.credentials(HTTP_AUTHORIZATION="Token not-a-real-token")
    assert_error(anon_api.get("/api/v1/orders/"), 401, "authentication_failed")


TOKEN_FORM = "send the token as 'Authorization: Token <token>'."


@pytest.mark.parametrize(
    ("header", "detail"),
    [
        ("Bearer {token}", f"This API does not take 'Authorization: Bearer ...'; {TOKEN_FORM}"),
        ("bearer {token}", f"This API does not take 'Authorization: bearer ...'; {TOKEN_FORM}"),
        (
            "Basic YWxpY2U6c2VjcmV0",
            f"This API does not take 'Authorization: Basic ...'; {TOKEN_FORM}",
        ),  # fmt: skip
        ("{token}", f"The Authorization header has no scheme this API takes; {TOKEN_FORM}"),
    ],
)
def test_a_token_sent_under_another_scheme_is_told_the_form_the_api_takes(
    client_api, anon_api, header, detail
):
    """Credentials under a scheme other than ``Token`` (a valid token as ``Bearer``, a bare
    key) are a ``401 not_authenticated`` whose detail names the form the API takes, not
    "Authentication credentials were not provided.", which the client knows to be false; the
    challenge is still ``Token``, and a bare key is not echoed back. Without such a header the
    words are DRF's, and a route open to anyone still answers."""
    anon_api.credentials(HTTP_AUTHORIZATION=header.format(token=client_api.token))
    response = anon_api.get("/api/v1/orders/")
    body = assert_error(response, 401, "not_authenticated")
    assert body["detail"] == detail
    assert client_api.token not in response.content.decode()
    assert response["WWW-Authenticate"] == "Token"
    assert anon_api.get("/api/schema/?format=json").status_code == 200

    anon_api.credentials()
    body = assert_error(anon_api.get("/api/v1/orders/"), 401, "not_authenticated")
    assert body["detail"] == "Authentication credentials were not provided."


def test_list_is_newest_first_paginated_and_bounded(client_api, place):
    """Newest first; page_size is honoured up to 100 and capped there."""
    ids = [place(client_api)["id"] for _ in range(3)]
    page = client_api.get("/api/v1/orders/?page_size=2").json()
    assert page["count"] == 3
    assert [o["id"] for o in page["results"]] == ids[::-1][:2]
    assert page["next"] is not None
    second = client_api.get("/api/v1/orders/?page_size=2&page=2").json()
    assert [o["id"] for o in second["results"]] == ids[:1]
    assert_error(client_api.get("/api/v1/orders/?page=99"), 404, "not_found")
    from config.api import Pagination

    assert Pagination.max_page_size == 100


@pytest.mark.parametrize(
    "query",
    ["page=abc", "page=0", "page=-1", "page=1.5", "page=\u0661", "page_size=abc", "page_size=0"],
)
def test_a_page_or_page_size_that_is_not_a_positive_integer_is_a_400(client_api, place, query):
    """Bad input, named: not DRF's 404 for ``page=abc`` nor its silent default page size."""
    place(client_api)
    body = assert_error(client_api.get(f"/api/v1/orders/?{query}"), 400, "invalid")
    assert list(body["fields"]) == [query.split("=")[0]]


def test_the_last_page_and_a_page_far_past_the_end(client_api, place):
    place(client_api)
    assert client_api.get("/api/v1/orders/?page=last").status_code == 200
    assert_error(client_api.get(f"/api/v1/orders/?page={'9' * 5000}"), 404, "not_found")


def test_list_filters_by_status(client_api, place):
    """``?status=`` filters on the derived status (computed in SQL from the saga)."""
    running = place(client_api)
    confirmed = place(client_api)
    cancelling = place(client_api)
    set_saga(confirmed["id"], state=SagaState.SUCCEEDED)
    set_saga(cancelling["id"], cancel_reason="customer_cancelled")

    def ids(status: str) -> set[str]:
        response = client_api.get(f"/api/v1/orders/?status={status}")
        assert response.status_code == 200
        return {o["id"] for o in response.json()["results"]}

    assert ids("processing") == {running["id"]}
    assert ids("confirmed") == {confirmed["id"]}
    assert ids("cancelling") == {cancelling["id"]}
    assert ids("cancelled") == set()
    assert_error(client_api.get("/api/v1/orders/?status=lost"), 400, "invalid")


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "123", "00000000-0000-0000-0000-00000000000g"])
def test_bad_uuids_in_the_path_are_404_json(client_api, staff_api, bad_id):
    """A malformed id is a 404 with the error shape on every order and saga route, never a
    500."""
    for api, paths in [
        (client_api, [f"/api/v1/orders/{bad_id}/", f"/api/v1/orders/{bad_id}/timeline/"]),
        (staff_api, [f"/api/v1/sagas/{bad_id}/", f"/api/v1/sagas/{bad_id}/compensation-plan/"]),
    ]:
        for path in paths:
            assert_error(api.get(path), 404, "not_found")
    assert_error(client_api.post(f"/api/v1/orders/{bad_id}/cancel/"), 404, "not_found")


def test_unknown_order_id_is_404(client_api):
    """A well-formed id that names no order is a 404 with the error shape."""
    assert_error(client_api.get(f"/api/v1/orders/{uuid.uuid4()}/"), 404, "not_found")


# -- ETag -----------------------------------------------------------------------------------------
def test_detail_has_a_weak_etag_and_if_none_match_gives_304(client_api, place):
    """The detail carries a weak ETag; sending it back is a 304 with no body while nothing
    changed, and a 200 with a new ETag once the saga moved."""
    order = place(client_api)
    path = f"/api/v1/orders/{order['id']}/"
    first = client_api.get(path)
    etag = first["ETag"]
    assert etag.startswith('W/"')
    assert client_api.get(path)["ETag"] == etag  # stable while nothing changes

    not_modified = client_api.get(path, headers={"If-None-Match": etag})
    assert not_modified.status_code == 304
    assert not_modified.content == b""
    assert not_modified["ETag"] == etag
    assert client_api.get(path, headers={"If-None-Match": etag[2:]}).status_code == 304
    assert client_api.get(path, headers={"If-None-Match": '"other", ' + etag}).status_code == 304
    assert client_api.get(path, headers={"If-None-Match": '"other"'}).status_code == 200

    set_saga(order["id"], current_step="authorize_payment")
    changed = client_api.get(path, headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed["ETag"] != etag
    assert changed.json()["step"] == "authorize_payment"


def test_if_match_never_matches_the_weak_etag_and_the_412_says_why(client_api, place):
    """If-Match compares strongly (RFC 9110), so even the order's current ETag fails it: the
    412 must say so, not claim the order changed."""
    order = place(client_api)
    path = f"/api/v1/orders/{order['id']}/"
    etag = client_api.get(path)["ETag"]
    body = assert_error(
        client_api.get(path, headers={"If-Match": etag}), 412, "precondition_failed"
    )
    assert "weak" in body["detail"] and "If-None-Match" in body["detail"]
    assert "changed" not in body["detail"]
    assert client_api.get(path, headers={"If-Match": "*"}).status_code == 200
    # And the schema says it can happen (a client generated from it expects the 412).
    schema = SchemaGenerator().get_schema(request=None, public=True)
    documented = schema["paths"]["/api/v1/orders/{id}/"]["get"]["responses"]
    assert documented["412"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }


def test_if_unmodified_since_is_ignored_as_an_order_has_no_modification_date(client_api, place):
    """An order sends no Last-Modified, so If-Unmodified-Since is ignored (RFC 9110 §13.1.4):
    alone it is a 200, beside If-None-Match the ETag decides (304 or 200), and beside If-Match
    the 412 is If-Match's and names it, not the date."""
    order = place(client_api)
    path = f"/api/v1/orders/{order['id']}/"
    first = client_api.get(path)
    etag = first["ETag"]
    assert "Last-Modified" not in first
    for date in ("Sun, 06 Dec 2099 19:00:00 GMT", "Mon, 01 Jan 1990 00:00:00 GMT"):
        since = {"If-Unmodified-Since": date}
        alone = client_api.get(path, headers=since)
        assert alone.status_code == 200, alone.content
        assert alone.json() == first.json()
        assert alone["ETag"] == etag

        assert client_api.get(path, headers={**since, "If-None-Match": etag}).status_code == 304
        assert client_api.get(path, headers={**since, "If-None-Match": "*"}).status_code == 304
        assert client_api.get(path, headers={**since, "If-None-Match": '"x"'}).status_code == 200
        assert client_api.get(path, headers={**since, "If-Match": "*"}).status_code == 200

        body = assert_error(
            client_api.get(path, headers={**since, "If-Match": etag}), 412, "precondition_failed"
        )
        assert "If-Match" in body["detail"]
        assert "If-Unmodified-Since" not in body["detail"]


# -- timeline -------------------------------------------------------------------------------------
def test_timeline_lists_the_sagas_events_oldest_first(client_api, place):
    """at, kind, step, attempt, detail, actor of every event, oldest first."""
    order = place(client_api)
    saga = Saga.objects.get(order__id=order["id"])
    SagaEvent.objects.create(
        saga=saga, at=saga.created_at, kind="step_succeeded", step="reserve_inventory", attempt=1
    )
    body = client_api.get(f"/api/v1/orders/{order['id']}/timeline/").json()
    events = body["results"]
    assert [e["kind"] for e in events] == ["started", "step_succeeded"]
    assert set(events[0]) == {"at", "kind", "step", "attempt", "detail", "actor"}
    assert events[1]["step"] == "reserve_inventory"


# -- cancelling -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "step", ["reserve_inventory", "arrange_shipment", "fraud_review", "capture_payment"]
)
def test_cancel_is_202_until_capture_payment_has_passed(client_api, place, step):
    """Until the saga passes capture_payment: 202, the order turns cancelling with
    customer_cancelled, and the request is in the timeline with the user."""
    order = place(client_api)
    set_saga(order["id"], step_index=order_saga.index_of(step), current_step=step)
    response = client_api.post(f"/api/v1/orders/{order['id']}/cancel/")
    assert response.status_code == 202, response.content
    body = response.json()
    assert (body["status"], body["cancellation_reason"]) == ("cancelling", "customer_cancelled")
    event = SagaEvent.objects.filter(saga__order__id=order["id"], kind="cancel_requested").get()
    assert event.actor == "user:ada"


def test_a_cancel_with_a_body_that_is_not_json_is_400_and_cancels_nothing(client_api, place):
    """The cancel takes no body, but one that is not JSON is still a bad request: refused like
    any route's, not carried out."""
    order = place(client_api)
    path = f"/api/v1/orders/{order['id']}/cancel/"
    response = client_api.post(path, b"{bad", content_type="application/json")
    assert_error(response, 400, "parse_error")
    response = client_api.post(path, b"a=1", content_type="application/x-www-form-urlencoded")
    assert_error(response, 415)
    assert client_api.get(f"/api/v1/orders/{order['id']}/").json()["status"] != "cancelling"
    assert not SagaEvent.objects.filter(saga__order__id=order["id"], kind="cancel_requested")


def test_a_cancel_that_names_a_field_is_400_and_cancels_nothing(client_api, place):
    """A cancel takes no field: a reason sent with it would be recorded nowhere, so it is
    refused (unknown_field) rather than ignored; an empty object is a cancel."""
    order = place(client_api)
    path = f"/api/v1/orders/{order['id']}/cancel/"
    error = assert_error(client_api.post(path, {"reason": "too slow"}, format="json"), 400)
    assert error["code"] == "unknown_field", error
    assert error["fields"] == {"reason": ["Unknown field: a cancel takes nothing."]}
    assert not SagaEvent.objects.filter(saga__order__id=order["id"], kind="cancel_requested")
    assert client_api.post(path, {}, format="json").status_code == 202


def test_cancel_twice_is_accepted_twice(client_api, place):
    """A repeated cancel (a client retrying) is 202 again, not an error."""
    order = place(client_api)
    assert client_api.post(f"/api/v1/orders/{order['id']}/cancel/").status_code == 202
    assert client_api.post(f"/api/v1/orders/{order['id']}/cancel/").status_code == 202


def test_a_cancel_while_the_order_is_being_cancelled_is_accepted_and_changes_nothing(
    client_api, place
):
    """Its saga already undoing (a business failure, or the client's first cancel taken up):
    202 with the order as it is, the reason it is being cancelled for unchanged."""
    order = place(client_api)
    set_saga(order["id"], state=SagaState.COMPENSATING, failure_code="payment_declined")
    response = client_api.post(f"/api/v1/orders/{order['id']}/cancel/")
    assert response.status_code == 202, response.content
    body = response.json()
    assert (body["status"], body["cancellation_reason"]) == ("cancelling", "payment_declined")
    assert not SagaEvent.objects.filter(saga__order__id=order["id"], kind="cancel_requested")


@pytest.mark.parametrize(
    ("saga_fields", "code", "words"),
    [
        (
            {"step_index": order_saga.index_of("confirm_order"), "current_step": "confirm_order"},
            "pivot_reached",
            "The payment for this order has been taken; it can no longer be cancelled.",
        ),
        (
            {"state": SagaState.SUCCEEDED},
            "not_running",
            "The order is already confirmed; it can no longer be cancelled.",
        ),
        (
            {"state": SagaState.COMPENSATED, "failure_code": "out_of_stock"},
            "not_running",
            "The order is already cancelled.",
        ),
        (
            # Stopped past the pivot: a person decides; the client is sent to them.
            {
                "state": SagaState.NEEDS_MANUAL,
                "escalated_from": SagaState.RUNNING,
                "step_index": order_saga.index_of("confirm_order"),
                "current_step": "confirm_order",
            },
            "not_running",
            "Our support team is looking at this order; contact them to cancel it.",
        ),
        (
            # Stopped while undoing (a cancel already under way): there is nothing to ask for.
            {
                "state": SagaState.NEEDS_MANUAL,
                "escalated_from": SagaState.COMPENSATING,
                "failure_code": "shipping_unavailable",
            },
            "not_running",
            "The order is already being cancelled; our support team is finishing it.",
        ),
    ],
)
def test_cancel_after_capture_payment_is_409(client_api, place, saga_fields, code, words):
    """Past capture_payment (at the pivot) or once finished: 409 with the engine's code and the
    reason in the client's words (about the order, not the saga), and nothing changes."""
    order = place(client_api)
    set_saga(order["id"], **saga_fields)
    body = assert_error(client_api.post(f"/api/v1/orders/{order['id']}/cancel/"), 409, code)
    assert body["detail"] == words
    assert Saga.objects.get(order__id=order["id"]).cancel_reason == ""


@pytest.mark.parametrize(
    ("saga_fields", "code", "words"),
    [
        (
            # Declined or out of stock: the saga undoes what it did from its first step.
            {"state": SagaState.COMPENSATING, "failure_code": "payment_declined"},
            "not_waiting",
            "The order is being cancelled; it is not waiting for '3ds_confirmed'.",
        ),
        (
            {"state": SagaState.COMPENSATED, "failure_code": "payment_declined"},
            "not_waiting",
            "The order is cancelled; it is not waiting for '3ds_confirmed'.",
        ),
        (
            {"state": SagaState.SUCCEEDED},
            "not_waiting",
            "The order is already confirmed; it is not waiting for '3ds_confirmed'.",
        ),
        (
            {"state": SagaState.NEEDS_MANUAL, "escalated_from": SagaState.COMPENSATING},
            "not_waiting",
            "Our support team is looking at this order; it is not waiting for '3ds_confirmed'. "
            "Contact them.",
        ),
    ],
)
def test_a_refused_signal_says_why_about_the_order_not_the_saga(
    client_api, place, saga_fields, code, words
):
    """A 3-D Secure confirmation the order can no longer take: 409 with the engine's code and
    the reason in the client's words ("The saga is compensating at reserve_inventory" told the
    client of engine states and steps); nothing is recorded."""
    order = place(client_api, payment_method="pm_card_3ds_required")
    set_saga(order["id"], **saga_fields)
    path = f"/api/v1/orders/{order['id']}/signals/3ds_confirmed/"
    body = assert_error(client_api.post(path, {"payload": {"approved": True}}, format="json"), 409)
    assert (body["code"], body["detail"]) == (code, words)
    assert "saga" not in body["detail"].lower()
    assert not Saga.objects.get(order__id=order["id"]).signals.exists()


def test_a_signal_for_an_order_whose_saga_definition_this_server_lacks_is_a_retryable_409(
    client_api, place
):
    """A rolling deploy: the order's saga runs on a definition version this (old) web process
    does not register. Its own client's 3-D Secure confirmation was a 403, which it cannot
    retry (its wait timed out and the order was cancelled); it is the 409 definition_missing a
    cancel gets then, in the client's words, and nothing is recorded."""
    order = place(client_api, payment_method="pm_card_3ds_required")
    set_saga(order["id"], definition_version=99)
    path = f"/api/v1/orders/{order['id']}/signals/3ds_confirmed/"
    response = client_api.post(
        path, {"payload": {"approved": True}}, format="json", headers={"Idempotency-Key": "k1"}
    )
    body = assert_error(response, 409, "definition_missing")
    assert body["detail"] == (
        "The order cannot take '3ds_confirmed' right now; try again in a few minutes."
    )
    assert not Saga.objects.get(order__id=order["id"]).signals.exists()
    cancel = assert_error(client_api.post(f"/api/v1/orders/{order['id']}/cancel/"), 409)
    assert cancel["code"] == "definition_missing"  # as a cancel is


def test_a_signal_retried_under_its_key_is_replayed_before_its_body_is_checked(client_api, place):
    """A 3-D Secure confirmation sent before a rule that now refuses its body (a top-level
    name the route no longer takes), whose answer was lost: its retry is the 202 replay of the
    signal it sent, not a 400. The same key with another payload is a 422 whatever the body
    holds; a new key is checked as any signal is."""
    order = place(client_api, payment_method="pm_card_3ds_required")
    path = f"/api/v1/orders/{order['id']}/signals/3ds_confirmed/"
    saga = Saga.objects.get(order__id=order["id"])
    first = client_api.post(
        path, {"payload": {"approved": True}}, format="json", headers={"Idempotency-Key": "k1"}
    )
    assert first.status_code == 202, first.content
    retry = {"payload": {"approved": True}, "sent_at": "2026-12-06T10:00:00Z"}
    replay = client_api.post(path, retry, format="json", headers={"Idempotency-Key": "k1"})
    assert replay.status_code == 202, replay.content
    assert replay["Idempotent-Replayed"] == "true" and replay.json()["replayed"] is True
    other = {"payload": {"approved": False}, "sent_at": "2026-12-06T10:00:00Z"}
    reused = client_api.post(path, other, format="json", headers={"Idempotency-Key": "k1"})
    assert_error(reused, 422, "idempotency_key_reused")
    fresh = client_api.post(path, retry, format="json", headers={"Idempotency-Key": "k2"})
    assert_error(fresh, 400, "unknown_field")
    assert saga.signals.count() == 1


def test_a_signal_an_order_never_takes_says_so_about_the_order(client_api, place):
    order = place(client_api)
    path = f"/api/v1/orders/{order['id']}/signals/coupon_applied/"
    body = assert_error(client_api.post(path, {}, format="json"), 409, "unknown_signal")
    assert body["detail"] == "An order never waits for 'coupon_applied'."


def test_staff_may_cancel_any_order(client_api, staff_api, place):
    """Staff (even without the ops permission) may cancel a client's order: 202."""
    order = place(client_api)
    assert staff_api.post(f"/api/v1/orders/{order['id']}/cancel/").status_code == 202
    event = SagaEvent.objects.get(saga__order__id=order["id"], kind="cancel_requested")
    assert event.actor == "user:sam"
    # Not the client's own cancel: it is in the audit log too, with who and whose.
    from audit.models import AuditEntry

    entry = AuditEntry.objects.get(action="order.cancel")
    assert (entry.actor_name, entry.target) == ("sam", f"order:{order['id']}")


def test_a_clients_own_cancel_is_no_audit_entry(client_api, place):
    from audit.models import AuditEntry

    order = place(client_api)
    assert client_api.post(f"/api/v1/orders/{order['id']}/cancel/").status_code == 202
    assert not AuditEntry.objects.filter(action="order.cancel").exists()


def test_orders_routes_refuse_other_methods_with_405_json(client_api, place):
    """PUT, PATCH and DELETE on orders are 405 with the error shape."""
    order = place(client_api)
    path = f"/api/v1/orders/{order['id']}/"
    for method in ("put", "patch", "delete"):
        assert_error(
            getattr(client_api, method)(path, {}, format="json"), 405, "method_not_allowed"
        )
    assert_error(client_api.get(f"{path}cancel/"), 405, "method_not_allowed")


def test_a_shipment_no_carrier_took_has_null_carrier_and_tracking_number(client_api, place):
    """A refused shipment (no carrier serves AQ) holds no carrier and no tracking number: the
    API said ``""`` for both, where a client tests for ``null`` (the schema says nullable)."""
    order = place(client_api)
    shipment = Shipment.objects.create(
        key=f"saga:x:{order['id']}", order_id=order["id"], status="refused", country="AQ"
    )
    body = client_api.get(f"/api/v1/orders/{order['id']}/").json()
    assert body["shipment"] == {
        "id": str(shipment.id),
        "status": "refused",
        "carrier": None,
        "tracking_number": None,
    }
    schema = client_api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json").json()
    fields = schema["components"]["schemas"]["Shipment"]["properties"]
    assert fields["carrier"]["nullable"] and fields["tracking_number"]["nullable"]
