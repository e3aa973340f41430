"""A run of steps recorded once that a lost task cut short, driven in-process.

``test_plain``'s five steps stay in the database and share records: a task that runs them back
to back commits each step's write as it goes and records them all at the end. A task lost
before that record (its worker killed) leaves writes that no row names. These tests play that
task by hand (claim, then call the steps' functions with no record) and check what the engine,
the dry run and an operator's retry make of it afterwards. One delivery runs one step
(``SAGA_INLINE_BUDGET`` 0), so nothing is batched here but the lost task itself.
"""

from __future__ import annotations

import copy
from datetime import timedelta

import pytest
from django.contrib.auth.models import Group, User
from django.utils import timezone

from sagas.definition import get_definition, step_context
from sagas.models import Saga, SagaState
from sagas.services import (
    saga_compensation_plan,
    saga_request_cancel,
    saga_retry_now,
    saga_start,
)
from sagas.store import claim
from tests.sagas.inprocess import deliver, one_step_per_delivery, settle
from tests.sagas.sagatypes import FIVE, effects

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _setup(settings):
    settings.SAGA_MAX_ATTEMPTS = 2
    one_step_per_delivery(settings, {})


def _lost_run(
    script: dict | None = None, *, through: str, saga_type: str = "test_plain", version: int = 1
) -> Saga:
    """Start a saga; a task claims its first step, runs the steps up to ``through`` without a
    record (each write committing as it is made), and dies; its lease runs out."""
    saga = saga_start(saga_type=saga_type, data={"script": script or {}}, version=version)
    claimed = claim(saga.id, saga.version)
    assert claimed is not None and claimed.attempt == 1
    definition = get_definition(saga_type, version)
    running = copy.copy(claimed)
    for name in definition.names[: definition.index_of(through) + 1]:
        running.current_step = name
        result = definition.step(name).action(step_context(definition, running, compensating=False))
        running.results = {**running.results, name: result}
    past = timezone.now() - timedelta(seconds=3600)
    Saga.objects.filter(pk=saga.id).update(lease_until=past, next_attempt_at=past)
    return Saga.objects.get(pk=saga.id)


def _done(saga: Saga, kind: str) -> set[str]:
    return {step for step, k in effects(saga.id) if k == kind}


def test_a_cancel_after_a_lost_run_undoes_every_step_it_may_have_reached():
    """s1..s3 committed, unrecorded. The claim that takes the saga up again marks s2..s5, and
    the cancel's undo starts at s5: the three writes are undone, s4 and s5 leave tombstones."""
    saga = _lost_run(through="s3")
    saga_request_cancel(saga_id=saga.id, reason="customer_cancelled")
    saga = settle(deliver(saga.id))
    assert (saga.state, saga.failure_code) == (SagaState.COMPENSATED, "customer_cancelled")
    assert _done(saga, "do") == set(FIVE[:3])
    assert _done(saga, "undo") == set(FIVE)
    undone = saga.events.filter(kind="compensation_succeeded").order_by("id")
    assert [e.step for e in undone] == FIVE[::-1]


def test_attempts_running_out_after_a_lost_run_undo_the_rest_of_the_run():
    """The lost run reached s4; s1, called again, fails for now until its attempts run out:
    the undo covers s4 down to s1 (and s5, which the run may have reached too)."""
    saga = _lost_run({"s1": ["ok", "transient"]}, through="s4")
    saga = settle(deliver(saga.id))
    assert (saga.state, saga.failed_step) == (SagaState.COMPENSATED, "s1")
    assert _done(saga, "do") == set(FIVE[:4])
    assert _done(saga, "undo") == set(FIVE)


def test_a_lost_run_taken_up_again_goes_forward_with_every_effect_once():
    """With nothing stopping it, the saga runs s1..s5 again under the same keys: each write
    exists once (s1..s3 asked twice), nothing is undone, and the saga succeeds."""
    saga = settle(deliver(_lost_run(through="s3").id))
    assert saga.state == SagaState.SUCCEEDED
    assert effects(saga.id) == {("s1", "do"): 2, ("s2", "do"): 2, ("s3", "do"): 2} | {
        ("s4", "do"): 1,
        ("s5", "do"): 1,
    }


