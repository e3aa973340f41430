"""Sagas whose definition this code does not register (a type or version of another release):
the console says what it cannot do for them, predicts the refusal on its pages, and never
answers a 500 (nor a 500 after acting on the other sagas of a selection)."""

from __future__ import annotations

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone

from sagas.exceptions import SagaOperationRefused
from sagas.models import Saga, SagaEvent, SagaState, state_said
from sagas.services import saga_refusal, saga_resolve, saga_retry_now, saga_undo_done
from tests.admin.conftest import make_saga, needs_manual, running

pytestmark = pytest.mark.django_db

LIST = "/admin/sagas/saga/"
MISSING = "This code does not register gone_type v1"


def texts(response) -> list[tuple[str, str]]:
    return [(m.level_tag, str(m)) for m in get_messages(response.wsgi_request)]


def gone(saga: Saga) -> Saga:
    """The saga as a release that has its type left it (every saga gets a deadline)."""
    Saga.objects.filter(pk=saga.pk).update(saga_type="gone_type", deadline_at=timezone.now())
    return Saga.objects.get(pk=saga.pk)


def stopped_forward() -> Saga:
    """Stopped past its pivot going forward: retry now resumes it forward (its definition
    gives it back its working time)."""
    return needs_manual(
        escalated_from=SagaState.RUNNING, failed_undo="", step_index=2, failed_step="s3"
    )


def act(client, action: str, sagas, **fields):
    data = {"action": action, "_selected_action": [str(s.pk) for s in sagas], "index": "0"}
    return client.post(LIST, {**data, **fields}, follow=True)


def confirm(client, action: str, saga: Saga, **fields):
    data = {
        "action": action,
        "_selected_action": [str(saga.pk)],
        "select_across": "0",
        "confirm": "yes",
        f"version_{saga.pk}": str(saga.version),
        **fields,
    }
    return client.post(LIST, data, follow=True)


def test_a_bulk_retry_refuses_the_saga_it_cannot_resume_and_retries_the_others(ops_client):
    good = [needs_manual() for _ in range(3)]
    bad = gone(stopped_forward())
    response = act(ops_client, "retry_now", [*good, bad])
    assert response.status_code == 200
    messages = texts(response)
    assert ("success", "Retry requested for 3 sagas") in [
        (lvl, t.split(":")[0]) for lvl, t in messages
    ]
    assert any(lvl == "error" and str(bad.pk)[:8] in t and MISSING in t for lvl, t in messages)
    assert all(Saga.objects.get(pk=s.pk).state == SagaState.COMPENSATING for s in good)
    assert Saga.objects.get(pk=bad.pk).state == SagaState.NEEDS_MANUAL
    assert not SagaEvent.objects.filter(saga=bad, kind="ops_retry").exists()


def test_the_saga_page_offers_nothing_it_would_refuse_and_says_why(ops_client):
    saga = gone(stopped_forward())
    html = ops_client.get(reverse("admin:sagas_saga_change", args=[saga.pk])).content.decode()
    for button in ("Retry now", "Resolve with a note...", "Compensate..."):
        assert f'value="{button}"' not in html, button
    assert "which this code does not register" in html
    assert "this saga is finished" not in html


@pytest.mark.parametrize("action", ["compensate", "resolve", "undo_done"])
def test_a_confirmation_page_predicts_the_refusal(ops_client, action):
    """No page promising a plan (or that nothing took effect): the refusal, at once."""
    saga = gone(running() if action == "compensate" else needs_manual())
    response = act(ops_client, action, [saga])
    [(level, text)] = texts(response)
    assert level == "error" and MISSING in text
    assert "Nothing took effect yet" not in response.content.decode()


@pytest.mark.parametrize("state", [SagaState.SUCCEEDED, SagaState.COMPENSATED, SagaState.RESOLVED])
def test_a_finished_sagas_compensation_page_says_it_is_finished_not_that_its_definition_is_missing(
    ops_client, state
):
    """Its plan is empty and nothing is to be compensated, whatever code is deployed: the page
    refuses it as no longer running, as for a finished saga whose definition is registered."""
    saga = gone(make_saga(state=state, step_index=2))
    response = act(ops_client, "compensate", [saga])
    [(level, text)] = texts(response)
    assert level == "error"
    assert f"The saga {state_said(state)}; only a running saga can be compensated." in text
    assert MISSING not in text


