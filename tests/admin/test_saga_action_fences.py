"""What a confirmation page (or a button on a saga page) posts back, and what the console does
with it: it acts on the sagas the page accepted, as the page showed them, and on nothing else.

Each test posts the form exactly as a browser would (its hidden fields as rendered), after the
saga changed meanwhile where the test says so."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.contrib.messages import get_messages

from sagas.admin import MAX_LISTED
from sagas.models import Saga, SagaEvent, SagaState, SagaStep, StepStatus
from tests.admin.conftest import needs_manual, running

pytestmark = pytest.mark.django_db

LIST = "/admin/sagas/saga/"


def texts(response) -> list[tuple[str, str]]:
    return [(m.level_tag, str(m)) for m in get_messages(response.wsgi_request)]


def hidden_fields(html: str, form_id: str) -> list[tuple[str, str]]:
    """The hidden inputs of a form, as the browser would post them."""
    form = html[html.index(f'id="{form_id}"') :]
    form = form[: form.index("</form>")]
    return re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form)


def page(client, action: str, sagas) -> str:
    """The confirmation page of ``action`` for ``sagas``, as the list's action bar opens it."""
    data = {"action": action, "_selected_action": [str(s.pk) for s in sagas], "index": "0"}
    return client.post(LIST, data).content.decode()


def submit(client, fields: list[tuple[str, str]], **typed: str):
    """Post a rendered form's hidden fields plus what the operator typed or ticked."""
    data: dict[str, list[str]] = {}
    for name, value in fields:
        data.setdefault(name, []).append(value)
    for name, value in typed.items():
        data[name] = [value]
    return client.post(LIST, data, follow=True)


def escalate_to_undo(saga: Saga, step: str, index: int) -> None:
    """What the engine leaves when the undo of ``step`` kept failing: needs_manual, a new
    version (every engine write moves it)."""
    Saga.objects.filter(pk=saga.pk).update(
        state=SagaState.NEEDS_MANUAL,
        escalated_from=SagaState.COMPENSATING,
        current_step=step,
        step_index=index,
        failed_step="s3",
        failure_code="no",
        failed_undo=step,
        next_attempt_at=None,
        last_error="compensation failed: provider down",
        version=saga.version + 5,
    )


# ---------------------------------------------------------------------------------------------
# A saga shown as refused is not acted on
# ---------------------------------------------------------------------------------------------
def test_undo_done_never_acts_on_a_saga_the_page_showed_as_refused(ops_client):
    """A waits on the undo of s3; B is running (shown refused). B then escalates to waiting on
    the undo of s2: confirming the page records A's undo, and leaves B alone."""
    shown = needs_manual(step_index=2, failed_step="s3")
    other = running()
    html = page(ops_client, "undo_done", [shown, other])
    assert "refused:" in html
    fields = hidden_fields(html, "undo-done-form")
    escalate_to_undo(other, "s2", 1)

    done = submit(ops_client, fields, note="voided s3 of the first saga in the dashboard")
    assert [lvl for lvl, _ in texts(done)] == ["success"]
    assert SagaStep.objects.get(saga=other, name="s2").status != StepStatus.COMPENSATED_BY_HAND
    assert not SagaEvent.objects.filter(saga=other, kind="ops_undo_done").exists()
    assert Saga.objects.get(pk=other.pk).state == SagaState.NEEDS_MANUAL
    assert SagaEvent.objects.filter(saga=shown, kind="ops_undo_done", step="s3").exists()


def test_resolve_never_acts_on_a_saga_the_page_showed_as_refused(ops_client):
    """The one "keep the effects" box is ticked for the effects the page listed: a saga shown
    as refused that needs a person by the time of confirming is not resolved with its own
    effects, which nobody saw, kept."""
    shown = needs_manual()
    other = running()
    html = page(ops_client, "resolve", [shown, other])
    assert "refused: Only a saga in needs_manual" in html and 'name="accept_effects"' in html
    fields = hidden_fields(html, "resolve-form")
    escalate_to_undo(other, "s2", 1)

    done = submit(ops_client, fields, note="refunded the first one by hand", accept_effects="yes")
    assert [lvl for lvl, _ in texts(done)] == ["success"]
    assert Saga.objects.get(pk=other.pk).state == SagaState.NEEDS_MANUAL
    assert not SagaEvent.objects.filter(saga=other, kind="ops_resolve").exists()
    assert Saga.objects.get(pk=shown.pk).state == SagaState.RESOLVED
    assert "left out" in html


