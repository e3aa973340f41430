"""The saga engine against a real worker, real PostgreSQL and real Redis.

Saga types come from :mod:`tests.sagas.sagatypes` (scripted outcomes, an effects ledger keyed
by idempotency key), never from the order saga.
"""

from __future__ import annotations

import re
import threading

import pytest
from django.contrib.auth.models import Group, User
from django.core.exceptions import PermissionDenied
from django.db import connection, connections, transaction

from config.celery import app
from sagas.exceptions import SagaOperationRefused
from sagas.models import Saga, SagaState
from sagas.services import (
    saga_compensate,
    saga_compensation_plan,
    saga_request_cancel,
    saga_resolve,
    saga_retry_now,
    saga_start,
)
from sagas.sweeper import sweep
from sagas.tasks import run_saga
from tests.conftest import purge_queue
from tests.sagas.inprocess import out_of_workers_reach
from tests.sagas.sagatypes import FIVE, effects, ensure_effects_table

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

SETTLED = {SagaState.SUCCEEDED, SagaState.COMPENSATED, SagaState.NEEDS_MANUAL}


@pytest.fixture(autouse=True)
def _effects_table(transactional_db):
    ensure_effects_table()


def start(script=None, saga_type="test5", **kwargs) -> Saga:
    with transaction.atomic():
        return saga_start(saga_type=saga_type, data={"script": script or {}}, **kwargs)


def settled(saga_id, wait_for, timeout=30, states=SETTLED, sweeping=False) -> Saga:
    def check():
        if sweeping:
            sweep()
        saga = Saga.objects.get(pk=saga_id)
        return saga if saga.state in states else None

    return wait_for(
        check,
        timeout=timeout,
        describe=lambda: (
            Saga.objects.filter(pk=saga_id)
            .values("state", "current_step", "attempt", "version", "last_error")
            .first()
        ),
    )


def timeline(saga_id) -> list[tuple[str, str]]:
    return list(Saga.objects.get(pk=saga_id).events.order_by("id").values_list("kind", "step"))


def lose_doorbells(count: int, wait_for) -> None:
    """Purge until ``count`` messages are gone from the queue.

    One purge is not enough on Redis: a worker that has just stopped consuming can still have
    a blocking pop in flight, which takes a message published after the cancel, finds no
    consumer for it and puts it back. Purging again picks it up once it is back."""
    purged = 0

    def gone() -> bool:
        nonlocal purged
        purged += purge_queue()
        return purged >= count

    wait_for(gone, timeout=10, describe=lambda: f"purged {purged} of {count} messages")


def test_happy_path_runs_every_step_once_in_order(celery_worker, wait_for):
    """All five steps run once, in order, and the saga succeeds with their results."""
    saga = settled(start().id, wait_for)
    assert saga.state == SagaState.SUCCEEDED
    assert effects(saga.id) == {(name, "do"): 1 for name in FIVE}
    assert [s for k, s in timeline(saga.id) if k == "step_succeeded"] == FIVE
    assert set(saga.results) == set(FIVE)
    assert list(saga.steps.values_list("status", flat=True)) == ["succeeded"] * 5
    assert saga.finished_at is not None and saga.lease_until is None


@pytest.mark.parametrize("position", range(5))
def test_business_failure_compensates_earlier_steps_in_reverse(celery_worker, wait_for, position):
    """A "no" at step k undoes exactly steps 1..k-1, newest first, and never retries step k."""
    failing = FIVE[position]
    saga = settled(start({failing: ["business:declined"]}).id, wait_for)
    assert saga.state == SagaState.COMPENSATED
    assert saga.failure_code == "declined"
    assert saga.failed_step == failing
    done = FIVE[:position]
    expected = {(n, "do"): 1 for n in done} | {(n, "undo"): 1 for n in done}
    assert effects(saga.id) == expected
    undone = [s for k, s in timeline(saga.id) if k == "compensation_succeeded"]
    assert undone == list(reversed(done))
    assert saga.steps.get(name=failing).attempts == 1


