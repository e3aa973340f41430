"""``/api/v1/sagas/``: staff read sagas with their steps; ops staff retry, compensate and
resolve; every operation is in the saga's timeline with the user."""

from __future__ import annotations

import itertools
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from orders.saga import order_saga
from sagas.definition import get_definition
from sagas.models import Saga, SagaEvent, SagaState, StepStatus
from sagas.services import NOTE_MAX

from .conftest import assert_error

pytestmark = pytest.mark.django_db

SAGAS = "/api/v1/sagas/"


@pytest.fixture
def saga(client_api, place) -> Saga:
    """The running saga of a freshly placed order (no worker: it stays at its first step)."""
    order = place(client_api)
    return Saga.objects.get(order__id=order["id"])


def needs_manual(saga: Saga, *, escalated_from: str = SagaState.COMPENSATING) -> None:
    Saga.objects.filter(pk=saga.pk).update(
        state=SagaState.NEEDS_MANUAL,
        escalated_from=escalated_from,
        failed_step="reserve_inventory",
        failure_code="payment_declined",
    )


# -- reading --------------------------------------------------------------------------------------
def test_staff_list_and_read_sagas_with_their_steps(staff_api, saga):
    """The list and the detail show the saga and its steps in order (the waits included)."""
    page = staff_api.get(SAGAS).json()
    assert page["count"] == 1
    listed = page["results"][0]
    assert listed["id"] == str(saga.id)
    assert listed["type"] == "order"
    assert listed["state"] == "running"
    assert listed["definition_version"] == get_definition("order").version  # the newest
    assert [s["name"] for s in listed["steps"]] == [
        "reserve_inventory",
        "confirm_3ds",
        "authorize_payment",
        "arrange_shipment",
        "fraud_review",
        "capture_payment",
        "confirm_order",
    ]
    detail = staff_api.get(f"{SAGAS}{saga.id}/").json()
    # ``stuck`` is computed at read time (overdue by SAGA_STUCK_AFTER, 0.5 s in the tests): on
    # a loaded machine it may flip between the two requests, so it is not part of the match.
    assert {k: v for k, v in detail.items() if k != "stuck"} == {
        k: v for k, v in listed.items() if k != "stuck"
    }
    assert detail["steps"][0]["idempotency_key"] == f"saga:{saga.id}:reserve_inventory"


def test_clients_and_anonymous_cannot_see_sagas(client_api, anon_api, saga):
    """A client is 403 on every saga route, anonymous 401, both with the error shape."""
    for path in (SAGAS, f"{SAGAS}{saga.id}/", f"{SAGAS}{saga.id}/compensation-plan/"):
        assert_error(client_api.get(path), 403, "permission_denied")
        assert_error(anon_api.get(path), 401, "not_authenticated")
    for op in ("retry", "compensate", "resolve"):
        assert_error(client_api.post(f"{SAGAS}{saga.id}/{op}/"), 403, "permission_denied")
        assert_error(anon_api.post(f"{SAGAS}{saga.id}/{op}/"), 401, "not_authenticated")


def test_unknown_saga_is_404(staff_api, ops_api):
    missing = uuid.uuid4()
    assert_error(staff_api.get(f"{SAGAS}{missing}/"), 404, "not_found")
    assert_error(ops_api.post(f"{SAGAS}{missing}/retry/"), 404, "not_found")


