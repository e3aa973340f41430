"""The ops actions: retry now, compensate (plan first, reason required), resolve (note
required), one saga or many, gated by the ops permission, refused with a message where they
make no sense, and recorded in the timeline with the user."""

from __future__ import annotations

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse

from orders.saga import order_saga
from sagas.admin import MAX_BULK
from sagas.models import Saga, SagaEvent, SagaState
from sagas.services import NOTE_MAX
from tests.admin.conftest import make_saga, needs_manual, running, stuck

pytestmark = pytest.mark.django_db

LIST = "/admin/sagas/saga/"


def act(client, action: str, sagas, *, follow: bool = True, **extra):
    """Post an admin action for ``sagas`` the way the list's action bar (or a button) does."""
    data = {"action": action, "_selected_action": [str(s.pk) for s in sagas], "index": "0"}
    data.update(extra)
    return client.post(LIST, data, follow=follow)


def confirm(client, action: str, sagas, **fields):
    """Post the confirmation form of an action with an intermediate page."""
    data = {
        "action": action,
        "_selected_action": [str(s.pk) for s in sagas],
        "select_across": "0",
        "confirm": "yes",
        **fields,
    }
    return client.post(LIST, data, follow=True)


def texts(response) -> list[tuple[str, str]]:
    return [(m.level_tag, str(m)) for m in get_messages(response.wsgi_request)]


def events(saga: Saga, kind: str) -> list[SagaEvent]:
    return list(SagaEvent.objects.filter(saga=saga, kind=kind))


# ---------------------------------------------------------------------------------------------
# Retry now
# ---------------------------------------------------------------------------------------------
def test_retry_now_resumes_a_saga_that_needs_a_person_and_records_the_user(ops_client):
    """Retry now on a saga stopped mid-compensation resumes compensating, with a timeline
    event naming the operator."""
    saga = needs_manual()
    response = act(ops_client, "retry_now", [saga])
    assert ("success", f"Retry requested for 1 saga: {str(saga.pk)[:8]}") in texts(response)
    saga.refresh_from_db()
    assert saga.state == SagaState.COMPENSATING
    (event,) = events(saga, "ops_retry")
    assert event.actor == "user:ops-olga"


def test_retry_now_is_refused_with_a_message_for_a_finished_saga(ops_client):
    """A succeeded saga has nothing to retry: an error message, and nothing changes."""
    saga = make_saga()
    response = act(ops_client, "retry_now", [saga])
    assert texts(response) == [
        (
            "error",
            f"Refused for 1 saga ({str(saga.pk)[:8]}): "
            "The saga has succeeded; there is nothing to retry.",
        )
    ]
    assert Saga.objects.get(pk=saga.pk).version == saga.version
    assert events(saga, "ops_retry") == []


def test_retry_button_on_the_saga_page_returns_to_the_page(ops_client):
    """The saga page's button runs the same action and comes back to the saga page."""
    saga = stuck()
    url = reverse("admin:sagas_saga_change", args=[saga.pk])
    html = ops_client.get(url).content.decode()
    assert 'value="Retry now"' in html and 'value="Compensate..."' in html
    assert 'value="Resolve with a note..."' not in html  # only for needs_manual
    response = act(ops_client, "retry_now", [saga], follow=False, next=url)
    assert response.status_code == 302 and response["Location"] == url
    saga.refresh_from_db()
    assert saga.attempt == 0 and events(saga, "ops_retry")