def test_transient_failures_retry_with_growing_delays_then_compensate(
    celery_worker, wait_for, settings
):
    """A step that keeps failing is retried with growing backoff, then compensated."""
    saga = settled(start({"s3": ["transient"]}).id, wait_for)
    assert saga.state == SagaState.COMPENSATED
    assert saga.failure_code == "step_failed"
    events = Saga.objects.get(pk=saga.id).events.filter(kind="step_retry").order_by("id")
    delays = [float(re.search(r"next attempt in ([\d.]+)s", e.detail).group(1)) for e in events]
    assert len(delays) == settings.SAGA_MAX_ATTEMPTS - 1
    assert delays == sorted(delays) and delays[-1] > delays[0]
    assert saga.steps.get(name="s3").attempts == settings.SAGA_MAX_ATTEMPTS
    # s3 never took effect, but its outcome was unknown: its undo ran too, and found nothing.
    assert [s for k, s in timeline(saga.id) if k == "compensation_succeeded"] == ["s3", "s2", "s1"]


def test_lost_response_is_retried_under_the_same_key(celery_worker, wait_for):
    """A step whose response was lost is repeated with the same key: one effect, two calls."""
    saga = settled(start({"s2": ["lost", "ok"]}).id, wait_for)
    assert saga.state == SagaState.SUCCEEDED
    found = effects(saga.id)
    assert found[("s2", "do")] == 2  # called twice, one key: the participant deduplicates
    assert set(found) == {(n, "do") for n in FIVE}


def test_failing_compensation_needs_manual_then_retry_now_finishes(
    celery_worker, wait_for, ops_user
):
    """A compensation that keeps failing escalates; an operator's retry finishes the ladder."""
    script = {"s3": ["business:declined"], "undo:s2": ["transient"] * 50}
    saga = settled(start(script).id, wait_for)
    assert saga.state == SagaState.NEEDS_MANUAL
    # The forward failure and the failing undo are separate facts.
    assert (saga.failed_step, saga.failure_code, saga.failed_undo) == ("s3", "declined", "s2")
    assert "transient" in saga.last_error
    assert (("s1", "undo")) not in effects(saga.id)  # the ladder waits for a person

    # The provider recovers; the operator retries.
    Saga.objects.filter(pk=saga.id).update(data={"script": {"s3": ["business:declined"]}})
    saga_retry_now(saga_id=saga.id, user=ops_user)
    saga = settled(saga.id, wait_for, states={SagaState.COMPENSATED})
    assert effects(saga.id) == {
        ("s1", "do"): 1,
        ("s2", "do"): 1,
        ("s2", "undo"): 1,
        ("s1", "undo"): 1,
    }
    retry = saga.events.get(kind="ops_retry")
    assert retry.actor == f"user:{ops_user.username}"


def test_duplicate_and_stale_deliveries_do_nothing_twice(celery_worker, wait_for):
    """The same message delivered three times, and a stale one later, cause one run."""
    with transaction.atomic():
        saga = saga_start(saga_type="test5", data={"script": {}})
        transaction.on_commit(lambda: [run_saga.delay(str(saga.id), 0) for _ in range(2)])
    saga = settled(saga.id, wait_for)
    assert saga.state == SagaState.SUCCEEDED
    events_before = saga.events.count()
    run_saga.delay(str(saga.id), 0)  # stale: an old version
    run_saga.delay(str(saga.id), saga.version)  # current version, but the saga is settled
    from sagas.runner import advance

    advance(saga.id, 0)
    advance(saga.id, saga.version)
    assert effects(saga.id) == {(n, "do"): 1 for n in FIVE}
    assert Saga.objects.get(pk=saga.id).events.count() == events_before
    assert Saga.objects.get(pk=saga.id).version == saga.version


def test_worker_killed_mid_step_still_settles_with_every_effect_once(worker_factory, wait_for):
    """SIGKILL after s3's effect, before its record: the lease expires, the sweeper rings, the
    retry repeats s3 under the same key, and the saga succeeds with each effect exactly once."""
    worker = worker_factory(exclusive=True, name="crashy")
    saga = start({"s3": ["crash"]})
    saga = settled(saga.id, wait_for, timeout=60, sweeping=True)
    assert saga.state == SagaState.SUCCEEDED
    found = effects(saga.id)
    assert {k for k in found if k[1] in ("do", "undo")} == {(n, "do") for n in FIVE}
    assert found[("s3", "do")] == 2  # the killed attempt and its retry, one key
    assert saga.steps.get(name="s3").attempts == 2
    assert "WorkerLostError" in worker.log_text() or "signal 9" in worker.log_text()