def test_compensate_confirmation_posts_back_only_the_sagas_it_accepted(ops_client):
    live = running()
    done = needs_manual()
    html = page(ops_client, "compensate", [live, done])
    fields = hidden_fields(html, "compensate-form")
    assert [value for name, value in fields if name == "_selected_action"] == [str(live.pk)]


# ---------------------------------------------------------------------------------------------
# Undo done: each saga's own undo, for every saga of the selection
# ---------------------------------------------------------------------------------------------
def test_undo_done_fences_every_accepted_saga_not_only_the_listed_ones(ops_client):
    """The page lists 50 sagas and says "and 1 more"; the one not listed still carries the
    undo the page accepted it for. Had it moved on meanwhile (the undo of s3 ran, the one of
    s2 keeps failing), confirming is refused for it, not recorded as s2 done by hand."""
    sagas = [
        needs_manual(step_index=2, failed_step="s3", events=0, age=timedelta(minutes=i))
        for i in range(MAX_LISTED + 1)
    ]
    oldest = sagas[-1]  # newest first: the row past the listed ones
    html = page(ops_client, "undo_done", sagas)
    assert "and 1 more" in html
    fields = hidden_fields(html, "undo-done-form")
    [fences] = [value for name, value in fields if name == "fences"]
    assert f"{oldest.pk}:{oldest.version}:s3" in fences.split(";")
    SagaStep.objects.filter(saga=oldest, name="s3").update(status=StepStatus.COMPENSATED)
    escalate_to_undo(oldest, "s2", 1)

    done = submit(ops_client, fields, note="voided s3 by hand for all of them")
    messages = texts(done)
    (level, text), *_ = messages
    assert level == "success" and f"for {MAX_LISTED} sagas" in text, messages
    assert any(lvl == "error" and str(oldest.pk)[:8] in text for lvl, text in messages), messages
    assert SagaStep.objects.get(saga=oldest, name="s2").status != StepStatus.COMPENSATED_BY_HAND
    assert not SagaEvent.objects.filter(saga=oldest, kind="ops_undo_done").exists()


def test_undo_done_without_the_undo_the_page_named_is_refused(ops_client):
    """A post that names no undo for a saga (a hand-made one, a page from before the fence)
    does not take the saga's step at confirm time: it is refused, and nothing is recorded."""
    saga = needs_manual(step_index=2, failed_step="s3")
    data = {
        "action": "undo_done",
        "_selected_action": [str(saga.pk)],
        "select_across": "0",
        "confirm": "yes",
        "note": "voided by hand",
    }
    done = ops_client.post(LIST, data, follow=True)
    [(level, text)] = texts(done)
    assert level == "error" and "named no undo" in text
    assert not SagaEvent.objects.filter(saga=saga, kind="ops_undo_done").exists()
    assert SagaStep.objects.get(saga=saga, name="s3").status != StepStatus.COMPENSATED_BY_HAND


# ---------------------------------------------------------------------------------------------
# Versions: a double submit or a stale page does not act again
# ---------------------------------------------------------------------------------------------
def button_fields(html: str, action: str) -> list[tuple[str, str]]:
    """The hidden inputs of the saga page's button form for ``action``."""
    for form in html.split("<form")[1:]:
        form = form[: form.index("</form>")]
        if f'name="action" value="{action}"' in form:
            return re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form)
    raise AssertionError(f"no {action} button on the page")


