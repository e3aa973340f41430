"""Parked steps against real workers: ``Wait`` for a signal, ``Sleep`` as a durable timer.

Saga types come from :mod:`tests.sagas.sagatypes`: ``s1``, a ``Wait("go")`` step named
``await_go`` (``{"ok": false}`` is a business no), ``s2``; and ``s1``, ``Sleep(3)`` named
``nap``, ``s2``.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import Group, User
from django.core.exceptions import PermissionDenied
from django.db import connection, transaction
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from lab.stack import Stack, spare_port
from sagas.exceptions import SagaOperationRefused, SignalPayloadInvalid
from sagas.models import Saga, SagaSignal, SagaState, SagaStep, StepStatus
from sagas.services import saga_start
from sagas.signals import saga_signal
from tests.conftest import database_url_for, manage_shell
from tests.sagas.sagatypes import effects, ensure_effects_table
from tests.sagas.test_engine import settled, timeline

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _effects_table(transactional_db):
    ensure_effects_table()


@pytest.fixture
def ops_user(transactional_db) -> User:
    user = User.objects.create_user("ops-signaller", is_staff=True)
    user.groups.add(Group.objects.get(name="ops"))
    return User.objects.get(pk=user.pk)  # fresh permission cache


def start(saga_type: str) -> Saga:
    with transaction.atomic():
        return saga_start(saga_type=saga_type, data={})


def parked(saga_id, wait_for, step: str = "await_go") -> Saga:
    def check():
        saga = Saga.objects.get(pk=saga_id)
        return saga if saga.waiting_since is not None and saga.current_step == step else None

    return wait_for(
        check,
        timeout=60,
        describe=lambda: (
            Saga.objects.filter(pk=saga_id)
            .values("state", "current_step", "waiting_for", "version")
            .first()
        ),
    )


def test_a_saga_waits_gets_its_signal_and_a_duplicate_and_goes_on(
    celery_worker, wait_for, ops_user
):
    saga = parked(start("test_wait").id, wait_for)
    # Visibly waiting, and holding nothing: no lease, due only at its timeout.
    assert saga.state == SagaState.RUNNING and saga.waiting_for == "go"
    assert saga.lease_until is None
    assert saga.next_attempt_at > saga.waiting_since
    assert SagaStep.objects.get(saga=saga, name="await_go").status == StepStatus.WAITING

    first = saga_signal(saga_id=saga.id, name="go", payload={"note": "hi"}, key="k1", user=ops_user)
    again = saga_signal(saga_id=saga.id, name="go", payload={"note": "hi"}, key="k1", user=ops_user)
    assert not first.replayed and first.delivered_now
    assert again.replayed and again.signal.pk == first.signal.pk

    done = settled(saga.id, wait_for)
    assert done.state == SagaState.SUCCEEDED
    assert done.results["await_go"] == {"payload": {"note": "hi"}}
    assert done.waiting_for == "" and done.waiting_since is None
    assert effects(saga.id) == {("s1", "do"): 1, ("s2", "do"): 1}
    signal = SagaSignal.objects.get(saga=saga)  # one row for the key, consumed once
    assert signal.consumed_at is not None and signal.consumed_by == "await_go"
    kinds = [k for k, _ in timeline(saga.id)]
    assert kinds.count("ops_signal") == 1 and kinds.count("waiting") == 1

    # Past the wait: another signal is refused, a replay of the first is still a replay.
    with pytest.raises(SagaOperationRefused) as refused:
        saga_signal(saga_id=saga.id, name="go", payload={}, key="k2", user=ops_user)
    assert refused.value.code == "not_waiting"
    assert saga_signal(saga_id=saga.id, name="go", key="k1", user=ops_user).replayed


def test_a_wait_that_ends_early_gives_its_unused_time_back_to_the_deadline(
    celery_worker, wait_for, ops_user
):
    """Parking moves the deadline by the whole timeout (120 s); the signal ends the wait early,
    and the deadline keeps only the time the wait took (SAGA_DEADLINE bounds working time)."""
    saga = parked(start("test_wait").id, wait_for)
    moved = saga.deadline_at
    assert moved - saga.created_at > timedelta(seconds=settings.SAGA_DEADLINE + 119)
    signalled = timezone.now()
    saga_signal(saga_id=saga.id, name="go", payload={}, user=ops_user)
    done = settled(saga.id, wait_for)
    assert done.state == SagaState.SUCCEEDED
    # Given back: the timeout's end minus the moment the worker ended the wait, which lies
    # between the signal and the saga's end.
    end_of_wait = saga.waiting_since + timedelta(seconds=120)
    assert moved - (end_of_wait - signalled) <= done.deadline_at
    assert done.deadline_at <= moved - (end_of_wait - done.finished_at)


def test_a_signal_sent_before_the_wait_is_kept_and_consumed_on_arrival(
    celery_worker, wait_for, ops_user
):
    with transaction.atomic():
        saga = saga_start(saga_type="test_wait", data={})
        early = saga_signal(saga_id=saga.id, name="go", payload={"early": True}, user=ops_user)
    assert not early.delivered_now  # kept: the saga is still at s1
    done = settled(saga.id, wait_for)
    assert done.state == SagaState.SUCCEEDED
    assert done.results["await_go"] == {"payload": {"early": True}}
    # It never parked: the signal was there when it arrived.
    assert "waiting" not in [k for k, _ in timeline(saga.id)]


def test_a_rejecting_signal_compensates(celery_worker, wait_for, ops_user):
    saga = parked(start("test_wait").id, wait_for)
    saga_signal(saga_id=saga.id, name="go", payload={"ok": False}, user=ops_user)
    done = settled(saga.id, wait_for)
    assert done.state == SagaState.COMPENSATED and done.failure_code == "rejected"
    assert effects(saga.id) == {("s1", "do"): 1, ("s1", "undo"): 1}
    assert SagaSignal.objects.get(saga=saga).consumed_at is not None


def test_signal_permissions_payload_and_names(celery_worker, wait_for, ops_user):
    saga = start("test_wait")
    nobody = User.objects.create_user("not-ops", is_staff=True)
    with pytest.raises(PermissionDenied):
        saga_signal(saga_id=saga.id, name="go", user=nobody)
    with pytest.raises(SignalPayloadInvalid):
        saga_signal(saga_id=saga.id, name="go", payload={"ok": "yes"}, user=ops_user)
    with pytest.raises(SignalPayloadInvalid):
        saga_signal(saga_id=saga.id, name="go", payload=["not", "an", "object"], user=ops_user)
    with pytest.raises(SagaOperationRefused) as unknown:
        saga_signal(saga_id=saga.id, name="nope", user=ops_user)
    assert unknown.value.code == "unknown_signal"
    # Parked on the wait, and no worker takes the first signal's doorbell until the second
    # signal was refused: a worker that delivered it first would end the wait, and the second
    # would be refused as not_waiting instead (CI saw that on a loaded machine).
    wait_for(lambda: Saga.objects.get(pk=saga.id).waiting_since is not None)
    celery_worker.pause_consuming()
    try:
        saga_signal(saga_id=saga.id, name="go", key="a", user=ops_user)
        with pytest.raises(SagaOperationRefused) as pending:
            saga_signal(saga_id=saga.id, name="go", key="b", user=ops_user)
        assert pending.value.code == "already_signalled"
    finally:
        celery_worker.resume_consuming()
    assert settled(saga.id, wait_for).state == SagaState.SUCCEEDED


def test_a_wait_timeout_compensates_as_declared(celery_worker, wait_for, ops_user):
    saga = start("test_wait_compensate")
    done = settled(saga.id, wait_for, sweeping=True)
    assert done.state == SagaState.COMPENSATED and done.failure_code == "timed_out"
    assert done.failed_step == "await_go" and done.waiting_since is None
    assert effects(saga.id) == {("s1", "do"): 1, ("s1", "undo"): 1}
    assert ("wait_timed_out", "await_go") in timeline(saga.id)
    with pytest.raises(SagaOperationRefused):
        saga_signal(saga_id=saga.id, name="go", user=ops_user)


def test_a_wait_timeout_escalates_as_declared_and_a_person_can_still_signal(
    celery_worker, wait_for, ops_user
):
    saga = start("test_wait_escalate")
    stuck = settled(saga.id, wait_for, sweeping=True)
    assert stuck.state == SagaState.NEEDS_MANUAL and stuck.failed_step == "await_go"
    assert effects(saga.id) == {("s1", "do"): 1}  # nothing undone: a person decides
    outcome = saga_signal(saga_id=saga.id, name="go", payload={"by": "analyst"}, user=ops_user)
    assert outcome.delivered_now
    done = settled(saga.id, wait_for, states={SagaState.SUCCEEDED, SagaState.COMPENSATED})
    assert done.state == SagaState.SUCCEEDED
    assert done.results["await_go"] == {"payload": {"by": "analyst"}}


def test_a_waiting_saga_holds_no_worker(worker_factory, wait_for, ops_user):
    """With one worker process, other sagas run to the end while one waits."""
    worker_factory(name="solo", concurrency=1, exclusive=True)
    waiting = parked(start("test_wait").id, wait_for)
    others = [start("test5").id for _ in range(3)]
    for saga_id in others:
        assert settled(saga_id, wait_for).state == SagaState.SUCCEEDED
    assert Saga.objects.get(pk=waiting.id).waiting_for == "go"  # still parked meanwhile
    saga_signal(saga_id=waiting.id, name="go", user=ops_user)
    assert settled(waiting.id, wait_for).state == SagaState.SUCCEEDED


def test_a_cancel_while_waiting_compensates_at_once(celery_worker, wait_for):
    from sagas.services import saga_request_cancel

    saga = parked(start("test_wait").id, wait_for)
    saga_request_cancel(saga_id=saga.id, reason="customer_cancelled")
    done = settled(saga.id, wait_for)
    assert done.state == SagaState.COMPENSATED and done.failure_code == "customer_cancelled"
    assert done.waiting_for == ""


STARTER = """
from django.db import transaction
from sagas.services import saga_start
with transaction.atomic():
    print(saga_start(saga_type="test_sleep", data={}).id)
