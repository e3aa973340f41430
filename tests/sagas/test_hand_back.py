"""Steps longer than a task's time limits, against a real worker: who runs them, in which task.

Every task message carries Celery time limits sized for one step timeout: the longest step
timeout of any registered saga type up to ``SAGA_TASK_TIMEOUT_MAX`` (``task_step_timeout()``;
6 s in the tests, where ``SAGA_STEP_TIMEOUT`` is 3 s: the order saga's carrier booking, at
twice the default, is the longest within the cap), plus the inline budget. So a task goes on
inline into a step longer than the default (``midlong``'s ``booking``, 5 s), while each step
still ends at its own timeout. A step longer than the cap (``Step(timeout=8)``) gets a task
message of its own whose limits fit it. A doorbell that arrives without them (an ops retry, a
cancel, a signal: the services ring with the shared limits) is handed back by the worker that
claimed it (``sagas.runner._hand_back``): the claim is released without counting an attempt
and the doorbell rung again with the step's limits.

The worker here records every ``sagas.run`` task it starts (``SAGA_TEST_RECORD_DELIVERIES``,
:mod:`tests.sagas.sagatypes`): the saga, the version its doorbell named and the soft time limit
the message carried, so the tests count task messages per saga instead of guessing from logs.
"""

from __future__ import annotations

import json

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import transaction

from sagas.models import Saga, SagaState, SagaStep
from sagas.services import saga_retry_now, saga_start
from tests.conftest import manage_shell
from tests.sagas.sagatypes import (
    RECORD_DELIVERIES,
    deliveries,
    effects,
    ensure_deliveries_table,
    ensure_effects_table,
)

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

STEP_TIMEOUT = 3.0  # SAGA_STEP_TIMEOUT in the tests (tests/conftest.py)
# What every doorbell's limits are sized for: the order saga's carrier booking (2 x 3 s).
TASK_STEP_TIMEOUT = 6.0


@pytest.fixture(autouse=True)
def _tables(transactional_db):
    ensure_effects_table()
    ensure_deliveries_table()


def settled(saga_id, wait_for, states) -> Saga:
    return wait_for(
        lambda: (s := Saga.objects.get(pk=saga_id)).state in states and s,
        timeout=90,
        describe=lambda: (
            Saga.objects.filter(pk=saga_id)
            .values("state", "current_step", "attempt", "version", "last_error")
            .first()
        ),
    )


def _start_from_a_process_with(env: dict[str, str], saga_type: str, data: dict) -> str:
    """Start a saga from a process of its own configured with ``env`` (as a web process of the
    same deployment would be): its doorbell carries the limits that configuration makes."""
    code = (
        "import json\n"
        "from django.db import transaction\n"
        "from sagas.services import saga_start\n"
        "with transaction.atomic():\n"
        f"    saga = saga_start(saga_type={saga_type!r}, data=json.loads({json.dumps(data)!r}))\n"
        "print(saga.id)\n"
    )
    return manage_shell(env, code).strip().splitlines()[-1]


def test_steps_that_fit_run_inline_and_a_longer_one_gets_its_own_task(worker_factory, wait_for):
    """``quick`` and ``picky`` (default timeout) run in the task the start rang; ``slow``
    (8 s) is not run inline but in a second task message whose limits fit 8 s, and it takes
    5 s at its first attempt."""
    # The worker, and the process that starts the saga, have an inline budget of 30 s, so the
    # two short steps always fit it however loaded the machine is.
    budget = 30.0
    env = {"SAGA_INLINE_BUDGET": str(budget)}
    worker_factory({RECORD_DELIVERIES: "1", **env}, name="inline", exclusive=True)
    saga_id = _start_from_a_process_with(env, "policy", {"script": {"slow": ["slow:5"]}})
    saga = settled(saga_id, wait_for, {SagaState.SUCCEEDED, SagaState.COMPENSATED})
    assert saga.state == SagaState.SUCCEEDED
    # Two task messages: the start's, with the shared limits (6 s a step), and slow's own.
    assert [soft for _, soft in deliveries(saga.id)] == [TASK_STEP_TIMEOUT + budget, 8.0 + budget]
    assert {s.name: s.attempts for s in SagaStep.objects.filter(saga_id=saga.id)} == {
        "quick": 1,
        "picky": 1,
        "slow": 1,
    }