def test_a_double_click_on_retry_now_retries_once(ops_client):
    """The second post of the saga page's button (a double click, back and submit again) is
    refused as changed: one retry, one timeline event, one audit entry, one attempt reset."""
    from audit.models import AuditEntry

    saga = needs_manual()
    url = f"{LIST}{saga.pk}/change/"
    fields = button_fields(ops_client.get(url).content.decode(), "retry_now")
    assert ("fences", f"{saga.pk}:{saga.version}:") in fields

    first = submit(ops_client, fields)
    second = submit(ops_client, fields)
    assert [lvl for lvl, _ in texts(first)] == ["success"]
    [(level, text)] = texts(second)
    assert level == "error" and "changed since your page showed it" in text
    assert "it is compensating at s1 now; reload and decide again." in text
    assert SagaEvent.objects.filter(saga=saga, kind="ops_retry").count() == 1
    assert AuditEntry.objects.filter(action="saga.retry", target=f"saga:{saga.pk}").count() == 1


def test_a_compensate_confirmation_submitted_twice_compensates_once(ops_client):
    from orders.saga import order_saga

    saga = running(saga_type="order", step_index=order_saga.index_of("arrange_shipment"))
    fields = hidden_fields(page(ops_client, "compensate", [saga]), "compensate-form")
    assert ("fences", f"{saga.pk}:{saga.version}:arrange_shipment") in fields
    first = submit(ops_client, fields, reason="customer asked (ticket 1)")
    second = submit(ops_client, fields, reason="customer asked (ticket 1)")
    assert [lvl for lvl, _ in texts(first)] == ["success"]
    [(level, text)] = texts(second)
    assert level == "error" and "changed since your page showed it" in text
    assert SagaEvent.objects.filter(saga=saga, kind="ops_compensate").count() == 1


def test_a_stale_resolve_page_does_not_resolve_a_saga_that_changed_since(ops_client):
    """The page showed the saga needing a person; meanwhile a colleague retried it and it
    stopped again (the same state, another version): confirming is refused, not resolved on
    what the page showed."""
    saga = needs_manual()
    fields = hidden_fields(page(ops_client, "resolve", [saga]), "resolve-form")
    Saga.objects.filter(pk=saga.pk).update(version=saga.version + 3)
    done = submit(ops_client, fields, note="refunded by hand", accept_effects="yes")
    [(level, text)] = texts(done)
    assert level == "error" and "changed since your page showed it" in text
    assert "it needs a person (needs_manual) at " in text and "is needs_manual" not in text
    assert Saga.objects.get(pk=saga.pk).state == SagaState.NEEDS_MANUAL
    assert not SagaEvent.objects.filter(saga=saga, kind="ops_resolve").exists()


def test_a_version_that_is_not_one_is_refused_not_a_500(ops_client):
    saga = needs_manual()
    data = {
        "action": "retry_now",
        "_selected_action": [str(saga.pk)],
        "index": "0",
        f"version_{saga.pk}": "seven",
    }
    done = ops_client.post(LIST, data, follow=True)
    [(level, text)] = texts(done)
    assert done.status_code == 200 and level == "error" and "reload and decide again" in text
    assert Saga.objects.get(pk=saga.pk).state == SagaState.NEEDS_MANUAL


def test_the_services_fence_on_the_version_only_when_given_one(ops_user):
    """The API calls the services with no version and keeps its behaviour: rules only."""
    from sagas.exceptions import SagaOperationRefused
    from sagas.services import saga_resolve, saga_retry_now

    saga = needs_manual()
    with pytest.raises(SagaOperationRefused) as refused:
        saga_retry_now(saga_id=saga.pk, user=ops_user, expected_version=saga.version + 1)
    assert refused.value.code == "changed"
    assert Saga.objects.get(pk=saga.pk).version == saga.version
    retried = saga_retry_now(saga_id=saga.pk, user=ops_user, expected_version=saga.version)
    assert retried.version == saga.version + 1
    with pytest.raises(SagaOperationRefused) as refused:
        saga_resolve(saga_id=saga.pk, user=ops_user, note="x", expected_version=saga.version)
    assert refused.value.code == "changed"
    assert saga_retry_now(saga_id=saga.pk, user=ops_user).state == SagaState.COMPENSATING


