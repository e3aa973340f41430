"""Workers keep their database connection across tasks, and replace a dead one between tasks.

Each effect a scripted step writes records the PostgreSQL backend (``pg_backend_pid()``) of the
connection it ran on, so a test can tell one connection reused from one opened per task.
"""

from __future__ import annotations

import pytest
from django.db import connection, transaction

from sagas.models import Saga, SagaState
from sagas.services import saga_start
from tests.sagas.sagatypes import backends, ensure_effects_table

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _effects_table(transactional_db):
    ensure_effects_table()


def _start() -> Saga:
    with transaction.atomic():
        return saga_start(saga_type="test5", data={"script": {}})


def _succeeded(saga_ids, wait_for) -> None:
    wait_for(
        lambda: (
            Saga.objects.filter(id__in=saga_ids, state=SagaState.SUCCEEDED).count() == len(saga_ids)
        ),
        timeout=60,
        describe=lambda: list(
            Saga.objects.filter(id__in=saga_ids).values_list("state", "current_step", "attempt")
        ),
    )


def _backend_alive(pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid])
        return cursor.fetchone() is not None


@pytest.mark.parametrize(("pool", "concurrency"), [("prefork", 2), ("threads", 2), ("threads", 8)])
def test_many_tasks_run_on_one_connection_per_pool_process(
    worker_factory, wait_for, pool, concurrency
):
    """Forty sagas (forty tasks or more, 200 step writes) on a worker of N pool processes (or
    threads) use at most N backends: a connection per pool slot, not one per task."""
    worker_factory(exclusive=True, concurrency=concurrency, pool=pool)
    ids = []
    for _ in range(4):
        batch = [_start().id for _ in range(10)]
        _succeeded(batch, wait_for)  # in waves, so the tasks cannot all run at once
        ids += batch

    used = backends(ids)
    assert 1 <= len(used) <= concurrency, f"{len(used)} backends for {len(ids)} sagas"


def test_connection_killed_by_the_server_between_tasks_costs_no_saga(worker_factory, wait_for):
    """The server drops the worker's connection (``pg_terminate_backend``) while it is idle:
    the next task notices before its first statement, reconnects, and its saga runs as if
    nothing happened (no retry, no error in the worker's log)."""
    worker = worker_factory(exclusive=True, concurrency=1)
    first = _start()
    _succeeded([first.id], wait_for)
    # Between tasks: the saga is done before its task is (a pump looks for more work after).
    worker.wait_idle()
    (old,) = backends([first.id])

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [old])
        assert cursor.fetchone()[0] is True
    wait_for(lambda: not _backend_alive(old), timeout=30)

    second = _start()
    _succeeded([second.id], wait_for)
    (new,) = backends([second.id])
    assert new != old
    saga = Saga.objects.get(pk=second.id)
    assert list(saga.steps.values_list("attempts", flat=True)) == [1] * 5
    assert not saga.events.filter(kind__in=["step_retry", "step_failed"]).exists()
    log = worker.log_text()
    assert "OperationalError" not in log and "ERROR" not in log, log[-3000:]