# ---------------------------------------------------------------------------------------------
# Compensate
# ---------------------------------------------------------------------------------------------
def test_compensate_shows_the_plan_then_needs_a_reason_then_compensates(ops_client):
    """First the plan (undos newest first, with keys) and a reason field; a blank reason is
    asked again; with a reason the saga is told to compensate and the timeline says who/why."""
    saga = stuck(saga_type="order", step_index=order_saga.index_of("arrange_shipment"))
    page = act(ops_client, "compensate", [saga])
    assert page.status_code == 200
    html = page.content.decode()
    plan = html[html.index('id="plan"') :]
    order = [
        plan.index(name) for name in ("cancel_shipment", "void_authorization", "release_inventory")
    ]
    assert order == sorted(order)
    assert f"saga:{saga.pk}:arrange_shipment:undo" in plan
    assert Saga.objects.get(pk=saga.pk).cancel_reason == ""  # nothing happened yet

    again = confirm(ops_client, "compensate", [saga], reason="   ")
    assert "Say why you compensate" in again.content.decode()
    assert Saga.objects.get(pk=saga.pk).cancel_reason == ""
    long = confirm(ops_client, "compensate", [saga], reason="x" * 2000 + " END")
    assert "at most 2000 characters" in long.content.decode()  # not cut short unseen
    assert "x" * 2000 + " END" in long.content.decode()  # kept in the field to shorten
    assert Saga.objects.get(pk=saga.pk).cancel_reason == ""
    assert not events(saga, "ops_compensate")

    done = confirm(ops_client, "compensate", [saga], reason="carrier outage, customer informed")
    assert ("success", f"Compensation requested for 1 saga: {str(saga.pk)[:8]}") in texts(done)
    saga.refresh_from_db()
    assert saga.cancel_reason == "step_failed"
    (event,) = events(saga, "ops_compensate")
    assert event.actor == "user:ops-olga" and event.detail == "carrier outage, customer informed"


def test_compensate_takes_a_reason_as_long_as_the_api_does_and_refuses_one_more(ops_client):
    """The console and the API hold one limit (NOTE_MAX): a reason of exactly that many
    characters is recorded whole, one character more is refused on the page."""
    saga = stuck(saga_type="order", step_index=order_saga.index_of("arrange_shipment"))
    longest = "r" * (NOTE_MAX - 4) + " END"
    refused = confirm(ops_client, "compensate", [saga], reason=longest + "!")
    assert f"at most {NOTE_MAX} characters" in refused.content.decode()
    assert not events(saga, "ops_compensate")

    done = confirm(ops_client, "compensate", [saga], reason=longest)
    assert ("success", f"Compensation requested for 1 saga: {str(saga.pk)[:8]}") in texts(done)
    (event,) = events(saga, "ops_compensate")
    assert event.detail == longest


def test_compensate_is_refused_with_a_message_where_it_makes_no_sense(ops_client):
    """A finished saga, or one already compensating and waiting for a person, is refused at
    once with the reason; confirming anyway is refused too and leaves no timeline event."""
    done = make_saga()
    response = act(ops_client, "compensate", [done])
    assert texts(response) == [
        (
            "error",
            f"Refused for 1 saga ({str(done.pk)[:8]}): "
            "The saga has succeeded; only a running saga can be compensated.",
        )
    ]
    manual = needs_manual()
    forced = confirm(ops_client, "compensate", [manual], reason="try anyway")
    (level, text), *_ = texts(forced)
    assert level == "error" and "already compensating" in text
    assert events(manual, "ops_compensate") == []
    assert Saga.objects.get(pk=manual.pk).state == SagaState.NEEDS_MANUAL


def test_compensate_confirmation_marks_what_will_be_refused_in_a_mixed_selection(ops_client):
    """Selecting a running and a finished saga: the page plans one and marks the other."""
    live = running()
    done = make_saga()
    html = act(ops_client, "compensate", [live, done]).content.decode()
    assert "1 saga will be compensated, 1 will be refused" in html
    assert "refused: The saga has succeeded" in html
    response = confirm(ops_client, "compensate", [live, done], reason="bulk test")
    messages = texts(response)
    assert ("success", f"Compensation requested for 1 saga: {str(live.pk)[:8]}") in messages
    assert any(level == "error" and str(done.pk)[:8] in text for level, text in messages)


