"""Transactional steps: a participant in the engine's database commits with the step's record.

``test_tx`` has the five scripted steps of ``test5`` declared ``transactional=True``; every effect
is a row in ``test_saga_effects`` keyed by idempotency key with a call count, so a test sees
whether a write survived (count 1 or 2) or was rolled back with its record.
"""

from __future__ import annotations

import pytest
from django.db import transaction

from sagas.models import SETTLED_STATES, Saga, SagaState
from sagas.services import saga_start
from tests.sagas.sagatypes import FIVE, effects, ensure_effects_table

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _effects_table(transactional_db):
    ensure_effects_table()


def start(script=None) -> Saga:
    with transaction.atomic():
        return saga_start(saga_type="test_tx", data={"script": script or {}})


def settled(saga_id, wait_for, *, sweeping=False) -> Saga:
    from sagas.sweeper import sweep

    def check():
        if sweeping:
            sweep()
        saga = Saga.objects.get(pk=saga_id)
        return saga if saga.state in SETTLED_STATES else None

    return wait_for(
        check,
        timeout=60,
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