def test_lost_doorbell_is_picked_up_by_the_sweeper(worker_factory, wait_for):
    """A saga whose message was lost (purged from the broker) is found and rung by the sweeper."""
    worker = worker_factory(exclusive=True, name="sweepee")
    worker.pause_consuming()
    saga = start()
    lose_doorbells(1, wait_for)
    worker.resume_consuming()
    assert Saga.objects.get(pk=saga.id).state == SagaState.RUNNING
    assert Saga.objects.get(pk=saga.id).version == 0  # nobody claimed it
    saga = settled(saga.id, wait_for, sweeping=True)
    assert saga.state == SagaState.SUCCEEDED
    assert effects(saga.id) == {(n, "do"): 1 for n in FIVE}


def test_two_sweeps_at_once_ring_each_overdue_saga_once(worker_factory, wait_for, settings):
    """Two sweeps racing split the overdue sagas between them: none is rung twice."""
    worker = worker_factory(exclusive=True, name="sweeps")
    worker.pause_consuming()
    ids = [start().id for _ in range(20)]
    lose_doorbells(20, wait_for)
    from django.utils import timezone

    overdue = timezone.now() - _seconds(settings.SAGA_STUCK_AFTER + 5)
    Saga.objects.filter(id__in=ids).update(next_attempt_at=overdue)
    results: list[dict] = []
    barrier = threading.Barrier(2)

    def one_sweep():
        try:
            barrier.wait()
            results.append(sweep())
        finally:
            connections.close_all()

    threads = [threading.Thread(target=one_sweep) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r["redispatched"] for r in results) == 20
    worker.resume_consuming()
    wait_for(
        lambda: Saga.objects.filter(id__in=ids, state=SagaState.SUCCEEDED).count() == 20,
        describe=lambda: list(Saga.objects.filter(id__in=ids).values_list("state", flat=True)),
    )
    for saga_id in ids:
        assert effects(saga_id) == {(n, "do"): 1 for n in FIVE}


def _cut_publisher_connection() -> int:
    """Shut the sockets of the publisher's pooled broker connection, as a broker restart does
    (the pool hands the same connection to the next publish)."""
    import socket

    cut = 0
    with app.producer_or_acquire() as producer:
        connection_ = producer.connection
        connection_.ensure_connection()
        if connection_.transport.driver_type == "amqp":
            sockets = [connection_.connection.sock]
        else:  # redis: the channel's redis-py pool
            pool = producer.channel.pool
            sockets = [
                c._sock
                for c in [*pool._available_connections, *pool._in_use_connections]
                if c._sock is not None
            ]
        for sock in sockets:
            sock.shutdown(socket.SHUT_RDWR)
            cut += 1
    return cut


def test_the_sweeper_rings_through_a_broker_connection_that_died(
    worker_factory, wait_for, settings
):
    """After a broker restart cut the publisher's pooled connection, the sweeper's batch fails
    on it; its doorbells then go one by one over a reconnecting publish, and every saga runs.
    (py-amqp does not reconnect by itself: without the fallback they were all lost.)"""
    from django.utils import timezone

    worker = worker_factory(exclusive=True, name="redial")
    worker.pause_consuming()
    ids = [start().id for _ in range(3)]  # their doorbells leave a pooled connection behind
    lose_doorbells(3, wait_for)
    worker.resume_consuming()  # (through the connection about to be cut)
    overdue = timezone.now() - _seconds(settings.SAGA_STUCK_AFTER + 5)
    Saga.objects.filter(id__in=ids).update(next_attempt_at=overdue)
    assert _cut_publisher_connection() >= 1
    assert sweep()["redispatched"] == 3
    wait_for(
        lambda: Saga.objects.filter(id__in=ids, state=SagaState.SUCCEEDED).count() == 3,
        describe=lambda: list(Saga.objects.filter(id__in=ids).values_list("state", "version")),
    )


def _seconds(s: float):
    from datetime import timedelta

    return timedelta(seconds=s)