def test_a_doorbell_without_the_steps_limits_is_handed_back_and_the_step_completes(
    worker_factory, wait_for
):
    """``long`` (8 s, after the pivot) failed once and went to a person. An ops retry rings
    with the shared limits; the worker that claims it hands it back (no attempt counted) to a
    task message of its own with limits that fit 8 s, where ``long`` takes 7 s and succeeds:
    under the shared limits (6 s per step) it would have been cut off and escalated again."""
    worker_factory({RECORD_DELIVERIES: "1"}, name="handback", exclusive=True)
    with transaction.atomic():
        saga = saga_start(saga_type="handback", data={"script": {"long": ["transient"]}})
    saga = settled(saga.id, wait_for, {SagaState.NEEDS_MANUAL})
    assert saga.current_step == "long"
    # Even the first run of "long" came in a message of its own, with its limits.
    budget = 0.5  # SAGA_INLINE_BUDGET in the tests
    default = TASK_STEP_TIMEOUT + budget  # the limits every doorbell carries unless told otherwise
    assert [soft for _, soft in deliveries(saga.id)] == [default, 8.0 + budget]

    # The participant is fixed: it now takes 5 s and says yes. An ops user retries.
    Saga.objects.filter(pk=saga.id).update(data={"script": {"long": ["slow:7"]}})
    ops = get_user_model().objects.create_user("ops-handback", password="x")
    ops.groups.add(Group.objects.get(name="ops"))
    retried = saga_retry_now(saga_id=saga.id, user=ops)

    done = settled(saga.id, wait_for, {SagaState.SUCCEEDED, SagaState.NEEDS_MANUAL})
    assert done.state == SagaState.SUCCEEDED
    after_retry = deliveries(saga.id)[2:]
    # The retry's doorbell (default limits) for the version the retry left; the claim moved it
    # one on and the hand-back's release one more, and rang for that with long's limits.
    assert after_retry == [(retried.version, default), (retried.version + 2, 8.0 + budget)]
    assert SagaStep.objects.get(saga_id=saga.id, name="long").attempts == 1
    assert effects(saga.id) == {("fits", "do"): 1, ("long", "do"): 1}


def test_a_step_longer_than_the_default_runs_inline_within_the_shared_limits(
    worker_factory, wait_for
):
    """``booking`` (5 s, above the default 3 s, within the cap) takes 4 s and runs in the task
    the start rang, between two default steps: one task message for the whole saga."""
    budget = 30.0  # as above: the three steps always fit the inline budget
    env = {"SAGA_INLINE_BUDGET": str(budget)}
    worker_factory({RECORD_DELIVERIES: "1", **env}, name="midlong", exclusive=True)
    saga_id = _start_from_a_process_with(env, "midlong", {"script": {"booking": ["slow:4"]}})
    saga = settled(saga_id, wait_for, {SagaState.SUCCEEDED, SagaState.COMPENSATED})
    assert saga.state == SagaState.SUCCEEDED
    assert [soft for _, soft in deliveries(saga.id)] == [TASK_STEP_TIMEOUT + budget]
    assert {s.name: s.attempts for s in SagaStep.objects.filter(saga_id=saga.id)} == {
        "before": 1,
        "booking": 1,
        "after": 1,
    }


def test_a_step_in_a_longer_task_still_ends_at_its_own_timeout(worker_factory, wait_for):
    """``before`` has the default timeout (3 s, so 3.5 s with the inline budget) in a task whose
    limits fit 6 s. Its first attempt would take 5 s: it is cut off at its own timeout, before
    its effect, and the second attempt goes through."""
    worker_factory({RECORD_DELIVERIES: "1"}, name="deadline", exclusive=True)
    with transaction.atomic():
        saga = saga_start(saga_type="midlong", data={"script": {"before": ["slow:5", "ok"]}})
    saga = settled(saga.id, wait_for, {SagaState.SUCCEEDED, SagaState.COMPENSATED})
    assert saga.state == SagaState.SUCCEEDED
    before = SagaStep.objects.get(saga_id=saga.id, name="before")
    assert before.attempts == 2
    assert effects(saga.id) == {("before", "do"): 1, ("booking", "do"): 1, ("after", "do"): 1}
    assert all(soft == TASK_STEP_TIMEOUT + 0.5 for _, soft in deliveries(saga.id))
