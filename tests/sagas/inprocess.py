"""Driving a saga in this process, one delivery at a time, as a worker would.

The in-process engine tests run the real claim and record code on PostgreSQL with
``SAGA_INLINE_BUDGET`` at 0, so each delivery runs exactly one step: one claim, one record.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from django.utils import timezone

from providers import breaker
from sagas.models import Saga, SagaState
from sagas.runner import advance
from sagas.store import claim
from tests.sagas.sagatypes import ensure_effects_table


def one_step_per_delivery(settings, providers: dict) -> None:
    """Set up a test for in-process delivery: the effects table, no inline steps, these
    provider knobs, and no breaker or call slot remembered from another test."""
    ensure_effects_table()
    settings.SAGA_INLINE_BUDGET = 0
    settings.SAGA_PROVIDERS = providers
    breaker._known_breakers.clear()
    breaker._known_slots.clear()


def deliver(saga_id, *, wake_timers: bool = False) -> Saga:
    """Time passes (backoffs, parks, leases; with ``wake_timers``, a parked saga's timer too),
    then the doorbell rings once. Returns the saga as the delivery left it."""
    past = timezone.now() - timedelta(seconds=3600)
    Saga.objects.filter(pk=saga_id).update(next_attempt_at=past, lease_until=past)
    if wake_timers:
        Saga.objects.filter(pk=saga_id, waiting_since__isnull=False).update(waiting_since=past)
    saga = Saga.objects.get(pk=saga_id)
    advance(saga.id, saga.version)
    return Saga.objects.get(pk=saga_id)


def settle(saga: Saga, deliveries: int = 20) -> Saga:
    """Deliver until the saga has settled (succeeded, compensated or waiting for a person);
    fail if it has not after ``deliveries``."""
    settled = (SagaState.COMPENSATED, SagaState.SUCCEEDED, SagaState.NEEDS_MANUAL)
    for _ in range(deliveries):
        if saga.state in settled:
            return saga
        saga = deliver(saga.id)
    raise AssertionError(f"not settled: {saga.state} at {saga.current_step}")


def lost_claim(saga_id) -> Saga:
    """A run of the saga's current step whose worker died before it recorded anything: the
    claim counts it, then its lease runs out. Returns the saga as the claim left it, due now."""
    past = timezone.now() - timedelta(seconds=3600)
    Saga.objects.filter(pk=saga_id).update(next_attempt_at=past)
    saga = Saga.objects.get(pk=saga_id)
    assert claim(saga.id, saga.version) is not None
    Saga.objects.filter(pk=saga_id).update(lease_until=past, next_attempt_at=past)
    return Saga.objects.get(pk=saga_id)


def out_of_workers_reach(saga_id, version: int = 1000) -> None:
    """Keep running workers away from a saga this process is about to run (``advance(saga_id,
    version)``): call it in the start's transaction, before its doorbell rings on commit.

    The doorbell names the saga's first version, so it finds nothing to claim; and with no due
    time (a saga waiting with no timer looks the same) no pump claims it from the database,
    while a claim by id still takes it.
    """
    Saga.objects.filter(pk=saga_id).update(version=version, next_attempt_at=None)


@contextmanager
def only_this_process() -> Iterator[None]:
    """While it lasts, no worker takes a doorbell and the gate forgets the breaker and slot
    rows it knew (the database was emptied since it learnt them), so sagas this process runs
    with ``advance`` are run by nothing else."""
    from tests import conftest

    breaker._known_breakers.clear()
    breaker._known_slots.clear()
    worker = conftest._session_worker
    if worker is not None and worker.alive:
        worker.pause_consuming()
    try:
        yield
    finally:
        if worker is not None and worker.alive:
            worker.resume_consuming()