def test_deadline_passed_before_the_first_step_compensates_with_timed_out(celery_worker, wait_for):
    """A saga already past its deadline does nothing and ends compensated, timed_out."""
    saga = settled(start(deadline_seconds=0).id, wait_for)
    assert saga.state == SagaState.COMPENSATED
    assert saga.failure_code == "timed_out"
    assert effects(saga.id) == {}


def test_deadline_passed_mid_saga_undoes_what_took_effect(worker_factory, wait_for):
    """The deadline passes while s3 waits to retry: s3 (maybe done), s2 and s1 are undone."""
    from datetime import timedelta

    from django.utils import timezone

    # Long backoffs give the test a wide window in which s3 is waiting for its next attempt.
    worker_factory({"SAGA_BACKOFF_BASE": "2", "SAGA_BACKOFF_MAX": "4"}, exclusive=True, name="late")
    saga = start({"s3": ["transient"] * 50})
    wait_for(
        lambda: Saga.objects.filter(pk=saga.id, step_index=2, attempt__gte=1).exists(),
        describe=lambda: Saga.objects.filter(pk=saga.id).values("current_step", "attempt").first(),
    )
    # Time passes: the deadline is now behind us, and so is the retry's due time.
    Saga.objects.filter(pk=saga.id).update(
        deadline_at=timezone.now() - timedelta(seconds=1),
        next_attempt_at=timezone.now() - timedelta(seconds=60),
    )
    saga = settled(saga.id, wait_for, sweeping=True)
    assert saga.state == SagaState.COMPENSATED
    assert saga.failure_code == "timed_out"
    found = effects(saga.id)
    # s3 never took effect, but its outcome was unknown, so its undo ran as well.
    assert found == {
        ("s1", "do"): 1,
        ("s2", "do"): 1,
        ("s3", "undo"): 1,
        ("s2", "undo"): 1,
        ("s1", "undo"): 1,
    }
    assert [s for k, s in timeline(saga.id) if k == "compensation_succeeded"] == ["s3", "s2", "s1"]


def test_cancel_before_the_pivot_is_honoured_at_the_next_boundary(worker_factory, wait_for):
    """A cancel requested while the saga waits is honoured before the next step runs."""
    worker = worker_factory(exclusive=True, name="cancel")
    worker.pause_consuming()
    saga = start(saga_type="test_pivot")
    saga_request_cancel(saga_id=saga.id, reason="customer_cancelled", actor="test")
    worker.resume_consuming()
    saga = settled(saga.id, wait_for)
    assert saga.state == SagaState.COMPENSATED
    assert saga.failure_code == "customer_cancelled"
    assert effects(saga.id) == {}
    kinds = [k for k, _ in timeline(saga.id)]
    assert kinds.index("cancel_requested") < kinds.index("cancel_honoured")


def test_cancel_mid_flight_undoes_every_effect(worker_factory, wait_for):
    """A cancel accepted mid-flight leaves no effect without its undo, and nothing past s3."""
    # Backoffs of seconds: the saga stays before its pivot until the cancel lands, however
    # slow this process is (a cancel rings the saga at once, so the wait costs nothing).
    worker_factory({"SAGA_BACKOFF_BASE": "2", "SAGA_BACKOFF_MAX": "4"}, exclusive=True)
    saga = start({"s2": ["transient"] * 3 + ["ok"]}, saga_type="test_pivot")
    wait_for(lambda: Saga.objects.filter(pk=saga.id, current_step="s2", attempt__gte=1).exists())
    saga_request_cancel(saga_id=saga.id, reason="customer_cancelled", actor="test")
    saga = settled(saga.id, wait_for)
    assert saga.state == SagaState.COMPENSATED
    found = effects(saga.id)
    for step, kind in found:
        if kind == "do":
            assert (step, "undo") in found
    assert ("s4", "do") not in found


def test_cancel_after_the_pivot_is_refused(celery_worker, wait_for):
    """Once the pivot has run, a cancel is refused and the saga finishes forward."""
    saga = settled(start(saga_type="test_pivot").id, wait_for)
    with pytest.raises(SagaOperationRefused) as refused:
        saga_request_cancel(saga_id=saga.id, reason="customer_cancelled")
    assert refused.value.code in {"pivot_reached", "not_running"}
    # At the pivot itself (running, not yet settled) the refusal names the pivot.
    with transaction.atomic():
        waiting = saga_start(saga_type="test_pivot", data={})
        Saga.objects.filter(pk=waiting.pk).update(
            step_index=3, current_step="s4", version=99, next_attempt_at=None
        )
    with pytest.raises(SagaOperationRefused) as refused:
        saga_request_cancel(saga_id=waiting.id, reason="customer_cancelled")
    assert refused.value.code == "pivot_reached"