def test_filters_state_type_and_stuck(staff_api, client_api, place):
    """``state``, ``type`` and ``stuck=true`` (active, overdue by SAGA_STUCK_AFTER, no live
    lease) narrow the list; a bad state value is a 400."""
    sagas = [Saga.objects.get(order__id=place(client_api)["id"]) for _ in range(4)]
    long_ago = timezone.now() - timedelta(hours=1)
    Saga.objects.filter(pk=sagas[0].pk).update(next_attempt_at=long_ago)  # stuck
    Saga.objects.filter(pk=sagas[1].pk).update(
        next_attempt_at=long_ago, lease_until=timezone.now() + timedelta(minutes=1)
    )  # overdue but a worker holds it
    Saga.objects.filter(pk=sagas[2].pk).update(
        state=SagaState.SUCCEEDED, next_attempt_at=long_ago
    )  # settled: never stuck
    Saga.objects.filter(pk=sagas[3].pk).update(next_attempt_at=timezone.now() + timedelta(1))

    def ids(query: str) -> set[str]:
        response = staff_api.get(f"{SAGAS}?{query}")
        assert response.status_code == 200, response.content
        return {s["id"] for s in response.json()["results"]}

    assert ids("stuck=true") == {str(sagas[0].id)}
    assert ids("state=succeeded") == {str(sagas[2].id)}
    assert ids("state=running") == {str(s.id) for s in (sagas[0], sagas[1], sagas[3])}
    assert ids("type=order") == {str(s.id) for s in sagas}
    assert ids("type=other") == set()
    assert ids("state=running&stuck=true") == {str(sagas[0].id)}
    assert str(sagas[0].id) not in ids("stuck=false")
    stuck = staff_api.get(f"{SAGAS}{sagas[0].id}/").json()
    assert stuck["stuck"] is True
    assert_error(staff_api.get(f"{SAGAS}?state=lost"), 400, "invalid")
    assert "stuck" in assert_error(staff_api.get(f"{SAGAS}?stuck=maybe"), 400, "invalid")["fields"]

    from sagas.selectors import sagas_stuck

    assert list(sagas_stuck()) == [Saga.objects.get(pk=sagas[0].pk)]


# -- the compensation plan ------------------------------------------------------------------------
def test_compensation_plan_is_the_dry_run(staff_api, saga):
    """Staff (without the ops permission) read the plan: the compensations of the steps that
    took effect, in run order, with their undo keys; nothing changes."""
    Saga.objects.filter(pk=saga.pk).update(
        step_index=order_saga.index_of("arrange_shipment"),
        current_step="arrange_shipment",
        results={"reserve_inventory": {}, "authorize_payment": {}},
    )
    saga.steps.filter(name__in=["reserve_inventory", "authorize_payment"]).update(
        status=StepStatus.SUCCEEDED, took_effect=True
    )
    before = Saga.objects.get(pk=saga.pk).version
    response = staff_api.get(f"{SAGAS}{saga.id}/compensation-plan/")
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["saga_id"] == str(saga.id)
    assert body["state"] == "running"
    assert [c["step"] for c in body["compensations"]] == ["authorize_payment", "reserve_inventory"]
    assert body["compensations"][0] == {
        "step": "authorize_payment",
        "compensation": "void_authorization",
        "idempotency_key": f"saga:{saga.id}:authorize_payment:undo",
        "status": "succeeded",
        "why": "it took effect",
    }
    assert Saga.objects.get(pk=saga.pk).version == before


# -- operations -----------------------------------------------------------------------------------
def test_staff_without_the_ops_permission_get_403_on_operations(staff_api, saga):
    """Reading is allowed, operating is not: 403 on retry, compensate and resolve, even with a
    valid body; nothing is recorded."""
    for op, body in (("retry", {}), ("compensate", {"reason": "x"}), ("resolve", {"note": "x"})):
        assert_error(
            staff_api.post(f"{SAGAS}{saga.id}/{op}/", body, format="json"),
            403,
            "permission_denied",
        )
    assert not SagaEvent.objects.filter(saga=saga, kind__startswith="ops_").exists()


def test_retry_now_is_202_and_recorded_with_the_user(ops_api, saga):
    """An idle running saga: 202, next attempt now, an ops_retry event by the user."""
    Saga.objects.filter(pk=saga.pk).update(next_attempt_at=timezone.now() + timedelta(hours=1))
    response = ops_api.post(f"{SAGAS}{saga.id}/retry/")
    assert response.status_code == 202, response.content
    assert response.json()["id"] == str(saga.id)
    event = SagaEvent.objects.get(saga=saga, kind="ops_retry")
    assert event.actor == "user:olivia"
    assert Saga.objects.get(pk=saga.pk).next_attempt_at <= timezone.now()


def test_a_retry_with_a_body_that_is_not_json_is_400_and_retries_nothing(ops_api, saga):
    """A retry takes no body; one that is not JSON is refused, not ignored."""
    later = timezone.now() + timedelta(hours=1)
    Saga.objects.filter(pk=saga.pk).update(next_attempt_at=later)
    response = ops_api.post(f"{SAGAS}{saga.id}/retry/", b"{bad", content_type="application/json")
    assert_error(response, 400, "parse_error")
    # JSON, but not the object (or nothing) every such route takes.
    for body in (b"[1]", b'"retry"', b"null", b"42"):
        response = ops_api.post(f"{SAGAS}{saga.id}/retry/", body, content_type="application/json")
        assert_error(response, 400, "invalid")
    assert not SagaEvent.objects.filter(saga=saga, kind="ops_retry").exists()
    assert Saga.objects.get(pk=saga.pk).next_attempt_at == later


