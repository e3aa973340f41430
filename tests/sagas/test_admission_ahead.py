"""A step's admission to its provider, made ahead by the record that hands the saga on to it.

Run in-process on PostgreSQL, outside any transaction as a worker runs (the admission stands
only once the record's transaction commits), with the inline budget out of reach so that one
task goes from step to step. ``test_provider``'s ``s2`` calls the provider ``card``.
"""

from __future__ import annotations

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from providers import breaker
from providers.models import CallSlot
from sagas.models import Saga, SagaState
from sagas.runner import advance
from sagas.services import saga_start
from tests.sagas.inprocess import one_step_per_delivery, only_this_process, out_of_workers_reach
from tests.sagas.sagatypes import effects

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _one_task_runs_it_all(settings):
    one_step_per_delivery(settings, {"card": {"max_in_flight": 3}})
    settings.SAGA_INLINE_BUDGET = 600.0
    with only_this_process():
        yield


def _run(script: dict) -> tuple[Saga, list[str]]:
    """Start a ``test_provider`` saga with ``script`` and run it in one task; its statements."""
    with transaction.atomic():
        saga = saga_start(saga_type="test_provider", data={"script": script})
        out_of_workers_reach(saga.id)
    with CaptureQueriesContext(connection) as captured:
        advance(saga.id, 1000)
    return Saga.objects.get(pk=saga.id), [q["sql"] for q in captured]


def _leased() -> int:
    return CallSlot.objects.filter(provider="card", lease_until__isnull=False).count()


def test_the_provider_step_is_admitted_by_the_record_before_it():
    _run({})  # the first creates the breaker's and the slots' rows, as a worker's first does
    saga, sql = _run({})
    assert saga.state == SagaState.SUCCEEDED
    admissions = [s for s in sql if 'FROM "providers_breaker"' in s]
    # One admission, in s1's record (an UPDATE of the saga), none of its own; the call's
    # outcome rides in s2's record: its slot is back, its call counted.
    assert len(admissions) == 1 and 'UPDATE "sagas_saga"' in admissions[0], admissions
    assert _leased() == 0 and breaker.window_counts("card") == (2, 0)


def test_a_slot_taken_ahead_for_a_step_the_saga_never_ran_is_given_back():
    """A cancel lands while s1 runs: s1's record still goes on into s2 (and takes its slot
    ahead), then s2's boundary honours the cancel. The slot no call used is given back in the
    same task, not held until its lease runs out, and no call is counted."""
    saga, sql = _run({"s1": ["cancel"]})
    assert any('UPDATE "sagas_saga"' in s and 'FROM "providers_breaker"' in s for s in sql)
    assert saga.state == SagaState.COMPENSATED and saga.failure_code == "customer_cancelled"
    assert ("s2", "do") not in effects(saga.id)
    assert _leased() == 0 and breaker.window_counts("card") == (0, 0)