def test_step_failing_after_the_pivot_needs_a_person(celery_worker, wait_for):
    """Nothing before the pivot is undone once it ran: a later failure escalates instead."""
    saga = settled(start({"s5": ["business:broken"]}, saga_type="test_pivot").id, wait_for)
    assert saga.state == SagaState.NEEDS_MANUAL
    assert saga.failed_step == "s5"
    assert not [k for k in effects(saga.id) if k[1] == "undo"]


# ---------------------------------------------------------------------------------------------
# Ops operations
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def ops_user(transactional_db):
    user = User.objects.create_user("ops-alice", password="x", is_staff=True)
    user.groups.add(Group.objects.get(name="ops"))
    return User.objects.get(pk=user.pk)


@pytest.fixture
def plain_staff(transactional_db):
    return User.objects.create_user("staff-bob", password="x", is_staff=True)


def test_ops_operations_need_the_ops_permission(celery_worker, wait_for, plain_staff):
    """Staff without the ops permission can neither retry, compensate nor resolve."""
    saga = settled(start({"s2": ["business:no"], "undo:s1": ["transient"] * 50}).id, wait_for)
    assert saga.state == SagaState.NEEDS_MANUAL
    for op in (
        lambda: saga_retry_now(saga_id=saga.id, user=plain_staff),
        lambda: saga_compensate(saga_id=saga.id, user=plain_staff, reason="x"),
        lambda: saga_resolve(saga_id=saga.id, user=plain_staff, note="x"),
    ):
        with pytest.raises(PermissionDenied):
            op()
    assert Saga.objects.get(pk=saga.id).state == SagaState.NEEDS_MANUAL


def test_resolve_needs_a_note_and_a_saga_that_needs_manual(celery_worker, wait_for, ops_user):
    """Resolve is refused without a note or outside needs_manual; with both it closes the saga."""
    done = settled(start().id, wait_for)
    with pytest.raises(SagaOperationRefused):
        saga_resolve(saga_id=done.id, user=ops_user, note="fixed")
    stuck = settled(start({"s2": ["business:no"], "undo:s1": ["transient"] * 50}).id, wait_for)
    with pytest.raises(SagaOperationRefused) as refused:
        saga_resolve(saga_id=stuck.id, user=ops_user, note="  ")
    assert refused.value.code == "note_required"
    with pytest.raises(SagaOperationRefused) as refused:
        saga_resolve(saga_id=stuck.id, user=ops_user, note="refunded by hand in the provider")
    assert refused.value.code == "effects_in_place"
    assert refused.value.fields == {"accept_effects": ["s1 (_run has not run)"]}
    saga_resolve(
        saga_id=stuck.id,
        user=ops_user,
        note="refunded by hand in the provider",
        accept_effects=True,
    )
    stuck.refresh_from_db()
    assert stuck.state == SagaState.RESOLVED
    event = stuck.events.get(kind="ops_resolve")
    assert event.actor == "user:ops-alice" and "refunded by hand" in event.detail
    with pytest.raises(SagaOperationRefused):
        saga_retry_now(saga_id=stuck.id, user=ops_user)


def test_operator_compensation_and_plan(worker_factory, wait_for, ops_user):
    """The plan lists the undo of each effect, newest first; compensating runs exactly that."""
    # Attempts without end, so the saga is still running (retrying s3) when the operator acts:
    # with the default five, retries the worker already held (a paused consumer still runs
    # them) could use up the last attempts and compensate it first on a loaded machine.
    worker = worker_factory({"SAGA_MAX_ATTEMPTS": "100000"}, exclusive=True, name="ops")
    saga = start({"s3": ["transient"]})  # the last outcome repeats: s3 never succeeds
    wait_for(lambda: Saga.objects.get(pk=saga.id).attempt >= 2 or None)
    worker.pause_consuming()
    plan = saga_compensation_plan(saga_id=saga.id)
    assert [p["step"] for p in plan] == ["s3", "s2", "s1"]
    assert plan[0]["idempotency_key"] == f"saga:{saga.id}:s3:undo"
    worker.resume_consuming()
    with pytest.raises(SagaOperationRefused):
        saga_compensate(saga_id=saga.id, user=ops_user, reason="")
    saga_compensate(saga_id=saga.id, user=ops_user, reason="provider outage, customer informed")
    saga = settled(saga.id, wait_for)
    assert saga.state == SagaState.COMPENSATED
    assert saga.failure_code == "step_failed"
    assert [s for k, s in timeline(saga.id) if k == "compensation_succeeded"] == ["s3", "s2", "s1"]
    assert saga.events.get(kind="ops_compensate").actor == "user:ops-alice"
    assert saga_compensation_plan(saga_id=saga.id) == []


