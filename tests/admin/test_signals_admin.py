"""The ops console and parked sagas: find them by signal and age, see what one waits for,
send it a signal from its page (ops permission only; the timeline names the sender)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from audit.models import AuditEntry
from sagas.models import Saga, SagaSignal, SagaState, SagaStep

from .conftest import make_saga

pytestmark = pytest.mark.django_db

LIST = "/admin/sagas/saga/"


def parked_saga(*, minutes: int = 5) -> Saga:
    saga = make_saga(state=SagaState.RUNNING, saga_type="test_wait", step_index=1)
    since = timezone.now() - timedelta(minutes=minutes)
    Saga.objects.filter(pk=saga.pk).update(
        waiting_for="go", waiting_since=since, next_attempt_at=since + timedelta(hours=2)
    )
    # Its wait is two hours long (as its step row keeps it), so it has not timed out yet.
    SagaStep.objects.filter(saga=saga, name="await_go").update(wait_seconds=7200)
    return Saga.objects.get(pk=saga.pk)


def test_list_filters_parked_sagas_by_signal_and_age(ops_client):
    old, fresh = parked_saga(minutes=90), parked_saga(minutes=5)
    busy = make_saga(state=SagaState.RUNNING, saga_type="test_wait", step_index=0)
    by_signal = ops_client.get(LIST, {"waiting_for": "go"}).content.decode()
    assert str(old.pk) in by_signal and str(fresh.pk) in by_signal and str(busy.pk) not in by_signal
    by_age = ops_client.get(LIST, {"waiting_for": "go", "waiting_age": "1h"}).content.decode()
    assert str(old.pk) in by_age and str(fresh.pk) not in by_age
    assert "?waiting_for=go" in ops_client.get(LIST).content.decode()  # choice from definitions


def test_saga_page_shows_the_signal_it_waits_for_and_ops_send_it(ops_client, ops_user):
    saga = parked_saga()
    page = ops_client.get(reverse("admin:sagas_saga_change", args=[saga.pk])).content.decode()
    assert "Waiting for signal go" in page
    form_url = reverse("admin:sagas_saga_signal", args=[saga.pk])
    assert form_url in page
    assert ops_client.get(form_url).status_code == 200

    bad = ops_client.post(form_url, {"name": "go", "payload": "{not json", "key": ""})
    assert bad.status_code == 200 and "not JSON" in bad.content.decode()
    deep = ops_client.post(form_url, {"name": "go", "payload": "[" * 100_000 + "]" * 100_000})
    assert deep.status_code == 200 and "nested too deeply" in deep.content.decode()
    # Read, but deeper than a payload may nest (the API's parser refuses such a body itself).
    nested = '{"x": ' + "[" * 70 + "]" * 70 + "}"
    deep = ops_client.post(form_url, {"name": "go", "payload": nested})
    assert deep.status_code == 200 and "at most 64 levels deep" in deep.content.decode()
    long = ops_client.post(form_url, {"name": "go", "payload": '{"n": ' + "9" * 5000 + "}"})
    assert long.status_code == 200 and "more than 4300 digits" in long.content.decode()
    for number in ("1e400", "-1e400", "NaN", "Infinity"):
        payload = f'{{"ok": true, "n": {number}}}'
        huge = ops_client.post(form_url, {"name": "go", "payload": payload})
        assert huge.status_code == 200 and "a number JSON cannot hold" in huge.content.decode()
    twice = ops_client.post(form_url, {"name": "go", "payload": '{"ok": false, "ok": true}'})
    assert twice.status_code == 200 and "appears twice in one object" in twice.content.decode()
    bad_key = ops_client.post(form_url, {"name": "go", "payload": "{}", "key": "a\tb"})
    assert bad_key.status_code == 200 and "control characters" in bad_key.content.decode()
    assert not SagaSignal.objects.filter(saga=saga).exists()
    response = ops_client.post(form_url, {"name": "go", "payload": '{"ok": true}', "key": "k"})
    assert response.status_code == 302
    signal = SagaSignal.objects.get(saga=saga)
    assert signal.payload == {"ok": True} and signal.actor == f"user:{ops_user.username}"
    event = saga.events.get(kind="ops_signal")
    assert event.actor == f"user:{ops_user.username}" and "go" in event.detail
    # What was decided is in the timeline and the audit log, not only the signal's name.
    assert event.detail.startswith('go {"ok": true} (key k)'), event.detail
    entry = AuditEntry.objects.get(action="saga.signal", target=f"saga:{saga.pk}")
    assert '{"ok": true}' in entry.detail["note"], entry.detail
    assert Saga.objects.get(pk=saga.pk).version > saga.version  # made due, fenced
    # The same key with another payload: shown on the form, the first signal stands.
    reused = ops_client.post(form_url, {"name": "go", "payload": '{"ok": false}', "key": "k"})
    assert reused.status_code == 200 and "already used" in reused.content.decode()
    assert SagaSignal.objects.get(saga=saga).payload == {"ok": True}


def test_a_saga_not_waiting_yet_is_offered_no_signal_by_default(ops_client):
    """The form preselects the signal the saga waits for, and none for a saga not waiting
    yet (which keeps a signal for later): sending one takes a choice."""
    busy = make_saga(state=SagaState.RUNNING, saga_type="test_wait", step_index=0)
    form_url = reverse("admin:sagas_saga_signal", args=[busy.pk])
    html = ops_client.get(form_url).content.decode()
    assert '<option value="" selected>Choose a signal</option>' in html
    assert '<option value="go">go</option>' in html
    refused = ops_client.post(form_url, {"name": "", "payload": "{}", "key": ""})
    assert refused.status_code == 200 and "Choose the signal to send." in refused.content.decode()
    assert not SagaSignal.objects.filter(saga=busy).exists()
    waiting = ops_client.get(reverse("admin:sagas_saga_signal", args=[parked_saga().pk]))
    html = waiting.content.decode()
    assert '<option value="go" selected>go</option>' in html and "Choose a signal" not in html


def test_a_saga_that_can_take_no_signal_is_offered_none(ops_client):
    """Compensating, or settled: the page offers no form to send a signal it would refuse."""
    for state in (SagaState.COMPENSATING, SagaState.COMPENSATED):
        saga = make_saga(state=state, saga_type="test_wait", step_index=1)
        page = ops_client.get(reverse("admin:sagas_saga_change", args=[saga.pk])).content.decode()
        assert reverse("admin:sagas_saga_signal", args=[saga.pk]) not in page, state


@pytest.mark.parametrize("escape", ["\\u0000", "\\ud800"])
def test_a_payload_text_cannot_hold_is_refused_on_the_form(ops_client, escape):
    """Typed as JSON escapes, a NUL or a lone surrogate only appears once the form's text is
    parsed: the signal service refuses it (invalid_payload), as the API's parser does."""
    saga = parked_saga()
    form_url = reverse("admin:sagas_saga_signal", args=[saga.pk])
    payload = '{"ok": true, "note": "a' + escape + 'b"}'
    refused = ops_client.post(form_url, {"name": "go", "payload": payload, "key": ""})
    assert refused.status_code == 200 and "which text cannot hold" in refused.content.decode()
    assert not SagaSignal.objects.filter(saga=saga).exists()


