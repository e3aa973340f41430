"""Steps that stay in the database, recorded once for a run of them (``Step.shares_records``).

``test_plain`` has the five scripted steps of ``test5`` declared ``stays_in_database=True``:
each effect commits on its own connection's transaction as the step makes it, and a task that
runs them back to back writes their records in one statement at the end of the run. The
transaction ids (``xmin``) of the saga's ``step_succeeded`` events tell how many statements
recorded the steps. A run that ends without its record leaves effects that no record names;
these tests check that whatever undoes the saga undoes them too (and
``tests/sagas/test_lost_runs.py`` drives the same cases in-process, one delivery at a time).
"""

from __future__ import annotations

import pytest
from django.db import transaction

from sagas.models import Saga, SagaState
from sagas.services import saga_request_cancel, saga_start
from tests.sagas.sagatypes import FIVE, effects, ensure_effects_table
from tests.sagas.test_transactional_steps import settled, step_commits, succeeded_steps

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

# A task goes straight on for as long as it needs: a run here never ends early for lack of
# time (see tests/sagas/test_transactional_steps.py). Its lease is this budget plus the step
# timeout and 5 s, so a test that waits out a lost task's lease keeps it short.
NO_HURRY = {"SAGA_INLINE_BUDGET": "30"}
SHORT_LEASE = {"SAGA_INLINE_BUDGET": "8"}


@pytest.fixture(autouse=True)
def _effects_table(transactional_db):
    ensure_effects_table()


def start(script=None) -> Saga:
    with transaction.atomic():
        return saga_start(saga_type="test_plain", data={"script": script or {}})


def kinds(saga_id) -> set[tuple[str, str]]:
    """The effects of a saga that exist (done or undone), without the test's marker rows."""
    return {key for key in effects(saga_id) if key[1] != "mark"}


def test_a_run_of_steps_that_stay_in_the_database_lands_in_one_record(worker_factory, wait_for):
    """Five such steps in one task: one statement records them all, every row, event and
    result in order, and each effect was made once."""
    worker_factory(NO_HURRY, exclusive=True, name="plainrun")
    saga = settled(start().id, wait_for)
    assert saga.state == SagaState.SUCCEEDED
    assert step_commits(saga.id) == 1
    assert effects(saga.id) == {(name, "do"): 1 for name in FIVE}
    assert succeeded_steps(saga.id) == FIVE
    rows = list(saga.steps.order_by("id").values_list("name", "status", "attempts", "maybe_effect"))
    assert rows == [(name, "succeeded", 1, False) for name in FIVE]


def test_a_type_with_a_change_hook_records_each_step_on_its_own(worker_factory, wait_for):
    """A plain run's one record is autocommitted; for a type with a change hook it would be
    guarded on the saga's data, and a flag set while the run ran would break it: such types
    record their steps one by one."""
    worker_factory(NO_HURRY, exclusive=True, name="plainhook")
    with transaction.atomic():
        saga = saga_start(saga_type="test_plain_hooked", data={"script": {}})
    saga = settled(saga.id, wait_for)
    assert saga.state == SagaState.SUCCEEDED
    assert step_commits(saga.id) == 5


def test_with_batching_off_each_step_has_its_own_record(worker_factory, wait_for):
    worker_factory({**NO_HURRY, "SAGA_BATCH_STEPS": "0"}, exclusive=True, name="plainoff")
    saga = settled(start().id, wait_for)
    assert saga.state == SagaState.SUCCEEDED
    assert step_commits(saga.id) == 5


def test_a_no_inside_a_run_undoes_every_step_that_ran(worker_factory, wait_for):
    """s3 says no after s1 and s2 committed their writes unrecorded: the task runs s1 and s2
    again one record each (the participant answers under the same keys), s3 says no again,
    and s2 and s1 are undone. Each effect exists once; s1 and s2 were asked twice."""
    worker_factory(NO_HURRY, exclusive=True, name="plainno")
    saga = settled(start({"s3": ["business:declined"]}).id, wait_for)
    assert saga.state == SagaState.COMPENSATED
    assert saga.failure_code == "declined"
    assert effects(saga.id) == {
        ("s1", "do"): 2,
        ("s2", "do"): 2,
        ("s2", "undo"): 1,
        ("s1", "undo"): 1,
    }
    assert succeeded_steps(saga.id) == ["s1", "s2"]


def test_a_cancel_accepted_during_a_run_undoes_every_step_that_ran(worker_factory, wait_for):
    """A cancel lands while s3 runs (the row still says s1, so it is accepted); s3..s5 go on
    and the run's record is fenced off by it. The five writes have committed and no record
    names them: their rows are marked, the cancel is honoured at s1, and the undo starts at
    s5. Without the marks nothing would be undone and five effects would stay."""
    worker_factory(NO_HURRY, exclusive=True, name="plaincancel")
    saga = settled(start({"s3": ["cancel"]}).id, wait_for)
    assert saga.state == SagaState.COMPENSATED
    assert saga.failure_code == "customer_cancelled"
    assert kinds(saga.id) == {(n, "do") for n in FIVE} | {(n, "undo") for n in FIVE}
    undone = list(
        saga.events.filter(kind="compensation_succeeded").order_by("id").values_list("step")
    )
    assert [step for (step,) in undone] == FIVE[::-1]


def test_a_worker_lost_in_a_run_then_a_cancel_undoes_what_the_run_committed(
    worker_factory, wait_for
):
    """The worker dies after s3's write, inside a run from s1: s1..s3 committed and nothing
    recorded them. A cancel is accepted meanwhile (the row says s1, claimed). When the lease
    runs out the sweeper rings, the new claim of s1 marks every step the run may have reached
    (s2..s5), and the cancel's undo starts at s5: s3's and s2's writes are undone with s1's,
    and s4 and s5, which never ran, get their undo as tombstones."""
    worker = worker_factory(SHORT_LEASE, exclusive=True, name="plainlost")
    saga = start({"s3": ["crash"]})
    wait_for(lambda: ("s3", "mark") in effects(saga.id), timeout=60)
    saga_request_cancel(saga_id=saga.id, reason="customer_cancelled", actor="test")
    saga = settled(saga.id, wait_for, sweeping=True, timeout=90)
    assert saga.state == SagaState.COMPENSATED
    assert kinds(saga.id) == {(n, "do") for n in FIVE[:3]} | {(n, "undo") for n in FIVE}
    log = worker.log_text()
    assert "WorkerLostError" in log or "signal 9" in log


def test_a_run_broken_by_a_failure_then_cancelled_undoes_what_it_had_run(worker_factory, wait_for):
    """Inside a run, s3 has a cancel accepted and then fails for now: the run breaks with s1's
    and s2's writes committed and unrecorded (and s3's, for all the engine can tell). Their
    rows are marked before the task goes on step by step, so the cancel, honoured at s1,
    undoes s3, s2 and s1. Unmarked, s1 would look as if it never ran: nothing undone."""
    worker_factory(NO_HURRY, exclusive=True, name="plainbroken")
    saga = settled(start({"s3": ["cancel_transient", "ok"]}).id, wait_for)
    assert saga.state == SagaState.COMPENSATED
    assert saga.failure_code == "customer_cancelled"
    assert kinds(saga.id) == {(n, "do") for n in FIVE[:2]} | {(n, "undo") for n in FIVE[:3]}