def test_retry_resumes_a_saga_that_needs_a_person(ops_api, saga):
    """needs_manual mid-compensation: retry returns it to compensating."""
    needs_manual(saga)
    response = ops_api.post(f"{SAGAS}{saga.id}/retry/")
    assert response.status_code == 202
    assert response.json()["state"] == "compensating"


def test_retry_is_refused_while_a_step_is_in_flight_and_after_settling(ops_api, saga):
    """409 with the engine's code: in_flight while leased, settled once finished."""
    Saga.objects.filter(pk=saga.pk).update(lease_until=timezone.now() + timedelta(minutes=1))
    assert_error(ops_api.post(f"{SAGAS}{saga.id}/retry/"), 409, "in_flight")
    Saga.objects.filter(pk=saga.pk).update(state=SagaState.SUCCEEDED, lease_until=None)
    assert_error(ops_api.post(f"{SAGAS}{saga.id}/retry/"), 409, "settled")


SAID = {
    SagaState.SUCCEEDED: "has succeeded",
    SagaState.COMPENSATED: "has been compensated",
    SagaState.RESOLVED: "has been resolved",
    SagaState.NEEDS_MANUAL: "needs a person (needs_manual)",
    SagaState.COMPENSATING: "is compensating",
    SagaState.RUNNING: "is running",
}


#: Each refusal that names the saga's state: route, body, code, and its words for ``said``.
STATE_REFUSALS = [
    ("retry", None, "settled", "The saga {said}; there is nothing to retry."),
    (
        "compensate",
        {"reason": "r"},
        "not_running",
        "The saga {said}; only a running saga can be compensated.",
    ),
    (
        "resolve",
        {"note": "n"},
        "not_needs_manual",
        "Only a saga in needs_manual can be resolved; this one {said}.",
    ),
    (
        "undo-done",
        {"step": "capture_payment", "note": "n"},
        "not_waiting_on_undo",
        "The saga is not waiting on the undo of capture_payment: it {said} and waits on no undo.",
    ),
]


#: What each route answers a saga in each state (standing at capture_payment, stopped while
#: running forward where it needs a person): the refusing code, or None where it is accepted.
REFUSED_IN = {
    "retry": {
        SagaState.RUNNING: None,
        SagaState.COMPENSATING: None,
        SagaState.NEEDS_MANUAL: None,
        SagaState.SUCCEEDED: "settled",
        SagaState.COMPENSATED: "settled",
        SagaState.RESOLVED: "settled",
    },
    "compensate": {
        SagaState.RUNNING: None,
        SagaState.NEEDS_MANUAL: None,
        SagaState.COMPENSATING: "not_running",
        SagaState.SUCCEEDED: "not_running",
        SagaState.COMPENSATED: "not_running",
        SagaState.RESOLVED: "not_running",
    },
    "resolve": {state: "not_needs_manual" for state in SAID} | {SagaState.NEEDS_MANUAL: None},
    "undo-done": {state: "not_waiting_on_undo" for state in SAID},
}


@pytest.mark.parametrize("state", list(SAID))
@pytest.mark.parametrize(("route", "body", "code", "words"), STATE_REFUSALS)
def test_a_refusal_says_the_sagas_state_in_english(ops_api, saga, state, route, body, code, words):
    """The refusals that name the saga's state say it as a sentence does, in every state: "The
    saga has succeeded; there is nothing to retry.", not "The saga is succeeded"; the codes
    are as before. A fresh saga for each state and route, and each answer as the table says:
    accepted, or refused with its code in these words."""
    Saga.objects.filter(pk=saga.pk).update(
        state=state, escalated_from=SagaState.RUNNING, current_step="capture_payment"
    )
    answer = ops_api.post(f"{SAGAS}{saga.id}/{route}/", body, format="json")
    expected = REFUSED_IN[route][state]
    if expected is None:
        assert answer.status_code in (200, 202), answer.content
        return
    assert expected == code
    detail = assert_error(answer, 409, code)["detail"]
    assert detail == words.format(said=SAID[state])
    assert not any(f"is {name}" in detail for name in ("succeeded", "compensated", "resolved"))
    assert "is needs_manual" not in detail