"""


def test_a_timer_survives_a_broker_restart_and_a_worker_kill(django_db_setup, wait_for):
    """The sleep's doorbell dies with the broker and its worker; the database fires it, through
    the sweeper as production runs it: beat's periodic task, sent over this stack's broker."""
    from sagas.apps import SWEEP_TASK_NAME, _ensure_sweep_schedule

    # The schedule migrate made is gone with an earlier test's flush: made again, at the
    # session's SAGA_SWEEP_INTERVAL.
    PeriodicTask.objects.filter(name=SWEEP_TASK_NAME).delete()
    _ensure_sweep_schedule()
    queue = f"timer-{uuid.uuid4().hex[:8]}"
    log_dir = Path(tempfile.mkdtemp(prefix="sagarunner-timer-"))
    env = {
        **os.environ,
        "DATABASE_URL": database_url_for(connection.settings_dict),
        "CELERY_QUEUE": queue,
        "PYTHONUNBUFFERED": "1",
    }
    stack = Stack(env=env, log_dir=log_dir, queue=queue)
    try:
        env["CELERY_BROKER_URL"] = stack.start_redis(spare_port())
        worker = stack.start_worker("w", concurrency=1)
        wait_for(lambda: "ready" in worker.log_tail(20000), timeout=90, describe=worker.log_tail)
        stack.start_beat()
        # Started from a process of this stack's own, so its doorbell goes to this broker.
        saga_id = manage_shell(env, STARTER).strip().splitlines()[-1]
        saga = parked(saga_id, wait_for, step="nap")
        assert saga.waiting_for == "" and saga.next_attempt_at > saga.waiting_since
        # The countdown doorbell is held by the worker and stored in the broker: lose both.
        worker.kill()
        stack.stop_redis()
        stack.start_redis()
        worker = stack.start_worker("w", concurrency=1)
        done = settled(saga_id, wait_for, timeout=90)
        assert done.state == SagaState.SUCCEEDED, stack.procs[-1].log_tail()
        assert effects(saga_id) == {("s1", "do"): 1, ("s2", "do"): 1}
        events = list(Saga.objects.get(pk=saga_id).events.order_by("id").values_list("kind", "at"))
        waiting_at = next(at for kind, at in events if kind == "waiting")
        woke_at = next(at for kind, at in events if kind == "step_succeeded" and at > waiting_at)
        assert (woke_at - waiting_at).total_seconds() >= 3  # it slept, it did not skip the timer
    finally:
        stack.close()


def test_sleep_without_a_broker_loss_wakes_on_its_doorbell(celery_worker, wait_for):
    saga = start("test_sleep")
    parked(saga.id, wait_for, step="nap")
    done = settled(saga.id, wait_for)  # no sweeping here: the countdown doorbell wakes it
    assert done.state == SagaState.SUCCEEDED and done.results["nap"] == {"slept": True}


def _start_scripted(saga_type: str, script: dict) -> Saga:
    with transaction.atomic():
        return saga_start(saga_type=saga_type, data={"script": script})


def test_a_timer_whose_action_fails_once_is_retried_without_sleeping_again(celery_worker, wait_for):
    """The retry runs the action again: one wait, one deadline extension, attempts counted."""
    saga = _start_scripted("test_sleep_flaky", {"nap": ["transient", "ok"]})
    at_park = parked(saga.id, wait_for, step="nap")
    done = settled(saga.id, wait_for)
    assert done.state == SagaState.SUCCEEDED
    kinds = [k for k, _ in timeline(saga.id)]
    assert kinds.count("waiting") == 1 and kinds.count("step_retry") == 1, kinds
    assert done.deadline_at == at_park.deadline_at  # moved on once, when it parked
    assert SagaStep.objects.get(saga=saga, name="nap").attempts == 2
    assert effects(saga.id) == {("s1", "do"): 1, ("nap", "do"): 1, ("s2", "do"): 1}


def test_a_timer_whose_action_keeps_failing_exhausts_its_attempts(celery_worker, wait_for):
    """Arriving afresh at every retry would give the attempts back and sleep for ever."""
    saga = _start_scripted("test_sleep_flaky", {"nap": ["transient"]})
    done = settled(saga.id, wait_for)
    assert done.state == SagaState.COMPENSATED and done.failed_step == "nap"
    kinds = [k for k, _ in timeline(saga.id)]
    assert kinds.count("waiting") == 1 and kinds.count("step_retry") == 2, kinds
    assert effects(saga.id) == {("s1", "do"): 1, ("s1", "undo"): 1}


def test_a_decision_that_fails_once_is_retried_with_the_same_signal(
    celery_worker, wait_for, ops_user
):
    started = _start_scripted("test_wait_flaky", {"await_go": ["transient", "ok"]})
    saga = parked(started.id, wait_for)
    saga_signal(saga_id=saga.id, name="go", payload={"note": "once"}, user=ops_user)
    done = settled(saga.id, wait_for)
    assert done.state == SagaState.SUCCEEDED
    assert done.results["await_go"] == {"payload": {"note": "once"}}
    kinds = [k for k, _ in timeline(saga.id)]
    assert kinds.count("waiting") == 1 and kinds.count("step_retry") == 1, kinds
    signal = SagaSignal.objects.get(saga=saga)
    assert signal.consumed_at is not None and signal.consumed_by == "await_go"