def test_engine_overhead_queries_per_step_are_pinned(celery_worker, wait_for, settings):
    """Claim once, then per step one record transaction: at most 3 engine queries per step."""
    from django.test.utils import CaptureQueriesContext

    from sagas.runner import advance
    from sagas.store import claim

    # All five steps in this one call, however slow the machine (the suite's budget is 0.5 s).
    settings.SAGA_INLINE_BUDGET = 60.0
    worker_saga = settled(start().id, wait_for)  # warm the worker path too
    assert worker_saga.state == SagaState.SUCCEEDED
    with transaction.atomic():
        saga = saga_start(saga_type="test5", data={"script": {}})
        out_of_workers_reach(saga.pk)  # the doorbell, or a pump, would race this run
    with CaptureQueriesContext(connection) as ctx:
        advance(saga.id, 1000)
    saga = Saga.objects.get(pk=saga.id)
    assert saga.state == SagaState.SUCCEEDED
    control = ("COMMIT", "BEGIN", "ROLLBACK", "SAVEPOINT", "RELEASE")
    statements = [q["sql"] for q in ctx.captured_queries if not q["sql"].startswith(control)]
    step_writes = [s for s in statements if "test_saga_effects" in s]
    engine = [s for s in statements if s not in step_writes]
    assert len(step_writes) == 5
    # 1 claim + 3 per step (saga row, step row, timeline events).
    assert len(engine) <= 1 + 3 * 5, "\n".join(x[:90] for x in engine)
    assert claim(saga.id, saga.version) is None  # settled: nothing to claim


NO_WAIT = "set_config('synchronous_commit', 'off', true)"


def _records_that_skip_the_wait(saga_type: str, script=None) -> tuple[str, list[bool]]:
    """Run a saga in this process, every step in one call (the worker kept out of its reach):
    its end state, and for each record after the claim whether its text makes its commit skip
    the wait for the disk (the claim decides as it runs: see the claim tests below)."""
    from django.test.utils import CaptureQueriesContext

    from sagas.runner import advance

    with transaction.atomic():
        saga = saga_start(saga_type=saga_type, data={"script": script or {}})
        out_of_workers_reach(saga.pk)
    with CaptureQueriesContext(connection) as ctx:
        advance(saga.id, 1000)
    writes = [q["sql"] for q in ctx.captured_queries if 'UPDATE "sagas_saga"' in q["sql"]]
    return Saga.objects.get(pk=saga.id).state, [NO_WAIT in sql for sql in writes[1:]]


@pytest.mark.parametrize("async_lease_commits", [True, False])
def test_only_commits_that_hand_the_saga_on_wait_for_the_disk(
    celery_worker, settings, async_lease_commits
):
    """With SAGA_ASYNC_LEASE_COMMITS, the claim and the records after which the task goes
    straight on skip the WAL flush wait; the terminal record waits. Off: every one waits.
    (Transactional steps, which never leave the database; unbatched, one record each.)"""
    settings.SAGA_ASYNC_LEASE_COMMITS = async_lease_commits
    settings.SAGA_INLINE_BUDGET = 60.0  # all five steps in this one call
    settings.SAGA_BATCH_STEPS = False
    state, no_wait = _records_that_skip_the_wait("test_tx")
    assert state == SagaState.SUCCEEDED
    assert no_wait == ([True] * 4 + [False] if async_lease_commits else [False] * 5)