def test_compensate_is_202_with_a_reason_recorded(ops_api, saga):
    """A running saga: 202; the order turns cancelling with step_failed; the reason and the
    user are in the timeline."""
    response = ops_api.post(
        f"{SAGAS}{saga.id}/compensate/", {"reason": "fraud suspected"}, format="json"
    )
    assert response.status_code == 202, response.content
    assert response.json()["cancel_reason"] == "step_failed"
    event = SagaEvent.objects.get(saga=saga, kind="ops_compensate")
    assert (event.actor, event.detail) == ("user:olivia", "fraud suspected")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"reason": ""},
        {"reason": "   "},
        {"reason": 5},
        {"reason": "\u200b"},
        {"reason": " \ufeff "},
    ],
)
def test_compensate_needs_a_reason(ops_api, saga, body):
    """No (or a blank) reason: 400 naming ``reason``; nothing recorded."""
    error = assert_error(ops_api.post(f"{SAGAS}{saga.id}/compensate/", body, format="json"), 400)
    assert error["code"] in {"invalid", "reason_required"}
    assert not SagaEvent.objects.filter(saga=saga, kind="ops_compensate").exists()


def test_a_compensate_reason_takes_the_consoles_limit_and_a_longer_one_is_400_naming_it(
    ops_api, saga
):
    """The API takes a reason as long as the ops console does (NOTE_MAX, what the timeline
    keeps), whole; one character more is a 400 on ``reason`` naming the limit, and nothing is
    recorded (it was 500 here and 2,000 on the console)."""
    longest = "r" * (NOTE_MAX - 4) + " END"
    path = f"{SAGAS}{saga.id}/compensate/"
    error = assert_error(ops_api.post(path, {"reason": longest + "!"}, format="json"), 400)
    assert list(error["fields"]) == ["reason"], error
    assert f"no more than {NOTE_MAX} characters" in error["fields"]["reason"][0], error
    assert not SagaEvent.objects.filter(saga=saga, kind="ops_compensate").exists()

    response = ops_api.post(path, {"reason": longest}, format="json")
    assert response.status_code == 202, response.content[:500]
    event = SagaEvent.objects.get(saga=saga, kind="ops_compensate")
    assert event.detail == longest


@pytest.mark.parametrize(
    ("op", "body", "field"),
    [
        ("compensate", {"reason": "fraud", "notify": True}, "notify"),
        ("resolve", {"note": "done", "accept_effect": True}, "accept_effect"),
        ("undo-done", {"step": "reserve_inventory", "note": "done", "by": "me"}, "by"),
        ("retry", {"now": True}, "now"),
    ],
)
def test_an_ops_operation_that_names_a_field_it_does_not_take_is_400_and_does_nothing(
    ops_api, saga, op, body, field
):
    """A misspelt ``accept_effects`` is refused, not ignored (and then the resolve refused
    for the effects it was meant to accept, or carried out without it)."""
    before = SagaEvent.objects.filter(saga=saga).count()
    response = ops_api.post(f"{SAGAS}{saga.id}/{op}/", body, format="json")
    error = assert_error(response, 400, "unknown_field")
    assert list(error["fields"]) == [field], error
    assert SagaEvent.objects.filter(saga=saga).count() == before