def test_staff_without_the_ops_permission_may_not_send_signals(viewer_client):
    saga = parked_saga()
    form_url = reverse("admin:sagas_saga_signal", args=[saga.pk])
    assert viewer_client.get(form_url).status_code == 403
    response = viewer_client.post(form_url, {"name": "go", "payload": "{}"})
    assert response.status_code == 403
    assert not SagaSignal.objects.filter(saga=saga).exists()


def test_a_replay_with_a_number_jsonb_stores_exactly_is_still_a_replay(ops_user):
    """PostgreSQL keeps ``1e23`` as ``100000000000000000000000``, which no float equals: the
    same payload again under its key is a replay, not ``idempotency_key_reused``."""
    from sagas.exceptions import SignalKeyReused
    from sagas.signals import saga_signal

    saga = parked_saga()
    payload = {"ok": True, "score": 1e23, "ratio": 0.1}
    first = saga_signal(saga_id=saga.pk, name="go", payload=payload, key="k", user=ops_user)
    again = saga_signal(saga_id=saga.pk, name="go", payload=dict(payload), key="k", user=ops_user)
    assert not first.replayed and again.replayed
    with pytest.raises(SignalKeyReused):
        saga_signal(saga_id=saga.pk, name="go", payload={"ok": False}, key="k", user=ops_user)


def test_a_signal_to_a_saga_on_no_step_of_its_type_is_refused_not_a_crash(ops_user):
    """A settled saga whose current step is blank (or a step its version does not have): the
    signal is refused as ``not_waiting``, not a ``KeyError``."""
    from sagas.exceptions import SagaOperationRefused
    from sagas.signals import saga_signal

    saga = make_saga(state=SagaState.SUCCEEDED, saga_type="test_wait", step_index=1)
    Saga.objects.filter(pk=saga.pk).update(current_step="")
    with pytest.raises(SagaOperationRefused) as refused:
        saga_signal(saga_id=saga.pk, name="go", payload={}, key="k", user=ops_user)
    assert refused.value.code == "not_waiting"


def test_the_signal_form_sent_twice_sends_one_signal_and_says_so(ops_client):
    """A double click (or back and send again) on the form as rendered, no key typed: the
    second post is a replay of the first signal, not an error about the operator's own."""
    import re

    from django.contrib.messages import get_messages

    saga = parked_saga()
    form_url = reverse("admin:sagas_saga_signal", args=[saga.pk])
    html = ops_client.get(form_url).content.decode()
    [form_key] = re.findall(r'<input type="hidden" name="form_key" value="([0-9a-f]{32})">', html)
    form = {"name": "go", "payload": '{"ok": true}', "key": "", "form_key": form_key}
    first = ops_client.post(form_url, form)
    second = ops_client.post(form_url, form, follow=True)
    assert first.status_code == 302
    said = [(m.level_tag, str(m)) for m in get_messages(second.wsgi_request)]
    assert ("info", "Signal go was already sent from this form; nothing more was done.") in said
    assert SagaSignal.objects.filter(saga=saga).count() == 1
    assert saga.events.filter(kind="ops_signal").count() == 1
    # The same form changed and sent again does not pass for the first signal.
    changed = ops_client.post(form_url, {**form, "payload": '{"ok": false}'})
    assert changed.status_code == 200
    assert "This form already sent go with another payload" in changed.content.decode()
    assert SagaSignal.objects.get(saga=saga).payload == {"ok": True}
    # A form opened again has a key of its own: sending it is a new signal, decided on merit.
    assert form_key not in ops_client.get(form_url).content.decode()
