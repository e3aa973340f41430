"""Driving a saga in this process, one delivery at a time, as a worker would.

The in-process engine tests run the real claim and record code on PostgreSQL with
``SAGA_INLINE_BUDGET`` at 0, so each delivery runs exactly one step: one claim, one record.
"""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from sagas.models import Saga
from sagas.runner import advance


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