@pytest.mark.parametrize("key", [None, "review-by-ada"])
def test_a_fraud_review_from_the_orders_own_client_is_403_staff_only_and_404_to_another(
    client_api, other_api, saga, key
):
    """The order's own client knows the order exists: its fraud review is refused as staff
    only (403 saying so) on the sagas route as on the orders route, not hidden as a 404.
    Another client still gets 404 on both, learning nothing; no signal is kept, no event
    written. The 403 comes before the body is read: a malformed body (a payload that is not an
    object, a field the route does not take) is not a 400 telling the client how to mend a
    signal it may not send at all."""
    saga = parked(saga, "fraud_review", minutes=1)
    order_id = saga.order.id
    routes = (
        f"{SAGAS}{saga.id}/signals/fraud_review/",
        f"/api/v1/orders/{order_id}/signals/fraud_review/",
    )
    headers = {"Idempotency-Key": key} if key else {}
    events = SagaEvent.objects.filter(saga=saga).count()
    bodies = ({"payload": {"approved": True}}, {"payload": "yes"}, {"approved": True})
    for path, body in itertools.product(routes, bodies):
        refused = client_api.post(path, body, format="json", headers=headers)
        error = assert_error(refused, 403, "permission_denied")
        assert error["detail"] == "Only ops staff may send 'fraud_review'.", (path, body, error)
        hidden = other_api.post(path, body, format="json", headers=headers)
        assert_error(hidden, 404, "not_found")
    assert not saga.signals.exists()
    assert SagaEvent.objects.filter(saga=saga).count() == events


def test_a_signal_sent_without_its_payload_wrapper_is_told_so(ops_api, saga):
    """``{"approved": true}`` instead of ``{"payload": {"approved": true}}``: the name is
    refused (the signal takes ``payload``), not read as an empty payload."""
    saga = parked(saga, "fraud_review", minutes=1)
    path = f"{SAGAS}{saga.id}/signals/fraud_review/"
    error = assert_error(ops_api.post(path, {"approved": True}, format="json"), 400)
    assert (error["code"], error["fields"]) == (
        "unknown_field",
        {"approved": ["Unknown field: a signal takes payload."]},
    ), error
    assert not saga.signals.exists()


def test_a_signal_retried_under_its_key_is_replayed_before_its_body_is_checked(
    ops_api, staff_api, saga
):
    """The retry of a signal sent before a rule that now refuses its body is its 202 replay,
    not a 400; someone who may not send it is still refused."""
    saga = parked(saga, "fraud_review", minutes=1)
    path = f"{SAGAS}{saga.id}/signals/fraud_review/"
    first = ops_api.post(
        path, {"payload": {"approved": True}}, format="json", headers={"Idempotency-Key": "r1"}
    )
    assert first.status_code == 202, first.content
    retry = {"payload": {"approved": True}, "comment": "as agreed"}
    replay = ops_api.post(path, retry, format="json", headers={"Idempotency-Key": "r1"})
    assert replay.status_code == 202, replay.content
    assert replay["Idempotent-Replayed"] == "true"
    denied = staff_api.post(path, retry, format="json", headers={"Idempotency-Key": "r1"})
    assert denied.status_code in (400, 403) and "Idempotent-Replayed" not in denied
    assert saga.signals.count() == 1


def test_the_compensation_plan_of_a_saga_whose_definition_is_not_registered_is_a_409(
    staff_api, saga
):
    """It was a 500 (the dry run looked the definition up unguarded); it is the 409
    definition_missing every operation that needs the definition answers."""
    Saga.objects.filter(pk=saga.pk).update(definition_version=99)
    response = staff_api.get(f"{SAGAS}{saga.id}/compensation-plan/")
    body = assert_error(response, 409, "definition_missing")
    assert body["detail"].startswith("This code does not register order v99")


@pytest.mark.parametrize("state", [SagaState.SUCCEEDED, SagaState.COMPENSATED, SagaState.RESOLVED])
@pytest.mark.parametrize("version", [None, 99])
def test_a_finished_sagas_compensation_plan_is_empty_whether_its_definition_is_registered(
    staff_api, saga, state, version
):
    """A finished saga is settled: nothing will be compensated, so its plan is empty with its
    state (as with its definition registered), not a 409 telling to deploy code that has
    the definition and try again."""
    fields = {"state": state}
    if version is not None:
        fields["definition_version"] = version
    Saga.objects.filter(pk=saga.pk).update(**fields)
    response = staff_api.get(f"{SAGAS}{saga.id}/compensation-plan/")
    assert response.status_code == 200, response.content
    assert response.json() == {"saga_id": str(saga.id), "state": state, "compensations": []}


def test_compensate_after_the_pivot_is_409(ops_api, saga):
    """Refused past the pivot, and the timeline does not claim an operator compensated."""
    Saga.objects.filter(pk=saga.pk).update(
        step_index=order_saga.index_of("confirm_order"), current_step="confirm_order"
    )
    assert_error(
        ops_api.post(f"{SAGAS}{saga.id}/compensate/", {"reason": "late"}, format="json"),
        409,
        "pivot_reached",
    )
    assert not SagaEvent.objects.filter(saga=saga, kind="ops_compensate").exists()


