"""A cancel accepted while a step is in flight is honoured, whatever that step's record does.

With a step in flight the cancel only sets ``cancel_reason`` (the version stays, so the
step's record lands) and counts on the next step boundary. A record that goes on reaches
one; a record that parks the saga at a wait, schedules a retry or finishes the saga does
not, so it is fenced on the request its claim saw and the task honours the cancel at once.
Driven in-process, one step per delivery, with the cancel committed on another connection
at the moment that matters.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from sagas import waits
from sagas.models import Saga, SagaEvent, SagaState
from sagas.services import saga_request_cancel, saga_start
from tests.sagas.inprocess import (
    deliver,
    one_step_per_delivery,
    only_this_process,
    out_of_workers_reach,
)
from tests.sagas.sagatypes import _cancel_meanwhile, effects

pytestmark = pytest.mark.django_db(transaction=True)

TERMINAL = {SagaState.SUCCEEDED, SagaState.COMPENSATED, SagaState.NEEDS_MANUAL}


@pytest.fixture(autouse=True)
def _in_process(settings):
    one_step_per_delivery(settings, {})
    with only_this_process():
        yield


def _start(saga_type: str, script: dict | None = None) -> Saga:
    with transaction.atomic():
        saga = saga_start(saga_type=saga_type, data={"script": script or {}})
        out_of_workers_reach(saga.id)
    return Saga.objects.get(pk=saga.id)


def _to_the_end(saga_id) -> Saga:
    for _ in range(30):
        saga = deliver(saga_id)
        if saga.state in TERMINAL:
            return saga
    raise AssertionError(f"saga {saga_id} did not finish: {saga.state} at {saga.current_step}")


def _kinds(saga_id) -> list[str]:
    return list(
        SagaEvent.objects.filter(saga_id=saga_id).order_by("id").values_list("kind", flat=True)
    )


def test_a_cancel_while_the_saga_decides_to_wait_is_honoured_not_parked_past(monkeypatch):
    saga = _start("test_wait")
    saga = deliver(saga.id)  # s1
    assert saga.current_step == "await_go"
    decide = waits.decide

    def cancelled_while_deciding(*args, **kwargs):
        decision = decide(*args, **kwargs)
        _cancel_meanwhile(saga.id)  # the client's cancel commits before the park's record
        return decision

    monkeypatch.setattr(waits, "decide", cancelled_while_deciding)
    saga = deliver(saga.id)
    monkeypatch.setattr(waits, "decide", decide)
    # Not parked for the wait's 120 s with the cancel unheard: undoing already.
    assert saga.state == SagaState.COMPENSATING, (saga.state, saga.waiting_for)
    assert saga.waiting_for == "" and saga.waiting_since is None
    saga = _to_the_end(saga.id)
    assert saga.state == SagaState.COMPENSATED and saga.failure_code == "customer_cancelled"
    assert effects(saga.id) == {("s1", "do"): 1, ("s1", "undo"): 1}
    kinds = _kinds(saga.id)
    assert "waiting" not in kinds
    assert kinds.index("cancel_requested") < kinds.index("cancel_honoured")


def test_a_cancel_while_a_step_fails_for_now_is_honoured_without_waiting_for_the_retry():
    saga = _start("test5", {"s2": ["cancel_transient", "ok"]})
    deliver(saga.id)  # s1
    saga = deliver(saga.id)  # s2: the cancel commits, then the call fails
    assert saga.state == SagaState.COMPENSATING, (saga.state, saga.next_attempt_at)
    assert "step_retry" not in _kinds(saga.id)
    saga = _to_the_end(saga.id)
    assert saga.state == SagaState.COMPENSATED and saga.failure_code == "customer_cancelled"
    # s2's call may have taken effect before it failed: it is undone too, under its key.
    assert effects(saga.id) == {("s1", "do"): 1, ("s1", "undo"): 1, ("s2", "undo"): 1}


def test_a_cancel_accepted_during_the_last_step_of_a_type_without_a_pivot_is_honoured():
    """``test5`` has no pivot, so a cancel is accepted at any step, the last one included:
    the 202 said the saga would be undone, and it is, instead of succeeding past it."""
    saga = _start("test5", {"s5": ["cancel"]})
    for _ in range(4):
        deliver(saga.id)  # s1..s4
    saga = deliver(saga.id)  # s5: the cancel commits, then the call succeeds
    assert saga.state == SagaState.COMPENSATING, saga.state
    saga = _to_the_end(saga.id)
    assert saga.state == SagaState.COMPENSATED and saga.failure_code == "customer_cancelled"
    assert effects(saga.id) == {
        (name, kind): 1 for name in ("s1", "s2", "s3", "s4", "s5") for kind in ("do", "undo")
    }
    assert "succeeded" not in _kinds(saga.id)


def test_asking_again_makes_a_waiting_saga_whose_cancel_went_unheard_due_now():
    """A saga parked past a cancel request by code before the fence (a wait of a day ahead):
    a second cancel, or an operator's compensate, makes it due now and rings, instead of
    answering 202 and doing nothing."""
    saga = _start("test_wait")
    saga = deliver(saga.id)  # s1
    saga = deliver(saga.id)  # parks at await_go
    assert saga.waiting_for == "go"
    later = timezone.now() + timedelta(days=1)
    Saga.objects.filter(pk=saga.id).update(
        cancel_reason="customer_cancelled", next_attempt_at=later
    )
    again = saga_request_cancel(saga_id=saga.id, reason="customer_cancelled", actor="test")
    row = Saga.objects.get(pk=saga.id)
    assert row.next_attempt_at <= timezone.now() and row.version == again.version > saga.version
    saga = _to_the_end(saga.id)
    assert saga.state == SagaState.COMPENSATED and saga.failure_code == "customer_cancelled"


def test_a_definite_no_that_ends_the_saga_keeps_its_reason_over_a_cancel_meanwhile():
    """The first step says no (nothing to undo) after a cancel came in: the saga ends
    compensated either way, and its record, which says why, lands instead of the cancel's."""
    saga = _start("test5", {"s1": ["cancel_then_no"]})
    saga = deliver(saga.id)
    assert saga.state == SagaState.COMPENSATED and saga.failure_code == "out_of_stock"
    assert saga.failed_step == "s1" and "step_failed" in _kinds(saga.id)
    assert effects(saga.id) == {}


def test_a_transactional_step_whose_record_a_cancel_fenced_off_is_not_undone():
    """Its write went with the record it never got (rolled back): the cancel undoes the four
    steps before it, and no undo runs for a write that never committed."""
    saga = _start("test_tx", {"s5": ["cancel"]})
    for _ in range(4):
        deliver(saga.id)  # s1..s4
    saga = _to_the_end(saga.id)
    assert saga.state == SagaState.COMPENSATED and saga.failure_code == "customer_cancelled"
    assert effects(saga.id) == {
        (name, kind): 1 for name in ("s1", "s2", "s3", "s4") for kind in ("do", "undo")
    }
