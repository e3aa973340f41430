"""Which runs of a step may have taken effect, driven in-process: what decides whether a saga
compensating from a step undoes that step too.

A failure that may have come after the effect (a timeout, a worker that died before its record)
marks the step for undoing; a participant's error that says nothing happened
(``NothingHappened``: the provider could not be reached) does not, unless another run of the
step may have taken effect. Scripts: ``"refused"`` raises such an error, ``"transient"`` a plain
``ConnectionError`` the engine cannot judge, ``"lost"`` takes effect and times out.
"""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group, User

from sagas.models import Saga, SagaState, SagaStep
from sagas.services import (
    saga_compensation_plan,
    saga_request_cancel,
    saga_retry_now,
    saga_start,
)
from tests.sagas.inprocess import deliver, lost_claim, one_step_per_delivery, settle
from tests.sagas.sagatypes import effects

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _setup(settings):
    settings.SAGA_MAX_ATTEMPTS = 2
    one_step_per_delivery(settings, {})


def _at_s2(script: list[str]) -> Saga:
    saga = saga_start(saga_type="test5", data={"script": {"s2": script}})
    return deliver(saga.id)  # s1 took effect


def _undone(saga: Saga) -> set[str]:
    return {step for step, kind in effects(saga.id) if kind == "undo"}


def _ops_retry(saga: Saga, name: str) -> Saga:
    """An operator's "retry now" (``name``: the operator), and the saga as it left it."""
    ops = User.objects.create_user(name, is_staff=True)
    ops.groups.add(Group.objects.get(name="ops"))
    saga_retry_now(saga_id=saga.id, user=User.objects.get(pk=ops.pk))
    return Saga.objects.get(pk=saga.id)


@pytest.mark.parametrize(
    ("script", "undone"),
    [
        (["refused"], {"s1"}),  # nothing happened, twice: only s1 to undo
        (["transient"], {"s2", "s1"}),  # cannot tell: undone to be safe
        (["lost", "refused"], {"s2", "s1"}),  # the first run took effect
    ],
)
def test_a_step_whose_attempts_ran_out_is_undone_only_if_a_run_may_have_taken_effect(
    script, undone
):
    saga = settle(deliver(_at_s2(script).id))
    assert (saga.state, saga.failure_code) == (SagaState.COMPENSATED, "step_failed")
    assert _undone(saga) == undone
    assert SagaStep.objects.get(saga=saga, name="s2").maybe_effect == ("s2" in undone)


def test_a_run_with_no_record_counts_though_the_next_says_nothing_happened():
    saga = lost_claim(_at_s2(["refused"]).id)  # run 1: no record
    saga = settle(deliver(saga.id))  # run 2 (the last): refused
    assert saga.state == SagaState.COMPENSATED
    assert _undone(saga) == {"s2", "s1"}


def test_a_cancel_while_a_step_is_refused_does_not_undo_it():
    saga = deliver(_at_s2(["refused"] * 5).id)  # run 1 refused: a retry is due
    assert (saga.current_step, saga.state) == ("s2", SagaState.RUNNING)
    assert [p["step"] for p in saga_compensation_plan(saga_id=saga.id)] == ["s1"]
    saga_request_cancel(saga_id=saga.id, reason="customer_cancelled", actor="test")
    saga = settle(deliver(saga.id))
    assert (saga.state, saga.failure_code) == (SagaState.COMPENSATED, "customer_cancelled")
    assert _undone(saga) == {"s1"}


def test_a_cancel_after_a_step_timed_out_undoes_it():
    saga = deliver(_at_s2(["lost", "ok"]).id)
    assert [p["step"] for p in saga_compensation_plan(saga_id=saga.id)] == ["s2", "s1"]
    saga_request_cancel(saga_id=saga.id, reason="customer_cancelled", actor="test")
    saga = settle(deliver(saga.id))
    assert _undone(saga) == {"s2", "s1"}


def test_an_operators_retry_keeps_a_run_with_no_record_as_one_that_may_have_taken_effect():
    """The retry starts the count over; the run its worker lost must not be forgotten with it."""
    saga = deliver(_at_s2(["refused"] * 5).id)  # run 1 refused, recorded
    saga = _ops_retry(lost_claim(saga.id), "ops-evidence")  # run 2: no record
    assert SagaStep.objects.get(saga=saga, name="s2").maybe_effect
    assert [p["step"] for p in saga_compensation_plan(saga_id=saga.id)] == ["s2", "s1"]
    saga_request_cancel(saga_id=saga.id, reason="customer_cancelled", actor="test")
    saga = settle(deliver(saga.id))
    assert _undone(saga) == {"s2", "s1"}


def test_a_run_with_no_record_after_an_operators_retry_counts():
    """The retry starts both counts over: a later run that leaves no record is still seen."""
    saga = _ops_retry(deliver(_at_s2(["refused"] * 5).id), "ops-evidence-2")  # run 1 refused
    assert not SagaStep.objects.get(saga=saga, name="s2").maybe_effect
    saga = lost_claim(saga.id)  # run 1 after the retry: no record
    saga_request_cancel(saga_id=saga.id, reason="customer_cancelled", actor="test")
    saga = settle(deliver(saga.id))
    assert _undone(saga) == {"s2", "s1"}


@pytest.mark.parametrize("then", ["cancel", "refused until the attempts run out"])
def test_a_lost_run_before_an_operators_retry_counts_though_nothing_ever_failed(then):
    """The saga never recorded a failure (no ``last_error``): only the step's row, where the
    retry wrote it, remembers the run its worker lost."""
    script = ["refused"] if then.startswith("refused") else ["ok"]
    saga = lost_claim(_at_s2(script).id)
    assert not saga.last_error
    saga = _ops_retry(saga, "ops-evidence-3")
    if then == "cancel":
        saga_request_cancel(saga_id=saga.id, reason="customer_cancelled", actor="test")
    saga = settle(deliver(saga.id))
    assert saga.state == SagaState.COMPENSATED
    assert _undone(saga) == {"s2", "s1"}
