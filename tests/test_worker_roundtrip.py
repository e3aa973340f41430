"""A Celery round trip through Redis and a real worker process (the harness itself)."""

import uuid

import pytest
from django.contrib.auth.models import Group

from config.tasks import ping_db
from lab.supervisor import pid_alive

pytestmark = pytest.mark.worker


@pytest.mark.django_db(transaction=True)
def test_task_sent_through_redis_is_executed_by_the_real_worker(celery_worker, wait_for):
    """A task sent through the broker runs in the worker process and its row is committed."""
    marker = f"roundtrip-{uuid.uuid4().hex}"

    ping_db.delay(marker)

    wait_for(
        lambda: Group.objects.filter(name=marker).exists(),
        timeout=30,
        describe=lambda: list(Group.objects.values_list("name", flat=True)),
    )
    assert celery_worker.alive


@pytest.mark.django_db(transaction=True)
def test_extra_worker_can_be_started_exclusively_and_killed(worker_factory, wait_for):
    """An extra worker with its own env takes the queue's tasks, and kill() ends its group."""
    worker = worker_factory({"SAGA_FAULTS": ""}, exclusive=True)
    children = worker.child_pids()
    assert children, "a prefork worker has pool processes"
    marker = f"extra-{uuid.uuid4().hex}"

    ping_db.delay(marker)
    wait_for(lambda: Group.objects.filter(name=marker).exists(), timeout=30)

    worker.kill()
    assert not worker.alive
    wait_for(
        lambda: not any(pid_alive(pid) for pid in children),
        timeout=10,
        describe=lambda: [pid for pid in children if pid_alive(pid)],
    )