# ---------------------------------------------------------------------------------------------
# Resolve
# ---------------------------------------------------------------------------------------------
def test_resolve_needs_a_note_and_records_it(ops_client):
    """Resolve asks for a note, refuses a blank one, and closes the saga with the note."""
    saga = needs_manual()
    page = act(ops_client, "resolve", [saga])
    assert 'name="note"' in page.content.decode()
    blank = confirm(ops_client, "resolve", [saga], note="")
    assert "A note is required" in blank.content.decode()
    long = confirm(ops_client, "resolve", [saga], note="x" * 2001, accept_effects="yes")
    assert "at most 2000 characters" in long.content.decode()  # as the API: not cut short
    assert Saga.objects.get(pk=saga.pk).state == SagaState.NEEDS_MANUAL
    done = confirm(
        ops_client, "resolve", [saga], note="voided by hand in the provider", accept_effects="yes"
    )
    assert ("success", f"Resolved for 1 saga: {str(saga.pk)[:8]}") in texts(done)
    saga.refresh_from_db()
    assert saga.state == SagaState.RESOLVED
    (event,) = events(saga, "ops_resolve")
    assert event.actor == "user:ops-olga"
    assert event.detail.startswith("voided by hand in the provider (effects kept: s1")


def test_resolve_shows_the_effects_in_place_and_needs_them_accepted(ops_client):
    """The confirmation names the undo not run; confirming without ticking the box is refused
    naming it, and the saga stays as it was."""
    saga = needs_manual()
    page = act(ops_client, "resolve", [saga]).content.decode()
    assert 'id="effects-in-place"' in page and "s1 (_run has not run)" in page
    assert 'name="accept_effects"' in page
    refused = confirm(ops_client, "resolve", [saga], note="done")
    [(level, text)] = texts(refused)
    assert level == "error" and "Still in place: s1" in text
    assert Saga.objects.get(pk=saga.pk).state == SagaState.NEEDS_MANUAL
    assert events(saga, "ops_resolve") == []


# ---------------------------------------------------------------------------------------------
# Undo done by hand
# ---------------------------------------------------------------------------------------------
def test_undo_done_shows_what_runs_next_needs_a_note_and_goes_on(ops_client):
    """From the saga page: the button, then a page naming the undo done by hand and the undos
    the engine runs next; a blank note is refused; confirming records it and resumes the
    ladder at the next step that took effect."""
    saga = needs_manual(step_index=2, failed_step="s3")
    html = ops_client.get(reverse("admin:sagas_saga_change", args=[saga.pk])).content.decode()
    assert 'value="undo_done"' in html and "Undo of s3 done by hand" in html
    page = act(ops_client, "undo_done", [saga]).content.decode()
    assert "undo of <strong>s3</strong>" in page
    assert page.index("<em>s2</em>") < page.index("<em>s1</em>")  # newest first
    blank = confirm(ops_client, "undo_done", [saga], note="")
    assert "A note is required" in blank.content.decode()
    long = confirm(ops_client, "undo_done", [saga], note="x" * 2001)
    assert "at most 2000 characters" in long.content.decode()  # as the API: not cut short
    assert Saga.objects.get(pk=saga.pk).state == SagaState.NEEDS_MANUAL
    assert f'name="fences" value="{saga.pk}:{saga.version}:s3"' in page  # the undo it confirms
    done = confirm(
        ops_client,
        "undo_done",
        [saga],
        note="cancelled by phone with the carrier",
        fences=f"{saga.pk}:{saga.version}:s3",
    )
    assert [lvl for lvl, _ in texts(done)] == ["success"]
    saga.refresh_from_db()
    assert (saga.state, saga.current_step) == (SagaState.COMPENSATING, "s2")
    (event,) = events(saga, "ops_undo_done")
    assert (event.step, event.actor) == ("s3", "user:ops-olga")


def test_undo_done_is_refused_for_a_saga_waiting_on_no_undo(ops_client):
    saga = running()
    [(level, text)] = texts(act(ops_client, "undo_done", [saga]))
    assert level == "error" and "waits on no undo" in text


def test_resolve_is_refused_for_a_saga_that_does_not_need_a_person(ops_client):
    """Only needs_manual sagas can be resolved; others get an error message."""
    saga = running()
    response = act(ops_client, "resolve", [saga])
    (level, text), *_ = texts(response)
    assert level == "error" and "Only a saga in needs_manual can be resolved" in text
    forced = confirm(ops_client, "resolve", [saga], note="x")
    assert any("Only a saga in needs_manual can be resolved" in t for _, t in texts(forced))
    assert Saga.objects.get(pk=saga.pk).state == SagaState.RUNNING


