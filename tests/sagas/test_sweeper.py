"""The sweeper, driven in-process with explicit clocks (no worker needed)."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from django.utils import timezone

from sagas import doorbell
from sagas.doorbell import queued_doorbells
from sagas.models import Saga
from sagas.services import saga_start
from sagas.store import claim
from sagas.sweeper import sweep
from sagas.tasks import run_saga

pytestmark = pytest.mark.django_db


def _rings(result: dict[str, int]) -> dict[str, int]:
    """A sweep's counts without the pumps' backstop (tests/sagas/test_pumps.py has its own)."""
    return {k: v for k, v in result.items() if k != "pumped"}


def _overdue_saga() -> Saga:
    saga = saga_start(saga_type="test5", data={})
    Saga.objects.filter(pk=saga.pk).update(next_attempt_at=timezone.now() - timedelta(hours=1))
    return saga


@pytest.fixture
def queue_depth(monkeypatch):
    """What the broker says the saga queue holds, as each test sets it (``[0]``: empty)."""
    depth = [0]
    monkeypatch.setattr(doorbell, "queued_doorbells", lambda queue_name=None: depth[0])
    return depth


def test_unanswered_rings_back_off_exponentially_and_a_claim_resets_them(settings, queue_depth):
    """A saga rung but never claimed (its doorbell lost, the queue empty) is rung again only
    after 2x, then 4x SAGA_STUCK_AFTER; once a worker claims it the count starts over."""
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


def test_repeat_rings_wait_while_the_queue_could_still_hold_their_doorbells(settings, queue_depth):
    """Sagas already rung once and overdue again are not rung while the saga queue holds at
    least as many messages as there are of them (their doorbells may be waiting in it: another
    ring would only be a stale task more); they are rung once it drains below that, or after
    1024 x SAGA_STUCK_AFTER whatever the queue says. A first ring never waits."""
    settings.SAGA_STUCK_AFTER = 10
    sagas = [_overdue_saga(), _overdue_saga()]
    queue_depth[0] = 5_000  # a backlog
    t0 = timezone.now()
    assert _rings(sweep(now=t0)) == {"redispatched": 2, "timed_out": 0, "held_back": 0}

    t1 = t0 + timedelta(seconds=21)  # past 2 x 10 s: due for a repeat ring
    assert _rings(sweep(now=t1)) == {"redispatched": 0, "timed_out": 0, "held_back": 2}
    assert [Saga.objects.get(pk=s.pk).sweeps for s in sagas] == [1, 1]
    queue_depth[0] = 2  # still as many messages as sagas waiting: they may be theirs
    assert sweep(now=t1)["redispatched"] == 0
    queue_depth[0] = 1  # fewer: at least one of them has no doorbell in the queue
    assert _rings(sweep(now=t1)) == {"redispatched": 2, "timed_out": 0, "held_back": 0}

    queue_depth[0] = 5_000
    assert sweep(now=t1 + timedelta(seconds=10 * 1024 - 1))["redispatched"] == 0
    assert sweep(now=t1 + timedelta(seconds=10 * 1024 + 1))["redispatched"] == 2


def test_queued_doorbells_counts_what_waits_in_a_queue():
    """The depth the sweeper reads is the broker's own count of waiting messages (a queue no
    worker consumes, removed afterwards)."""

    name = f"{os.environ['CELERY_QUEUE']}-depth"
    try:
        assert queued_doorbells(name) == 0
        for n in range(3):
            run_saga.apply_async(("00000000-0000-0000-0000-000000000000", n), queue=name)
        assert queued_doorbells(name) == 3
    finally:
        with run_saga.app.connection_for_write() as conn:
            conn.default_channel.queue_delete(name)