def test_the_record_that_begins_the_compensation_waits_for_the_disk(celery_worker, settings):
    """Lost in a server crash, the record that turns a saga to its undo would leave it going
    forward over an undo that already ran (one that voided a hold, say): so it waits, though
    the task goes straight on; the undo's own records that go on do not."""
    settings.SAGA_INLINE_BUDGET = 60.0  # the failure and both undos in this one call
    settings.SAGA_BATCH_STEPS = False
    state, no_wait = _records_that_skip_the_wait("test_tx", {"s3": ["business:out_of_stock"]})
    assert state == SagaState.COMPENSATED
    # s1 and s2 go on, s3's no begins the undo, the undo of s2 goes on, that of s1 ends it.
    assert no_wait == [True, True, False, True, False]


def test_a_record_that_goes_on_into_a_step_that_may_leave_the_database_waits_for_the_disk(
    celery_worker, settings
):
    """A claim lost in a server crash would take the saga back to before a call that already
    left the database (and a cancel then would not undo it), so the record after which the task
    goes straight on into such a step (b: neither transactional, nor declared to stay in the
    database, nor a wait) waits for its flush; the one going on into c, declared to stay in
    the database, does not."""
    settings.SAGA_INLINE_BUDGET = 60.0  # all three steps in this one call
    state, no_wait = _records_that_skip_the_wait("test_mixed")
    assert state == SagaState.SUCCEEDED
    # a (on into b), b (on into c), c (the end)
    assert no_wait == [False, True, False]


def _commit_setting() -> str:
    """``synchronous_commit`` as the open transaction would commit with it now."""
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        return cursor.fetchone()[0]


def _commit_setting_after_claim(saga_id) -> str:
    """``synchronous_commit`` as the claim's own transaction would commit with it (the claim
    runs in an explicit transaction here, rolled back after the look)."""
    from sagas.store import claim

    with transaction.atomic():
        assert claim(saga_id, 1000) is not None
        setting = _commit_setting()
        transaction.set_rollback(True)
    return setting


@pytest.mark.parametrize(
    ("saga_type", "step", "state", "expected"),
    [
        ("test5", "s1", SagaState.RUNNING, "on"),  # may leave the database
        ("test5", "s3", SagaState.RUNNING, "on"),
        ("test_tx", "s1", SagaState.RUNNING, "off"),  # transactional
        ("test_mixed", "c", SagaState.RUNNING, "off"),  # stays in the database
        ("test_wait", "await_go", SagaState.RUNNING, "off"),  # a wait
        ("test5", "s1", SagaState.COMPENSATING, "off"),  # an undo runs again under its own key
    ],
)
def test_a_claim_waits_for_the_disk_only_before_a_step_that_may_leave_the_database(
    settings, saga_type, step, state, expected
):
    """The claim decides in its own statement, from the row it took, whether its commit
    waits; with SAGA_ASYNC_LEASE_COMMITS off every claim waits."""
    with transaction.atomic():
        saga = saga_start(saga_type=saga_type, data={"script": {}})
        out_of_workers_reach(saga.pk)
    Saga.objects.filter(pk=saga.pk).update(state=state, current_step=step)
    assert _commit_setting_after_claim(saga.pk) == expected
    settings.SAGA_ASYNC_LEASE_COMMITS = False
    assert _commit_setting_after_claim(saga.pk) == "on"


@pytest.mark.parametrize(("saga_type", "expected"), [("test5", "on"), ("test_tx", "off")])
def test_a_pumps_claim_waits_for_the_disk_only_before_a_step_that_may_leave_the_database(
    saga_type, expected
):
    """As a doorbell's claim does (above): a pump's, which picks the saga in the statement."""
    from datetime import timedelta

    from django.utils import timezone

    from sagas.store import claim_due

    with transaction.atomic():
        saga = saga_start(saga_type=saga_type, data={"script": {}})
        out_of_workers_reach(saga.pk)
    with transaction.atomic():
        # Due only inside this transaction: no worker's pump sees it, this claim does.
        past = timezone.now() - timedelta(seconds=60)
        Saga.objects.filter(pk=saga.pk).update(next_attempt_at=past, lease_until=None)
        claimed = claim_due()
        setting = _commit_setting()
        transaction.set_rollback(True)
    assert claimed is not None and claimed.pk == saga.pk
    assert setting == expected
