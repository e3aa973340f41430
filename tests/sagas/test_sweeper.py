"""The sweeper, driven in-process with explicit clocks (no worker needed)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from sagas.models import Saga
from sagas.services import saga_start
from sagas.store import claim
from sagas.sweeper import sweep

pytestmark = pytest.mark.django_db


def _overdue_saga() -> Saga:
    saga = saga_start(saga_type="test5", data={})
    Saga.objects.filter(pk=saga.pk).update(next_attempt_at=timezone.now() - timedelta(hours=1))
    return saga


def test_unanswered_rings_back_off_exponentially_and_a_claim_resets_them(settings):
    """A saga rung but never claimed (its doorbell waits in a backlog) is rung again only after
    2x, then 4x SAGA_STUCK_AFTER; once a worker claims it the count starts over."""
    settings.SAGA_STUCK_AFTER = 10
    saga = _overdue_saga()
    t0 = timezone.now()
    assert sweep(now=t0)["redispatched"] == 1
    assert Saga.objects.get(pk=saga.pk).sweeps == 1
    assert sweep(now=t0 + timedelta(seconds=15))["redispatched"] == 0  # < 2 x 10 s
    assert sweep(now=t0 + timedelta(seconds=21))["redispatched"] == 1
    t1 = t0 + timedelta(seconds=21)
    assert sweep(now=t1 + timedelta(seconds=35))["redispatched"] == 0  # < 4 x 10 s
    assert sweep(now=t1 + timedelta(seconds=41))["redispatched"] == 1
    assert Saga.objects.get(pk=saga.pk).sweeps == 3

    fresh = Saga.objects.get(pk=saga.pk)
    Saga.objects.filter(pk=saga.pk).update(next_attempt_at=timezone.now())
    claimed = claim(saga.pk, fresh.version)
    assert claimed is not None and claimed.sweeps == 0


def test_leased_and_settled_sagas_are_left_alone(settings):
    """A saga whose step is in flight (lease not expired) or that has settled is not rung."""
    settings.SAGA_STUCK_AFTER = 1
    leased = _overdue_saga()
    Saga.objects.filter(pk=leased.pk).update(lease_until=timezone.now() + timedelta(minutes=5))
    assert sweep()["redispatched"] == 0
    Saga.objects.filter(pk=leased.pk).update(lease_until=timezone.now() - timedelta(seconds=1))
    assert sweep()["redispatched"] == 1


def test_deadline_pass_requests_a_timed_out_cancel_before_the_pivot(settings):
    """A running saga past its deadline gets cancel_reason timed_out; one at its pivot does not."""
    early = saga_start(saga_type="test_pivot", data={}, deadline_seconds=0)
    at_pivot = saga_start(saga_type="test_pivot", data={}, deadline_seconds=0)
    Saga.objects.filter(pk=at_pivot.pk).update(step_index=3, current_step="s4")
    result = sweep(now=timezone.now() + timedelta(seconds=1))
    assert result["timed_out"] == 1
    assert Saga.objects.get(pk=early.pk).cancel_reason == "timed_out"
    assert Saga.objects.get(pk=at_pivot.pk).cancel_reason == ""


def test_sagas_past_their_pivot_do_not_starve_the_deadline_pass(settings):
    """More late sagas past their pivot than one batch holds (they must finish, not undo) do
    not hide a later-deadline saga that is still before its pivot: it is timed out now."""
    settings.SAGA_SWEEP_BATCH = 3
    for _ in range(5):
        past = saga_start(saga_type="test_pivot", data={}, deadline_seconds=0)
        Saga.objects.filter(pk=past.pk).update(step_index=3, current_step="s4")
    early = saga_start(saga_type="test_pivot", data={}, deadline_seconds=0)
    result = sweep(now=timezone.now() + timedelta(seconds=1))
    assert result["timed_out"] == 1
    assert Saga.objects.get(pk=early.pk).cancel_reason == "timed_out"
    assert not Saga.objects.filter(step_index=3).exclude(cancel_reason="").exists()
