"""Orders that wait for the outside world, over HTTP with a real worker: a fraud review for
large orders (ops staff answer), a 3-D Secure confirmation (the client answers)."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from orders.selectors import OrderStatus
from sagas.models import Saga

from .conftest import assert_error, make_product, order_body

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

SETTLED = set(OrderStatus.SETTLED)


@pytest.fixture
def big(catalog):
    """Two of these (1200.00) are above ORDER_FRAUD_REVIEW_ABOVE (1000.00)."""
    return make_product("safe", price="600.00", stock=10)


def place(api, lines, **kwargs) -> dict:
    response = api.post("/api/v1/orders/", order_body(lines, **kwargs), format="json")
    assert response.status_code == 201, response.content
    return response.json()


def order_when(api, order_id, wait_for, predicate) -> dict:
    seen = {}

    def check():
        seen["body"] = api.get(f"/api/v1/orders/{order_id}/").json()
        return seen["body"] if predicate(seen["body"]) else None

    return wait_for(check, timeout=60, describe=lambda: seen.get("body"))


def parked_at(api, order: dict, wait_for, name: str) -> dict:
    """The order's body read once its saga is parked on ``name``: read after the park, not
    before it, so the body cannot show the step the saga was on a moment earlier."""
    saga_id = order["saga"]["id"]
    wait_for(
        lambda: Saga.objects.filter(pk=saga_id, waiting_for=name).exists(),
        timeout=60,
        describe=lambda: Saga.objects.filter(pk=saga_id).values("state", "waiting_for").first(),
    )
    return api.get(f"/api/v1/orders/{order['id']}/").json()


def signal(api, path: str, payload, key: str | None = None):
    headers = {"Idempotency-Key": key} if key is not None else {}
    return api.post(path, {"payload": payload}, format="json", headers=headers)


def test_a_large_order_waits_for_the_fraud_review_and_an_approval_confirms_it(
    client_api, ops_api, big, celery_worker, wait_for
):
    order = place(client_api, [("safe", 2)])
    body = parked_at(client_api, order, wait_for, "fraud_review")
    # Staff's review, not the client's: the client still sees processing at the review step.
    assert body["status"] == "processing" and body["step"] == "fraud_review"
    assert body["payment"]["authorized"] == "1200.00" and body["payment"]["captured"] == "0.00"
    saga_path = f"/api/v1/sagas/{order['saga']['id']}/signals/fraud_review/"
    order_path = f"/api/v1/orders/{order['id']}/signals/fraud_review/"
    for path in (saga_path, order_path):  # its own order: staff only, not hidden as a 404
        assert_error(signal(client_api, path, {"approved": True}), 403, "permission_denied")
    assert_error(signal(ops_api, saga_path, {"approved": "yes"}), 400, "invalid_payload")
    assert_error(signal(ops_api, saga_path, "yes"), 400, "invalid_payload")
    assert_error(signal(ops_api, saga_path, ["approved"]), 400, "invalid_payload")
    # A key that cannot be kept is the header's fault, as for an order, not the payload's.
    # An empty one too: refused, as for an order, not taken as "no key" (which would make a
    # client's retry a second signal instead of a replay).
    for bad in ("k" * 256, "a\tb", "", "   "):
        refused = signal(ops_api, saga_path, {"approved": True}, key=bad)
        body = assert_error(refused, 400, "invalid_idempotency_key")
        assert list(body["fields"]) == ["Idempotency-Key"], body

    first = signal(ops_api, saga_path, {"approved": True}, key="review-1")
    assert first.status_code == 202, first.content
    assert first.json()["replayed"] is False and first.json()["payload"] == {"approved": True}
    again = signal(ops_api, saga_path, {"approved": True}, key="review-1")
    assert again.status_code == 202 and again["Idempotent-Replayed"] == "true"
    # The same key with a changed decision is not a replay: refused, the first one stands.
    changed = signal(ops_api, saga_path, {"approved": False}, key="review-1")
    assert_error(changed, 422, "idempotency_key_reused")

    done = order_when(client_api, order["id"], wait_for, lambda b: b["status"] in SETTLED)
    assert done["status"] == "confirmed" and done["payment"]["captured"] == "1200.00"
    assert_error(
        signal(ops_api, saga_path, {"approved": False}, key="review-2"), 409, "not_waiting"
    )
    kinds = [
        e["kind"]
        for e in client_api.get(f"/api/v1/orders/{order['id']}/timeline/").json()["results"]
    ]
    assert kinds.count("ops_signal") == 1


def test_a_rejected_fraud_review_cancels_the_order_as_fraud_rejected(
    client_api, ops_api, big, celery_worker, wait_for
):
    order = place(client_api, [("safe", 2)])
    parked_at(client_api, order, wait_for, "fraud_review")
    response = signal(
        ops_api, f"/api/v1/sagas/{order['saga']['id']}/signals/fraud_review/", {"approved": False}
    )
    assert response.status_code == 202, response.content
    done = order_when(client_api, order["id"], wait_for, lambda b: b["status"] in SETTLED)
    assert done["status"] == "cancelled" and done["cancellation_reason"] == "fraud_rejected"
    assert done["payment"]["captured"] == "0.00" and done["payment"]["voided"] == "1200.00"
    assert done["shipment"]["status"] == "cancelled"


def test_a_small_order_does_not_wait_for_a_review(
    client_api, ops_api, catalog, celery_worker, wait_for
):
    order = place(client_api, [("lamp", 1)])
    done = order_when(client_api, order["id"], wait_for, lambda b: b["status"] in SETTLED)
    assert done["status"] == "confirmed"
    response = signal(
        ops_api, f"/api/v1/sagas/{order['saga']['id']}/signals/fraud_review/", {"approved": True}
    )
    assert_error(response, 409, "not_waiting")


def test_3ds_the_order_requires_action_until_the_client_confirms(
    client_api, other_api, catalog, celery_worker, wait_for
):
    order = place(client_api, [("lamp", 1)], payment_method="pm_card_3ds_required")
    body = order_when(client_api, order["id"], wait_for, lambda b: b["status"] == "requires_action")
    assert body["payment"]["authorized"] == "0.00"  # the provider is asked only after 3-D Secure
    listed = client_api.get("/api/v1/orders/", {"status": "requires_action"}).json()["results"]
    assert [o["id"] for o in listed] == [order["id"]]
    path = f"/api/v1/orders/{order['id']}/signals/3ds_confirmed/"
    assert_error(signal(other_api, path, {"approved": True}), 404)
    # Through the sagas route too, whatever the name or payload: another client's saga is
    # not there for it (no unknown_signal, no invalid_payload that would say it exists).
    saga_signals = f"/api/v1/sagas/{order['saga']['id']}/signals/"
    for name, payload in (("nope", {}), ("3ds_confirmed", "not an object"), ("3ds_confirmed", {})):
        assert_error(signal(other_api, saga_signals + f"{name}/", payload), 404)
    assert_error(signal(client_api, saga_signals + "nope/", {}), 409, "unknown_signal")
    response = signal(client_api, path, {"approved": True}, key="3ds-1")
    assert response.status_code == 202, response.content
    assert signal(client_api, path, {"approved": True}, key="3ds-1").status_code == 202
    done = order_when(client_api, order["id"], wait_for, lambda b: b["status"] in SETTLED)
    assert done["status"] == "confirmed" and done["payment"]["captured"] == "19.90"


def test_3ds_declined_by_the_client_cancels_as_payment_declined(
    client_api, catalog, celery_worker, wait_for
):
    order = place(client_api, [("lamp", 1)], payment_method="pm_card_3ds_required")
    order_when(client_api, order["id"], wait_for, lambda b: b["status"] == "requires_action")
    # Through the sagas route too: the order's own client may send its client-facing signal.
    response = signal(
        client_api,
        f"/api/v1/sagas/{order['saga']['id']}/signals/3ds_confirmed/",
        {"approved": False},
    )
    assert response.status_code == 202, response.content
    done = order_when(client_api, order["id"], wait_for, lambda b: b["status"] in SETTLED)
    assert done["status"] == "cancelled" and done["cancellation_reason"] == "payment_declined"
    assert done["payment"]["authorized"] == "0.00"


def sweeping_until(api, order_id, wait_for, predicate) -> dict:
    """Like :func:`order_when`, running the sweeper meanwhile (as beat would): a wait's timeout
    fires from the database."""
    from sagas.sweeper import sweep

    def check_sweeping(body) -> bool:
        if predicate(body):
            return True
        sweep()
        return False

    return order_when(api, order_id, wait_for, check_sweeping)


def test_a_fraud_review_not_given_in_time_goes_to_a_person_who_can_still_approve(
    client_api, ops_api, big, worker_factory, wait_for
):
    worker_factory({"ORDER_FRAUD_REVIEW_TIMEOUT": "1"}, name="review-timeout", exclusive=True)
    order = place(client_api, [("safe", 2)])
    # The review is not given: the timeout escalates (no compensation, the money stays held).
    stuck = sweeping_until(
        client_api, order["id"], wait_for, lambda b: b["status"] == "needs_attention"
    )
    assert stuck["payment"]["authorized"] == "1200.00" and stuck["payment"]["voided"] == "0.00"
    saga = Saga.objects.get(pk=order["saga"]["id"])
    assert saga.state == "needs_manual" and saga.failed_step == "fraud_review"
    # The analyst picks it up long after its deadline passed (the deadline kept running while
    # it waited for a person) and approves it: it resumes at the review, with its working time
    # given back, instead of timing out at the first step boundary.
    Saga.objects.filter(pk=saga.pk).update(deadline_at=timezone.now() - timedelta(minutes=30))
    saga_path = f"/api/v1/sagas/{order['saga']['id']}/signals/fraud_review/"
    response = signal(ops_api, saga_path, {"approved": True}, key="late-review")
    assert response.status_code == 202, response.content
    done = order_when(client_api, order["id"], wait_for, lambda b: b["status"] in SETTLED)
    assert done["status"] == "confirmed" and done["payment"]["captured"] == "1200.00"


def _review_timed_out(client_api, wait_for) -> tuple[dict, str]:
    """A large order whose fraud review was not given in time: in ``needs_attention`` with its
    stock reserved, the money authorized and the shipment arranged, nothing captured."""
    order = place(client_api, [("safe", 2)])
    stuck = sweeping_until(
        client_api, order["id"], wait_for, lambda b: b["status"] == "needs_attention"
    )
    assert stuck["payment"]["authorized"] == "1200.00" and stuck["payment"]["captured"] == "0.00"
    assert stuck["shipment"]["status"] == "arranged"
    return order, f"/api/v1/sagas/{order['saga']['id']}/"


def _stock(api) -> tuple[int, int]:
    body = api.get("/api/v1/products/safe/").json()
    return body["stock_on_hand"], body["reserved"]


def test_a_timed_out_fraud_review_is_not_resolved_into_a_confirmed_order_but_compensated(
    client_api, ops_api, big, worker_factory, wait_for
):
    """Stopped before the pivot, everything the saga did is still in place and undoable:
    resolving is refused (naming the effects), compensating undoes them all."""
    worker_factory({"ORDER_FRAUD_REVIEW_TIMEOUT": "1"}, name="review-timeout", exclusive=True)
    order, saga_path = _review_timed_out(client_api, wait_for)
    assert _stock(client_api) == (10, 2)
    refused = assert_error(
        ops_api.post(f"{saga_path}resolve/", {"note": "closing"}, format="json"),
        409,
        "effects_in_place",
    )
    assert refused["fields"]["accept_effects"] == [
        "arrange_shipment (cancel_shipment has not run)",
        "authorize_payment (void_authorization has not run)",
    ]  # not the reservation: resolving releases it (the order saga's on_resolve)
    plan = ops_api.get(f"{saga_path}compensation-plan/").json()
    assert [e["step"] for e in plan["compensations"]] == [
        "arrange_shipment",
        "authorize_payment",
        "reserve_inventory",
    ]

    response = ops_api.post(f"{saga_path}compensate/", {"reason": "no review"}, format="json")
    assert response.status_code == 202, response.content
    done = order_when(client_api, order["id"], wait_for, lambda b: b["status"] in SETTLED)
    assert (done["status"], done["cancellation_reason"]) == ("cancelled", "step_failed")
    assert done["payment"]["voided"] == "1200.00" and done["payment"]["captured"] == "0.00"
    assert done["shipment"]["status"] == "cancelled"
    assert _stock(client_api) == (10, 0)


def test_a_timed_out_fraud_review_resolved_with_its_effects_accepted_cancels_the_order(
    client_api, ops_api, big, worker_factory, wait_for
):
    """The person keeps the effects knowingly: the order is cancelled (``timed_out``), never
    confirmed, and its stock is released, not sold."""
    worker_factory({"ORDER_FRAUD_REVIEW_TIMEOUT": "1"}, name="review-timeout", exclusive=True)
    order, saga_path = _review_timed_out(client_api, wait_for)
    body = {"note": "voided at the processor by hand", "accept_effects": True}
    response = ops_api.post(f"{saga_path}resolve/", body, format="json")
    assert response.status_code == 200, response.content
    done = client_api.get(f"/api/v1/orders/{order['id']}/").json()
    assert (done["status"], done["cancellation_reason"]) == ("cancelled", "timed_out")
    assert done["payment"]["captured"] == "0.00"
    assert _stock(client_api) == (10, 0)
    cancelled = client_api.get("/api/v1/orders/", {"status": "cancelled"}).json()["results"]
    assert [o["id"] for o in cancelled] == [order["id"]]
    # The shipment and the authorization it kept are vouched for by the person: no violation.
    out = io.StringIO()
    call_command("check_invariants", stdout=out)
    assert out.getvalue().rstrip().endswith(": no violations"), out.getvalue()


def test_the_client_can_cancel_an_order_whose_fraud_review_timed_out(
    client_api, big, worker_factory, wait_for
):
    worker_factory({"ORDER_FRAUD_REVIEW_TIMEOUT": "1"}, name="review-timeout", exclusive=True)
    order, _ = _review_timed_out(client_api, wait_for)
    response = client_api.post(f"/api/v1/orders/{order['id']}/cancel/")
    assert response.status_code == 202, response.content
    done = order_when(client_api, order["id"], wait_for, lambda b: b["status"] in SETTLED)
    assert (done["status"], done["cancellation_reason"]) == ("cancelled", "customer_cancelled")
    assert done["payment"]["voided"] == "1200.00" and done["shipment"]["status"] == "cancelled"
    assert _stock(client_api) == (10, 0)


def test_3ds_not_confirmed_in_time_cancels_the_order_as_timed_out(
    client_api, catalog, worker_factory, wait_for
):
    worker_factory({"ORDER_3DS_TIMEOUT": "1"}, name="3ds-timeout", exclusive=True)
    order = place(client_api, [("lamp", 1)], payment_method="pm_card_3ds_required")
    done = sweeping_until(client_api, order["id"], wait_for, lambda b: b["status"] in SETTLED)
    assert done["status"] == "cancelled" and done["cancellation_reason"] == "timed_out"
    assert done["payment"]["authorized"] == "0.00"
    path = f"/api/v1/orders/{order['id']}/signals/3ds_confirmed/"
    refused = assert_error(signal(client_api, path, {"approved": True}), 409, "not_waiting")
    assert refused["detail"] == "The order is cancelled; it is not waiting for '3ds_confirmed'."


def test_a_fraud_review_for_an_order_parked_on_3ds_that_will_not_be_reviewed_is_refused(
    client_api, ops_api, catalog, celery_worker, wait_for
):
    """Waiting at its 3-D Secure step, a small order will not wait for a fraud review: a
    review sent now is refused (409 not_waiting), not kept and silently never used."""
    order = place(client_api, [("lamp", 1)], payment_method="pm_card_3ds_required")
    parked_at(client_api, order, wait_for, "3ds_confirmed")
    saga_path = f"/api/v1/sagas/{order['saga']['id']}/signals/fraud_review/"
    assert_error(signal(ops_api, saga_path, {"approved": False}), 409, "not_waiting")
    assert not Saga.objects.get(pk=order["saga"]["id"]).signals.exists()


def test_3ds_confirmed_before_the_saga_reaches_the_wait_is_kept_and_consumed(
    client_api, catalog, celery_worker, wait_for
):
    # No worker takes the saga until the signal is in: it is still at reserve_inventory.
    celery_worker.pause_consuming()
    try:
        order = place(client_api, [("lamp", 1)], payment_method="pm_card_3ds_required")
        path = f"/api/v1/orders/{order['id']}/signals/3ds_confirmed/"
        response = signal(client_api, path, {"approved": True}, key="3ds-early")
        assert response.status_code == 202, response.content
        assert Saga.objects.get(pk=order["saga"]["id"]).current_step == "reserve_inventory"
        # An order that will not wait for it (no 3-D Secure) refuses it at once.
        plain = place(client_api, [("lamp", 1)])
        plain_path = f"/api/v1/orders/{plain['id']}/signals/3ds_confirmed/"
        assert_error(signal(client_api, plain_path, {"approved": True}), 409, "not_waiting")
    finally:
        celery_worker.resume_consuming()
    done = order_when(client_api, order["id"], wait_for, lambda b: b["status"] in SETTLED)
    assert done["status"] == "confirmed" and done["payment"]["captured"] == "19.90"
    saga = Saga.objects.get(pk=order["saga"]["id"])
    kinds = list(saga.events.values_list("kind", flat=True))
    assert "waiting" not in kinds  # the signal was there when it arrived: it never parked
    assert saga.signals.get().consumed_by == "confirm_3ds"