def test_a_failure_of_a_step_the_lost_run_passed_undoes_what_comes_after_it():
    """Taken up again, s1 and s2 run again; s3 then says no. The undo starts at s5, the last
    step the lost run may have reached, not at s2."""
    saga = _lost_run(through="s4")
    # Asked again, s3's participant says no (its answer under that key had expired, say).
    Saga.objects.filter(pk=saga.id).update(data={"script": {"s3": ["business:declined"]}})
    saga = settle(deliver(saga.id))
    assert (saga.state, saga.failed_step) == (SagaState.COMPENSATED, "s3")
    assert _done(saga, "undo") == set(FIVE)


def test_the_plan_of_a_saga_whose_run_was_lost_names_every_step_it_may_have_reached(settings):
    """Before any worker takes it up again, the dry run already says a cancel would undo s5
    down to s1: the task claimed at s1 may have gone on through the run and lost its record."""
    saga = _lost_run(through="s1")
    plan = saga_compensation_plan(saga_id=saga.id)
    assert [entry["step"] for entry in plan] == FIVE[::-1]
    assert all("may have run with s1" in entry["why"] for entry in plan[:4])
    # Once the engine has taken it up again and marked the rows, the plan says the same.
    settings.SAGA_MAX_ATTEMPTS = 5
    Saga.objects.filter(pk=saga.id).update(data={"script": {"s1": ["transient"]}})
    saga = deliver(saga.id)
    assert saga.state == SagaState.RUNNING and saga.attempt == 2
    assert [entry["step"] for entry in saga_compensation_plan(saga_id=saga.id)] == FIVE[::-1]


def test_an_operator_retry_after_a_lost_run_keeps_what_it_may_have_reached():
    """An operator's retry starts s1's attempts over, so no later claim could tell a run was
    lost: the retry marks the steps it may have reached instead, and a cancel then undoes
    them all."""
    saga = _lost_run(through="s2")
    ops = User.objects.create_user("ops-runs", is_staff=True)
    ops.groups.add(Group.objects.get(name="ops"))
    saga_retry_now(saga_id=saga.id, user=User.objects.get(pk=ops.pk))
    saga = Saga.objects.get(pk=saga.id)
    assert saga.attempt == 0
    assert set(saga.steps.filter(maybe_effect=True).values_list("name", flat=True)) == set(FIVE)
    saga_request_cancel(saga_id=saga.id, reason="customer_cancelled")
    saga = settle(deliver(saga.id))
    assert saga.state == SagaState.COMPENSATED
    assert _done(saga, "undo") == set(FIVE)


def test_a_step_recorded_before_it_was_lost_marks_nothing_after_it():
    """s1's first run was recorded (a transient failure), so it was no run of several steps:
    its retry, lost, marks nothing after s1, and a cancel undoes s1 alone."""
    saga = saga_start(saga_type="test_plain", data={"script": {"s1": ["transient", "ok"]}})
    saga = deliver(saga.id)  # run 1: recorded as a transient failure
    assert saga.steps.get(name="s1").attempts == 1
    claimed = claim(saga.id, saga.version)  # run 2: its worker dies
    assert claimed is not None and claimed.attempt == 2
    past = timezone.now() - timedelta(seconds=3600)
    Saga.objects.filter(pk=saga.id).update(lease_until=past, next_attempt_at=past)
    saga_request_cancel(saga_id=saga.id, reason="customer_cancelled")
    saga = settle(deliver(saga.id))
    assert saga.state == SagaState.COMPENSATED
    assert _done(saga, "undo") == {"s1"}
    assert not saga.steps.filter(maybe_effect=True).exclude(name="s1").exists()


def test_a_saga_moved_to_another_version_after_a_lost_run_still_undoes_it():
    """v1 records a, b and c once; v2 puts x, which shares no records, after a. A run lost on
    v1 reached c; the saga moves to v2 before any worker took it up again. By v2 a starts no
    run, so the claim there would mark nothing: the move counts b and c as steps that may
    have taken effect and carries their marks, and the cancel undoes c, b and a (x never
    ran and is not undone)."""
    from sagas.versions import apply_migration

    saga = _lost_run(through="c", saga_type="plainmig", version=1)
    plan = apply_migration("plainmig", 1, 2, actor="test")
    assert plan.moved == 1
    # The dry run says so too, though by v2 a starts no run: b and c are marked.
    assert [e["step"] for e in saga_compensation_plan(saga_id=saga.id)] == ["c", "b", "a"]
    saga_request_cancel(saga_id=saga.id, reason="customer_cancelled")
    saga = settle(deliver(saga.id))
    assert (saga.state, saga.definition_version) == (SagaState.COMPENSATED, 2)
    assert _done(saga, "do") == {"a", "b", "c"}
    assert _done(saga, "undo") == {"a", "b", "c"}