# ---------------------------------------------------------------------------------------------
# Permission
# ---------------------------------------------------------------------------------------------
def test_staff_without_the_ops_permission_can_look_but_not_operate(viewer_client):
    """No actions in the menu, no buttons on the page, and a forged action post does nothing."""
    saga = needs_manual()
    listing = viewer_client.get(LIST)
    assert listing.status_code == 200
    assert listing.context["action_form"] is None  # no action is offered at all
    page = viewer_client.get(reverse("admin:sagas_saga_change", args=[saga.pk]))
    assert page.status_code == 200
    html = page.content.decode()
    assert 'value="Retry now"' not in html and 'need the "ops" group' in html
    for action in ("retry_now", "compensate", "resolve"):
        act(viewer_client, action, [saga])
        confirm(viewer_client, action, [saga], reason="x", note="x")
    saga.refresh_from_db()
    assert saga.state == SagaState.NEEDS_MANUAL
    assert not SagaEvent.objects.filter(saga=saga, kind__startswith="ops_").exists()


def test_ops_actions_are_offered_to_the_ops_group(ops_client):
    """Members of the ops group get the three actions in the list's menu."""
    needs_manual()
    listing = ops_client.get(LIST)
    choices = [value for value, _ in listing.context["action_form"].fields["action"].choices]
    assert {"retry_now", "compensate", "resolve"} <= set(choices)
    assert "delete_selected" not in choices


# ---------------------------------------------------------------------------------------------
# Bulk: by failure signature, and the size limit
# ---------------------------------------------------------------------------------------------
def test_bulk_by_failure_signature_acts_on_every_saga_with_that_signature(ops_client):
    """From a failed saga's signature link: select all sagas failed at the same step with the
    same code and resolve them together; others are untouched."""
    same = [needs_manual() for _ in range(3)]
    other = needs_manual(failure_code="different")
    link = f"{LIST}?signature=s1:no&state__exact=needs_manual"
    page_html = ops_client.get(reverse("admin:sagas_saga_change", args=[same[0].pk])).content
    assert link.replace("&", "&amp;").encode() in page_html
    # "Select all" on the filtered list: select_across with the filter in the URL.
    data = {
        "action": "resolve",
        "_selected_action": [str(same[0].pk)],
        "select_across": "1",
        "index": "0",
    }
    page = ops_client.post(link, data)
    assert page.status_code == 200
    listed = page.context["ids"]
    assert set(listed) == {s.pk for s in same}
    done = confirm(
        ops_client, "resolve", same, note="provider fixed, voided by hand", accept_effects="yes"
    )
    assert [lvl for lvl, txt in texts(done) if txt.startswith("Resolved for 3 sagas")] == [
        "success"
    ]
    assert Saga.objects.filter(pk__in=[s.pk for s in same], state="resolved").count() == 3
    assert Saga.objects.get(pk=other.pk).state == SagaState.NEEDS_MANUAL


def test_a_selection_beyond_the_bulk_limit_is_refused(ops_client):
    """Acting on more than MAX_BULK sagas at once is refused with a message to narrow down."""
    sagas = [needs_manual(events=0) for _ in range(MAX_BULK + 1)]
    data = {
        "action": "retry_now",
        "_selected_action": [str(sagas[0].pk)],
        "select_across": "1",
        "index": "0",
    }
    response = ops_client.post(f"{LIST}?state__exact=needs_manual", data, follow=True)
    (level, text), *_ = texts(response)
    assert level == "error" and f"more than {MAX_BULK} sagas" in text
    assert Saga.objects.filter(state=SagaState.NEEDS_MANUAL).count() == MAX_BULK + 1