def test_compensate_of_a_saga_stopped_mid_undo_is_409_already_compensating(ops_api, saga):
    """In needs_manual because an undo kept failing, it is compensating already: the 409 says
    so (docs/api.md lists it for the route) and how to go on; nothing is recorded."""
    needs_manual(saga)
    body = assert_error(
        ops_api.post(f"{SAGAS}{saga.id}/compensate/", {"reason": "stop"}, format="json"),
        409,
        "already_compensating",
    )
    assert "retry now" in body["detail"]
    assert not SagaEvent.objects.filter(saga=saga, kind="ops_compensate").exists()


def test_resolve_closes_a_saga_that_needs_a_person_with_the_note(ops_api, saga):
    """needs_manual while undoing reserve_inventory, its only effect: resolving releases the
    reservation itself (the order saga's on_resolve), so nothing stays in place and no
    accept_effects is asked for; 200, resolved, the note and the user in the timeline, no
    effect named as kept."""
    needs_manual(saga)
    response = ops_api.post(
        f"{SAGAS}{saga.id}/resolve/", {"note": "refunded by hand"}, format="json"
    )
    assert response.status_code == 200, response.content
    assert response.json()["state"] == "resolved"
    event = SagaEvent.objects.get(saga=saga, kind="ops_resolve")
    assert event.actor == "user:olivia"
    assert event.detail == "refunded by hand"


@pytest.mark.parametrize("loose", ["yes", "true", 1, "on"], ids=repr)
def test_resolve_takes_accept_effects_as_json_true_only(ops_api, saga, loose):
    """Keeping effects in place cannot be taken back: "yes" or 1 is a 400, not a true."""
    needs_manual(saga)
    url = f"{SAGAS}{saga.id}/resolve/"
    body = assert_error(
        ops_api.post(url, {"note": "x", "accept_effects": loose}, format="json"), 400
    )
    assert "accept_effects" in body["fields"]
    assert Saga.objects.get(pk=saga.pk).state == "needs_manual"


def test_resolve_needs_a_note_and_a_saga_that_needs_a_person(ops_api, saga):
    """No note: 400. A running saga: 409 not_needs_manual."""
    assert_error(ops_api.post(f"{SAGAS}{saga.id}/resolve/", {}, format="json"), 400)
    assert_error(
        ops_api.post(f"{SAGAS}{saga.id}/resolve/", {"note": "x"}, format="json"),
        409,
        "not_needs_manual",
    )


def test_ops_operations_show_in_the_orders_timeline(ops_api, client_api, staff_api, saga):
    """The client's timeline shows the operator's action as support's, without the reason the
    operator typed; staff see the operator and the reason."""
    ops_api.post(f"{SAGAS}{saga.id}/compensate/", {"reason": "stock audit"}, format="json")
    order_id = saga.order.id
    events = client_api.get(f"/api/v1/orders/{order_id}/timeline/").json()["results"]
    [op] = [e for e in events if e["kind"] == "ops_compensate"]
    assert (op["actor"], op["detail"]) == ("support", "Our support team cancelled the order")
    assert "stock audit" not in str(events) and "olivia" not in str(events)
    staff = staff_api.get(f"/api/v1/orders/{order_id}/timeline/").json()["results"]
    [op] = [e for e in staff if e["kind"] == "ops_compensate"]
    assert (op["actor"], op["detail"]) == ("user:olivia", "stock audit")


def test_saga_routes_refuse_other_methods_with_405(ops_api, saga):
    assert_error(ops_api.delete(f"{SAGAS}{saga.id}/"), 405, "method_not_allowed")
    assert_error(ops_api.get(f"{SAGAS}{saga.id}/retry/"), 405, "method_not_allowed")
    assert_error(ops_api.post(SAGAS, {}, format="json"), 405, "method_not_allowed")


@pytest.mark.parametrize("value", ["1.4e16", "-1", "soon"])
def test_waiting_longer_than_out_of_range_is_a_400_naming_the_field(staff_api, value):
    """A wait longer than any saga's (or negative, or not a number) is refused as bad input
    naming the filter, never a 500 from overflowing date arithmetic."""
    resp = staff_api.get(f"/api/v1/sagas/?waiting_longer_than={value}")
    assert resp.status_code == 400, resp.content
    assert "waiting_longer_than" in resp.json().get("fields", {}), resp.json()


