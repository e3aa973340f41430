"""Transactional steps: a participant in the engine's database commits with the step's record.

``test_tx`` has the five scripted steps of ``test5`` declared ``transactional=True``; every effect
is a row in ``test_saga_effects`` keyed by idempotency key with a call count, so a test sees
whether a write survived (count 1 or 2) or was rolled back with its record.

Consecutive transactional steps of one task share one transaction and one record (a batch):
the transaction ids (``xmin``) of the saga's timeline events tell how many commits recorded it.
"""

from __future__ import annotations

import pytest
from django.db import connection, transaction

from sagas.models import SETTLED_STATES, Saga, SagaEvent, SagaState
from sagas.services import saga_start
from tests.sagas.sagatypes import FIVE, effects, ensure_effects_table

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _effects_table(transactional_db):
    ensure_effects_table()


def start(script=None) -> Saga:
    with transaction.atomic():
        return saga_start(saga_type="test_tx", data={"script": script or {}})


def settled(saga_id, wait_for, *, sweeping=False, timeout=60) -> Saga:
    from sagas.sweeper import sweep

    def check():
        if sweeping:
            sweep()
        saga = Saga.objects.get(pk=saga_id)
        return saga if saga.state in SETTLED_STATES else None

    return wait_for(
        check,
        timeout=timeout,
        describe=lambda: (
            Saga.objects.filter(pk=saga_id)
            .values("state", "current_step", "attempt", "version", "last_error")
            .first()
        ),
    )


def test_transactional_steps_run_once_each(celery_worker, wait_for):
    """The happy path: five effects, each written once, the saga succeeded."""
    saga = settled(start().id, wait_for)
    assert saga.state == SagaState.SUCCEEDED
    assert effects(saga.id) == {(name, "do"): 1 for name in FIVE}
    assert list(saga.steps.values_list("status", flat=True)) == ["succeeded"] * 5


def test_a_step_that_raises_leaves_no_write_behind(celery_worker, wait_for):
    """The function writes, then raises (a lost response): its write is rolled back, so the
    retry under the same key finds nothing and writes once (a plain step counts two calls)."""
    saga = settled(start({"s2": ["lost", "ok"]}).id, wait_for)
    assert saga.state == SagaState.SUCCEEDED
    assert effects(saga.id)[("s2", "do")] == 1
    assert saga.steps.get(name="s2").attempts == 2


def test_a_fenced_record_rolls_back_the_participants_write(celery_worker, wait_for):
    """While s3 runs, another connection moves the saga on (as a newer claim would): s3's
    record matches no row, and its write goes with it. The sweeper re-rings once the lease
    expires, s3 runs again under the same key, and its effect exists once, written once."""
    saga = settled(start({"s3": ["stolen", "ok"]}).id, wait_for, sweeping=True)
    assert saga.state == SagaState.SUCCEEDED
    found = effects(saga.id)
    assert found[("s3", "do")] == 1
    assert set(found) == {(n, "do") for n in FIVE}
    assert saga.steps.get(name="s3").attempts == 2


def test_compensations_of_transactional_steps_undo_once_in_reverse(celery_worker, wait_for):
    """A "no" at s4 undoes s1..s3 newest first, each compensation written once."""
    saga = settled(start({"s4": ["business:declined"]}).id, wait_for)
    assert saga.state == SagaState.COMPENSATED
    done = FIVE[:3]
    assert effects(saga.id) == {(n, "do"): 1 for n in done} | {(n, "undo"): 1 for n in done}


def succeeded_steps(saga_id) -> list[str]:
    return list(
        SagaEvent.objects.filter(saga_id=saga_id, kind="step_succeeded")
        .order_by("id")
        .values_list("step", flat=True)
    )