def test_a_saga_waiting_for_a_signal_has_no_retry_button_and_the_action_is_refused(ops_client):
    """The wait ends with its signal: the page offers no "Retry now", and the list action says
    why and leaves the saga and its timeline alone."""
    from django.utils import timezone

    saga = running(saga_type="order", step_index=order_saga.index_of("fraud_review"))
    Saga.objects.filter(pk=saga.pk).update(
        waiting_for="fraud_review", waiting_since=timezone.now(), next_attempt_at=None
    )
    url = reverse("admin:sagas_saga_change", args=[saga.pk])
    html = ops_client.get(url).content.decode()
    assert 'value="Retry now"' not in html and 'value="Compensate..."' in html
    response = act(ops_client, "retry_now", [saga])
    assert any("waits at fraud_review" in text for _, text in texts(response)), texts(response)
    assert not events(saga, "ops_retry")


def test_a_nul_in_an_actions_free_text_is_a_400_and_changes_nothing(ops_client):
    """Text fields the console reads from the form (a reason, a note, a payload) cannot hold
    a NUL in the database: the request is refused before any action runs."""
    saga = stuck(saga_type="order", step_index=order_saga.index_of("arrange_shipment"))
    refused = confirm(ops_client, "compensate", [saga], reason="carrier\x00outage")
    assert refused.status_code == 400
    assert Saga.objects.get(pk=saga.pk).cancel_reason == ""
    assert not events(saga, "ops_compensate")


# ---------------------------------------------------------------------------------------------
# Posted ids: not a UUID, or no such saga
# ---------------------------------------------------------------------------------------------
def test_a_posted_id_that_is_not_a_saga_id_is_refused_with_a_message(ops_client):
    """Django's action handling filters by the posted ids: a value that is not a UUID raised a
    ValidationError there (a 500). It is named, and nothing is done, for the others either."""
    saga = needs_manual()
    data = {"action": "retry_now", "_selected_action": [str(saga.pk), "not-a-uuid"], "index": "0"}
    response = ops_client.post(LIST, data, follow=True)
    assert response.status_code == 200
    assert texts(response) == [("error", "Not a saga id: 'not-a-uuid'. Nothing was done.")]
    assert not events(saga, "ops_retry")


def test_a_saga_that_left_the_lists_filter_is_not_called_missing(ops_client):
    """The action bar posts to the filtered list (state=needs_manual); a saga a colleague
    retried meanwhile no longer matches it. It was named as no such saga ("deleted,
    mistyped"); it is named as no longer in the list, not acted on, and an id of no saga is
    still named as not found."""
    stays, left = needs_manual(), needs_manual()
    Saga.objects.filter(pk=left.pk).update(state=SagaState.COMPENSATING)
    nobody = "00000000-0000-0000-0000-000000000000"
    data = {
        "action": "retry_now",
        "_selected_action": [str(stays.pk), str(left.pk), nobody],
        "index": "0",
    }
    messages = texts(ops_client.post(f"{LIST}?state__exact=needs_manual", data, follow=True))
    assert ("success", f"Retry requested for 1 saga: {str(stays.pk)[:8]}") in messages
    assert (
        "error",
        f"No longer in this list ({str(left.pk)[:8]}): it changed since the list was shown "
        "and no longer matches its filters; nothing was done for it. Reload the list.",
    ) in messages, messages
    assert ("error", "No such saga (00000000): nothing was done for it.") in messages, messages
    assert not events(left, "ops_retry")


def test_ids_of_no_saga_are_named_and_the_others_go_on(ops_client):
    """A confirmation for a saga that does not exist (deleted, mistyped) said nothing at all."""
    nobody = "00000000-0000-0000-0000-000000000000"
    alone = confirm(ops_client, "resolve", [], _selected_action=[nobody], note="x")
    assert alone.status_code == 200
    assert texts(alone) == [("error", "No such saga (00000000): nothing was done for it.")]
    saga = needs_manual()
    data = {"action": "retry_now", "_selected_action": [nobody, str(saga.pk)], "index": "0"}
    both = texts(ops_client.post(LIST, data, follow=True))
    assert ("error", "No such saga (00000000): nothing was done for it.") in both
    assert ("success", f"Retry requested for 1 saga: {str(saga.pk)[:8]}") in both