# -- signals and parked sagas (no worker: the saga stays where the test puts it) -------------------
def parked(saga: Saga, name: str, *, minutes: int) -> Saga:
    """The saga as the engine leaves it parked on the ``Wait`` for ``name`` since a while."""
    definition = get_definition(saga.saga_type, saga.definition_version)
    since = timezone.now() - timedelta(minutes=minutes)
    Saga.objects.filter(pk=saga.pk).update(
        current_step=name,
        step_index=[s.name for s in definition.steps].index(name),
        waiting_for=name,
        waiting_since=since,
        next_attempt_at=since + timedelta(days=1),
    )
    return Saga.objects.get(pk=saga.pk)


def test_waiting_filters_find_parked_sagas_by_signal_and_age(staff_api, client_api, place):
    old = parked(Saga.objects.get(order__id=place(client_api)["id"]), "fraud_review", minutes=90)
    fresh = parked(Saga.objects.get(order__id=place(client_api)["id"]), "fraud_review", minutes=1)
    busy = Saga.objects.get(order__id=place(client_api)["id"])

    def ids(query: str) -> set[str]:
        response = staff_api.get(f"{SAGAS}?{query}")
        assert response.status_code == 200, response.content
        return {s["id"] for s in response.json()["results"]}

    assert ids("waiting_for=fraud_review") == {str(old.pk), str(fresh.pk)}
    assert ids("waiting_for=*") == {str(old.pk), str(fresh.pk)}
    assert ids("waiting_for=3ds_confirmed") == set()
    assert ids("waiting_for=fraud_review&waiting_longer_than=3600") == {str(old.pk)}
    assert str(busy.pk) not in ids("waiting_for=*")
    body = staff_api.get(f"{SAGAS}{old.pk}/").json()
    assert body["waiting_for"] == "fraud_review"


def test_signal_route_refusals_are_clear_4xx_and_record_nothing(staff_api, ops_api, saga):
    saga = parked(saga, "fraud_review", minutes=1)
    path = f"{SAGAS}{saga.id}/signals/fraud_review/"
    approve = {"payload": {"approved": True}}
    # Staff who may read sagas but not operate them.
    assert_error(staff_api.post(path, approve, format="json"), 403, "permission_denied")
    # Payload: an object with `approved` true or false.
    assert_error(ops_api.post(path, {"payload": [1]}, format="json"), 400)
    body = assert_error(ops_api.post(path, {"payload": {"approved": 1}}, format="json"), 400)
    # Plain text, also in the ops console's error box: no Markdown backticks.
    assert 'needs "approved": true or false.' in body["detail"] and "`" not in body["detail"]
    # A signal this saga type never waits for, a saga that does not exist.
    other = f"{SAGAS}{saga.id}/signals/no_such_signal/"
    assert_error(ops_api.post(other, approve, format="json"), 409, "unknown_signal")
    missing = f"{SAGAS}{uuid.uuid4()}/signals/fraud_review/"
    assert_error(ops_api.post(missing, approve, format="json"), 404)
    assert not saga.signals.exists()
    assert not SagaEvent.objects.filter(saga=saga, kind="ops_signal").exists()
    # And the one that is right is taken.
    response = ops_api.post(path, approve, format="json")
    assert response.status_code == 202, response.content
    assert saga.signals.get().payload == {"approved": True}


def test_retry_is_refused_for_a_saga_waiting_for_a_signal(ops_api, saga):
    """409 waiting: the step would only park again, so nothing changes and no ops_retry event
    tells the order's client that support retried it; the ops console offers no retry."""
    waiting = parked(saga, "fraud_review", minutes=5)
    body = assert_error(ops_api.post(f"{SAGAS}{saga.id}/retry/"), 409, "waiting")
    assert "fraud_review" in body["detail"], body
    after = Saga.objects.get(pk=saga.pk)
    assert (after.next_attempt_at, after.version) == (waiting.next_attempt_at, waiting.version)
    assert not SagaEvent.objects.filter(saga=saga, kind="ops_retry").exists()