def step_commits(saga_id) -> int:
    """In how many transactions the saga's ``step_succeeded`` events were written."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT count(DISTINCT xmin::text) FROM {SagaEvent._meta.db_table}"
            " WHERE saga_id = %s AND kind = 'step_succeeded'",
            [str(saga_id)],
        )
        return cursor.fetchone()[0]


# A task goes straight on for as long as it needs, however loaded this machine is: a batch
# here never ends early for lack of time. (The saga's first doorbell carries this process's
# time limits, which this budget does not fit: the worker hands it back once and rings again
# with its own, before any step runs.)
NO_HURRY = {"SAGA_INLINE_BUDGET": "30"}


def test_consecutive_transactional_steps_land_in_one_record(worker_factory, wait_for):
    """Five transactional steps in one task: one transaction records them all, with every
    step's row, event and effect, in order."""
    worker_factory(NO_HURRY, exclusive=True, name="batch")
    saga = settled(start().id, wait_for)
    assert saga.state == SagaState.SUCCEEDED
    assert step_commits(saga.id) == 1
    assert effects(saga.id) == {(name, "do"): 1 for name in FIVE}
    assert succeeded_steps(saga.id) == FIVE
    rows = list(saga.steps.order_by("id").values_list("name", "status", "attempts"))
    assert rows == [(name, "succeeded", 1) for name in FIVE]
    assert set(saga.results) == set(FIVE)


def test_batching_can_be_turned_off(worker_factory, wait_for):
    """``SAGA_BATCH_STEPS=0``: each step commits with its own record."""
    worker_factory({**NO_HURRY, "SAGA_BATCH_STEPS": "0"}, exclusive=True, name="nobatch")
    saga = settled(start().id, wait_for)
    assert saga.state == SagaState.SUCCEEDED
    assert step_commits(saga.id) == 5
    assert effects(saga.id) == {(name, "do"): 1 for name in FIVE}


def test_a_batch_sees_each_steps_result_as_the_row_holds_it(worker_factory, wait_for):
    """The next step of a batch reads the results so far as JSON gives them back (a tuple is
    a list), as it would from the row, not the objects the previous step returned."""
    worker_factory(NO_HURRY, exclusive=True, name="batchjson")
    saga = settled(start({"s1": ["tuple"], "s2": ["echo"]}).id, wait_for)
    assert saga.state == SagaState.SUCCEEDED
    assert step_commits(saga.id) == 1
    assert saga.results["s2"]["seen"] == repr({"s1": {"pair": [1, 2]}})


def test_a_no_inside_a_batch_undoes_only_what_was_recorded(worker_factory, wait_for):
    """A "no" at s3 rolls back the batch (s1 and s2's writes with it); the task runs s1 and
    s2 again one record each, s3 says no again, and s2 and s1 are undone: every effect once,
    every step's success recorded once."""
    worker_factory(NO_HURRY, exclusive=True, name="batchno")
    saga = settled(start({"s3": ["business:declined"]}).id, wait_for)
    assert saga.state == SagaState.COMPENSATED
    assert saga.failure_code == "declined"
    assert effects(saga.id) == {
        ("s1", "do"): 1,
        ("s2", "do"): 1,
        ("s2", "undo"): 1,
        ("s1", "undo"): 1,
    }
    assert succeeded_steps(saga.id) == ["s1", "s2"]


def test_a_transient_failure_inside_a_batch_is_retried_with_nothing_twice(worker_factory, wait_for):
    """s4 fails inside the batch: it is rolled back, s1..s3 run again one record each, s4
    fails again (its first attempt, called once more before it counts) and its retry
    succeeds. Each write exists once, written once; s4 took two attempts."""
    worker_factory(NO_HURRY, exclusive=True, name="batchretry")
    saga = settled(start({"s4": ["transient", "ok"]}).id, wait_for)
    assert saga.state == SagaState.SUCCEEDED
    assert effects(saga.id) == {(name, "do"): 1 for name in FIVE}
    assert succeeded_steps(saga.id) == FIVE
    assert saga.steps.get(name="s4").attempts == 2
    assert saga.steps.get(name="s1").attempts == 1