@pytest.mark.parametrize(
    ("action", "fields"),
    [
        ("compensate", {"reason": "stop it"}),
        ("resolve", {"note": "done by hand", "accept_effects": "yes"}),
        ("undo_done", {"note": "voided by hand", "step": "s1"}),
    ],
)
def test_confirming_anyway_is_refused_not_a_500(ops_client, action, fields):
    saga = gone(running() if action == "compensate" else needs_manual())
    if "step" in fields:
        fields = {f"step_{saga.pk}": fields.pop("step"), **fields}
    response = confirm(ops_client, action, saga, **fields)
    assert response.status_code == 200
    [(level, text)] = texts(response)
    assert level == "error" and MISSING in text
    assert not SagaEvent.objects.filter(saga=saga, kind__startswith="ops_").exists()
    assert Saga.objects.get(pk=saga.pk).version == saga.version


def test_the_signal_form_says_why_and_goes_back_to_the_saga(ops_client):
    saga = gone(running())
    url = reverse("admin:sagas_saga_signal", args=[saga.pk])
    for response in (ops_client.get(url), ops_client.post(url, {"name": "go", "payload": "{}"})):
        assert response.status_code == 302
        assert response["Location"] == reverse("admin:sagas_saga_change", args=[saga.pk])
    [(level, text), *_] = texts(ops_client.get(url, follow=True))
    assert level == "error" and MISSING in text
    # The services' refusal, word for word: one place says it (sagas.services).
    refused = saga_refusal(saga, "compensate")
    assert refused is not None and refused.code == "definition_missing"
    assert text == f"{refused.detail} Until then it takes no signal here."


def test_the_services_refuse_what_needs_the_missing_definition(ops_user):
    running_saga = gone(running())
    assert saga_refusal(running_saga, "compensate").code == "definition_missing"
    waiting = gone(needs_manual())
    for call in (
        lambda: saga_resolve(saga_id=waiting.pk, user=ops_user, note="x", accept_effects=True),
        lambda: saga_undo_done(saga_id=waiting.pk, user=ops_user, step="s1", note="x"),
        lambda: saga_retry_now(saga_id=gone(stopped_forward()).pk, user=ops_user),
    ):
        with pytest.raises(SagaOperationRefused) as refused:
            call()
        assert refused.value.code == "definition_missing"
    # Resuming a compensation needs no definition here (a worker that has it runs the rest).
    assert saga_retry_now(saga_id=waiting.pk, user=ops_user).state == SagaState.COMPENSATING


def test_an_unguarded_lookup_in_an_action_is_a_refusal_not_a_500(ops_client, monkeypatch):
    """The last guard: a LookupError out of one saga's operation refuses that saga (its
    transaction rolled back) and the others go on."""
    import sagas.admin

    real = sagas.admin.saga_retry_now
    broken = needs_manual()

    def retry(*, saga_id, **kw):
        if saga_id == broken.pk:
            raise KeyError("gone")
        return real(saga_id=saga_id, **kw)

    monkeypatch.setattr(sagas.admin, "saga_retry_now", retry)
    other = needs_manual()
    response = act(ops_client, "retry_now", [broken, other])
    assert response.status_code == 200
    levels = sorted(lvl for lvl, _ in texts(response))
    assert levels == ["error", "success"]
    assert Saga.objects.get(pk=other.pk).state == SagaState.COMPENSATING


def test_a_cancel_or_a_signal_is_refused_too_not_an_error(ops_user, viewer):
    """The same reads outside the console: an order's cancel (told to try again later, as
    this server is behind a release) and a signal (refused to ops staff, denied to others)."""
    from django.core.exceptions import PermissionDenied

    from orders.services import order_request_cancel
    from sagas.signals import saga_signal

    saga = gone(running(with_order=True))
    with pytest.raises(SagaOperationRefused) as refused:
        order_request_cancel(order=saga.order, actor=ops_user)
    assert refused.value.code == "definition_missing"
    assert "try again in a few minutes" in refused.value.detail
    with pytest.raises(SagaOperationRefused) as refused:
        saga_signal(saga_id=saga.pk, name="go", payload={}, user=ops_user)
    assert refused.value.code == "definition_missing"
    with pytest.raises(PermissionDenied):
        saga_signal(saga_id=saga.pk, name="go", payload={}, user=viewer)