# ---------------------------------------------------------------------------------------------
# Compensate while a cancel is in progress
# ---------------------------------------------------------------------------------------------
def test_compensate_is_refused_while_a_cancel_is_in_progress(ops_client, ops_user):
    """Its client cancelled the order: it stops anyway, as its client asked. Compensating was
    reported as requested and changed nothing (the reason stayed the client's, not the
    step_failed the console promises); it is refused, saying so, before and on confirming."""
    from orders.saga import order_saga
    from sagas.exceptions import SagaOperationRefused
    from sagas.services import saga_compensate

    saga = running(saga_type="order", step_index=order_saga.index_of("arrange_shipment"))
    Saga.objects.filter(pk=saga.pk).update(cancel_reason="customer_cancelled")
    data = {"action": "compensate", "_selected_action": [str(saga.pk)], "index": "0"}
    asked = ops_client.post(LIST, data, follow=True)
    assert "Compensate this saga?" not in asked.content.decode()  # refused at once
    [(level, text)] = texts(asked)
    assert level == "error" and "A cancel is already in progress (customer_cancelled)" in text
    forced = {**data, "select_across": "0", "confirm": "yes", "reason": "ops stop"}
    del forced["index"]
    [(level, text)] = texts(ops_client.post(LIST, forced, follow=True))
    assert level == "error" and "already in progress" in text
    with pytest.raises(SagaOperationRefused) as refused:
        saga_compensate(saga_id=saga.pk, user=ops_user, reason="ops stop")  # as the API calls it
    assert refused.value.code == "already_cancelling"
    assert Saga.objects.get(pk=saga.pk).cancel_reason == "customer_cancelled"
    assert not SagaEvent.objects.filter(saga=saga, kind="ops_compensate").exists()


def test_a_compensate_confirmation_sent_twice_while_a_step_runs_compensates_once(ops_client):
    """A cancel recorded while a step is in flight keeps the saga's version (the step's record
    must land), so the version fence lets the second post through: the cancel in progress
    refuses it."""
    from django.utils import timezone

    from orders.saga import order_saga

    saga = running(saga_type="order", step_index=order_saga.index_of("arrange_shipment"))
    Saga.objects.filter(pk=saga.pk).update(lease_until=timezone.now() + timedelta(minutes=5))
    fields = hidden_fields(page(ops_client, "compensate", [saga]), "compensate-form")
    first = submit(ops_client, fields, reason="customer asked (ticket 1)")
    assert Saga.objects.get(pk=saga.pk).version == saga.version  # in flight: not moved
    second = submit(ops_client, fields, reason="customer asked (ticket 1)")
    assert [lvl for lvl, _ in texts(first)] == ["success"]
    [(level, text)] = texts(second)
    assert level == "error" and "A cancel is already in progress (step_failed)" in text
    assert SagaEvent.objects.filter(saga=saga, kind="ops_compensate").count() == 1


# ---------------------------------------------------------------------------------------------
# A full selection: as many sagas as one action takes, through the real confirmation page
# ---------------------------------------------------------------------------------------------
def many_waiting_on_the_undo_of_s3(n: int) -> list[Saga]:
    """``n`` sagas as :func:`needs_manual` leaves them with the undo of s3 failing, made in
    three queries (``make_saga`` makes each one in several)."""
    import uuid

    from sagas.definition import forward_key, get_definition

    names = [s.name for s in get_definition("test5").steps]
    sagas = Saga.objects.bulk_create(
        Saga(
            id=uuid.uuid4(),
            saga_type="test5",
            state=SagaState.NEEDS_MANUAL,
            current_step="s3",
            step_index=2,
            failed_step="s3",
            failed_undo="s3",
            failure_code="no",
            last_error="compensation failed: ConnectionError: provider down",
            escalated_from=SagaState.COMPENSATING,
            results={name: {"ok": True} for name in names[:2]},
            data={"script": {}},
        )
        for _ in range(n)
    )
    SagaStep.objects.bulk_create(
        SagaStep(
            saga=saga,
            index=i,
            name=name,
            status=StepStatus.SUCCEEDED if i < 2 else StepStatus.PENDING,
            attempts=1 if i < 2 else 0,
            idempotency_key=forward_key(saga.pk, name),
            result={"ok": True} if i < 2 else None,
            took_effect=i < 2,
        )
        for saga in sagas
        for i, name in enumerate(names)
    )
    return list(Saga.objects.filter(pk__in=[s.pk for s in sagas]))