def test_a_cancel_accepted_during_a_batch_is_honoured(worker_factory, wait_for):
    """s3, inside a batch, has a cancel requested (the row still says s1, so it is accepted)
    and then succeeds. The batch's record is fenced off by the cancel and rolled back with
    every write of it, and the cancel is honoured at s1's boundary: nothing took effect,
    nothing is undone. Without that fence the batch would have finished the saga past an
    accepted cancel; step by step, s1..s3 would each have been done and undone."""
    worker_factory(NO_HURRY, exclusive=True, name="batchcancel")
    saga = settled(start({"s3": ["cancel"]}).id, wait_for)
    assert saga.state == SagaState.COMPENSATED
    assert saga.failure_code == "customer_cancelled"
    assert effects(saga.id) == {}
    assert succeeded_steps(saga.id) == []
    kinds = list(
        SagaEvent.objects.filter(saga_id=saga.id).order_by("id").values_list("kind", flat=True)
    )
    assert kinds.index("cancel_requested") < kinds.index("cancel_honoured")


def test_a_batch_fenced_off_by_a_newer_claim_stops(worker_factory, wait_for):
    """s2, inside a batch, sees the saga taken over once (its version bumped, as a newer claim
    would): the batch's record matches no row and everything it wrote is rolled back, and the
    task stops instead of running the saga it lost again (``saga.batch_fenced``). The sweeper
    rings it once the lease is over, and every effect exists once, written once."""
    worker = worker_factory(NO_HURRY, exclusive=True, name="batchstolen")
    saga = settled(start({"s2": ["stolen_once"]}).id, wait_for, sweeping=True, timeout=120)
    assert saga.state == SagaState.SUCCEEDED
    found = {key: calls for key, calls in effects(saga.id).items() if key[1] != "mark"}
    assert found == {(name, "do"): 1 for name in FIVE}
    assert succeeded_steps(saga.id) == FIVE
    log = worker.log_text()
    assert log.count("saga.batch_fenced") == 1
    assert "saga.step_succeeded" in log


def test_a_batch_refused_at_commit_goes_on_step_by_step(worker_factory, wait_for):
    """s3 writes a row whose deferred foreign key fails at COMMIT: the batch's commit is
    refused and everything rolls back. The task goes on step by step at once (no lease to wait
    out, no sweeper), s3 succeeds when called again, and every effect exists once."""
    worker_factory(NO_HURRY, exclusive=True, name="batchcommit")
    saga = settled(start({"s3": ["bad_at_commit"]}).id, wait_for)
    assert saga.state == SagaState.SUCCEEDED
    found = {key: calls for key, calls in effects(saga.id).items() if key[1] != "mark"}
    assert found == {(name, "do"): 1 for name in FIVE}
    assert succeeded_steps(saga.id) == FIVE
    assert step_commits(saga.id) > 1  # the batch's own commit never happened


@pytest.mark.parametrize("saga_type", ["test5", "test_tx"])
def test_a_long_step_inside_the_budget_does_not_carry_the_task_past_its_limits(
    saga_type, worker_factory, wait_for
):
    """s2 starts inside the task's inline budget and runs 2.5 s of its 3 s timeout. Whether the
    task goes straight on into s3 is asked when s3 would start, past the budget: s3 gets a task
    of its own, and no step meets the soft time limit (3.5 s) of a task that ran two of them.
    Asked when s2 started, s3 would run in the same task, hit that limit and spend an attempt
    (a batch would then also be rolled back and rerun past its limit)."""
    worker_factory(exclusive=True, name="budget")
    with transaction.atomic():
        saga = saga_start(
            saga_type=saga_type, data={"script": {"s2": ["slow:2.5"], "s3": ["slow:2.5"]}}
        )
    saga = settled(saga.id, wait_for)
    assert saga.state == SagaState.SUCCEEDED
    assert not SagaEvent.objects.filter(saga_id=saga.id, kind="step_retry").exists()
    assert saga.steps.get(name="s3").attempts == 1
