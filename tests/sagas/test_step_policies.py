"""Per-step policies against a real worker: a step's own attempts, backoff, non-retryable
errors, compensation retries and timeout, while its neighbours keep the global settings.

The ``policy`` type (:mod:`tests.sagas.sagatypes`): ``quick`` (defaults), ``picky`` (two
attempts, two undo attempts, ``Declined`` is final) and ``slow`` (timeout 8 s; the tests run
with ``SAGA_STEP_TIMEOUT=3``).
"""

from __future__ import annotations

import pytest
from django.db import transaction
from django.utils import timezone

from sagas.models import Saga, SagaState, SagaStep
from sagas.services import saga_start
from tests.sagas.sagatypes import effects, ensure_effects_table

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _effects_table(transactional_db):
    ensure_effects_table()


def start(script) -> Saga:
    with transaction.atomic():
        return saga_start(saga_type="policy", data={"script": script})


def settled(saga_id, wait_for) -> Saga:
    done = (SagaState.SUCCEEDED, SagaState.COMPENSATED, SagaState.NEEDS_MANUAL)
    return wait_for(
        lambda: (s := Saga.objects.get(pk=saga_id)).state in done and s,
        timeout=90,
        describe=lambda: (
            Saga.objects.filter(pk=saga_id)
            .values("state", "current_step", "attempt", "last_error")
            .first()
        ),
    )


def step(saga_id, name) -> SagaStep:
    return SagaStep.objects.get(saga_id=saga_id, name=name)


def test_a_steps_own_attempts_while_its_neighbour_keeps_the_default(celery_worker, wait_for):
    """``quick`` (default attempts) gets through three transient errors; ``picky`` gives up
    after its own two attempts and the saga undoes ``quick``."""
    saga = start({"quick": ["transient", "transient", "transient", "ok"], "picky": ["transient"]})
    saga = settled(saga.id, wait_for)
    assert (saga.state, saga.failure_code, saga.failed_step) == (
        SagaState.COMPENSATED,
        "step_failed",
        "picky",
    )
    assert step(saga.id, "quick").attempts == 4
    assert step(saga.id, "picky").attempts == 2
    # picky's outcome is unknown after transient errors: its undo runs too (it finds nothing)
    assert effects(saga.id) == {("quick", "do"): 1, ("quick", "undo"): 1, ("picky", "undo"): 1}


def test_a_non_retryable_error_ends_only_its_own_step_at_once(celery_worker, wait_for):
    """The same ``Declined`` error is retried at ``quick`` and final at ``picky``."""
    saga = settled(start({"quick": ["declined", "ok"], "picky": ["declined"]}).id, wait_for)
    assert (saga.state, saga.failure_code) == (SagaState.COMPENSATED, "declined")
    assert step(saga.id, "quick").attempts == 2
    assert step(saga.id, "picky").attempts == 1
    assert effects(saga.id) == {("quick", "do"): 1, ("quick", "undo"): 1}


def test_a_steps_own_compensation_retries(celery_worker, wait_for):
    """``picky``'s undo gives up after its own two attempts (the default is eight)."""
    saga = start({"slow": ["business:no"], "undo:picky": ["transient"]})
    saga = settled(saga.id, wait_for)
    assert (saga.state, saga.current_step) == (SagaState.NEEDS_MANUAL, "picky")
    assert step(saga.id, "picky").compensation_attempts == 2


def test_a_steps_own_timeout_sets_its_lease_and_its_task_limit(celery_worker, wait_for):
    """``slow`` takes 5 s: past the default timeout (3 s), within its own (8 s). It runs once,
    under a lease sized from its own timeout."""
    saga = start({"slow": ["slow:5"]})
    running = wait_for(
        lambda: (
            (s := Saga.objects.get(pk=saga.id)).current_step == "slow"
            # claimed: a live lease (the hand-over to slow leaves one that has run out)
            and s.lease_until is not None
            and s.lease_until > timezone.now()
            and s
        ),
        timeout=60,
    )
    # lease = timeout + SAGA_INLINE_BUDGET + 5 = 13.5 s from the claim (11.5 s for the shared
    # limits every other task has: 6 s, the order saga's carrier booking)
    assert (running.lease_until - running.updated_at).total_seconds() > 12
    saga = settled(saga.id, wait_for)
    assert saga.state == SagaState.SUCCEEDED
    assert step(saga.id, "slow").attempts == 1