@pytest.mark.parametrize(
    ("action", "form_id", "typed", "kind"),
    [
        ("undo_done", "undo-done-form", {"note": "voided all of them by hand"}, "ops_undo_done"),
        (
            "resolve",
            "resolve-form",
            {"note": "refunded by hand", "accept_effects": "yes"},
            "ops_resolve",
        ),
    ],
)
def test_a_confirmation_of_as_many_sagas_as_an_action_takes_acts_on_each(
    ops_client, action, form_id, typed, kind
):
    """MAX_BULK sagas confirmed at once: the page's form stays under the number of fields
    Django takes in one post (DATA_UPLOAD_MAX_NUMBER_FIELDS; beyond it the post was a 400 and
    nothing was done), and every saga is acted on, as the page said."""
    from django.conf import settings

    from sagas.admin import MAX_BULK

    sagas = many_waiting_on_the_undo_of_s3(MAX_BULK)
    html = page(ops_client, action, sagas)
    fields = hidden_fields(html, form_id)
    done = submit(ops_client, fields, **typed)
    assert done.status_code == 200
    messages = texts(done)
    assert [lvl for lvl, _ in messages] == ["success"], messages
    assert f"for {MAX_BULK} sagas" in messages[0][1]
    assert SagaEvent.objects.filter(saga__in=sagas, kind=kind).count() == MAX_BULK
    # With room to spare: the form's own fields plus what the operator types.
    assert len(fields) + len(typed) < settings.DATA_UPLOAD_MAX_NUMBER_FIELDS * 2 // 3


@pytest.mark.parametrize(
    "fences",
    [
        "garbage",
        "{id}:seven:",
        "{id}:3",
        "{id}:3:s3;{id}:3:s3",
        "{id}:3:" + "x" * 200,
        ";".join(["{id}:3:"] * 501),
        "",
    ],
)
def test_a_fence_field_the_console_did_not_write_is_refused_not_a_500(ops_client, fences):
    saga = needs_manual()
    data = {
        "action": "resolve",
        "_selected_action": [str(saga.pk)],
        "select_across": "0",
        "confirm": "yes",
        "note": "refunded by hand",
        "accept_effects": "yes",
        "fences": fences.format(id=saga.pk),
    }
    done = ops_client.post(LIST, data, follow=True)
    [(level, text)] = texts(done)
    assert done.status_code == 200 and level == "error", text
    assert "not ones this console wrote" in text and "Nothing was done" in text
    assert Saga.objects.get(pk=saga.pk).state == SagaState.NEEDS_MANUAL


def test_a_saga_posted_without_a_fence_beside_fenced_ones_is_refused(ops_client):
    fenced, unfenced = needs_manual(), needs_manual()
    data = {
        "action": "resolve",
        "_selected_action": [str(fenced.pk), str(unfenced.pk)],
        "select_across": "0",
        "confirm": "yes",
        "note": "refunded by hand",
        "accept_effects": "yes",
        "fences": f"{fenced.pk}:{fenced.version}:",
    }
    messages = texts(ops_client.post(LIST, data, follow=True))
    assert [lvl for lvl, _ in messages] == ["success", "error"], messages
    assert str(unfenced.pk)[:8] in messages[1][1] and "gave no version" in messages[1][1]
    assert Saga.objects.get(pk=fenced.pk).state == SagaState.RESOLVED
    assert Saga.objects.get(pk=unfenced.pk).state == SagaState.NEEDS_MANUAL
