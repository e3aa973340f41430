"""The sweeper's schedule: created once, then the ops console's, unless ``SAGA_SWEEP_INTERVAL``
is set, which every migrate applies (a configured knob that changed nothing on a database that
already had the schedule was a knob that did nothing)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from django.test import override_settings
from django_celery_beat.models import IntervalSchedule, PeriodicTask

from sagas.apps import SWEEP_TASK_NAME, _ensure_sweep_schedule
from tests.conftest import REPO_ROOT, _worker_env


def interval() -> tuple[int, str]:
    schedule = PeriodicTask.objects.select_related("interval").get(name=SWEEP_TASK_NAME).interval
    return schedule.every, schedule.period


def console_sets(every: int) -> None:
    """What staff do in the ops console: the task moved to another interval."""
    schedule, _ = IntervalSchedule.objects.get_or_create(every=every, period="seconds")
    PeriodicTask.objects.filter(name=SWEEP_TASK_NAME).update(interval=schedule)


@pytest.mark.django_db
def test_unset_the_interval_staff_chose_in_the_console_stays():
    console_sets(45)
    with override_settings(SAGA_SWEEP_INTERVAL=10.0, SAGA_SWEEP_INTERVAL_SET=False):
        _ensure_sweep_schedule()
    assert interval() == (45, "seconds")


@pytest.mark.django_db
def test_set_the_interval_is_applied_to_the_existing_schedule():
    console_sets(45)
    with override_settings(SAGA_SWEEP_INTERVAL=3.0, SAGA_SWEEP_INTERVAL_SET=True):
        _ensure_sweep_schedule()
    assert interval() == (3, "seconds")
    with override_settings(SAGA_SWEEP_INTERVAL=0.25, SAGA_SWEEP_INTERVAL_SET=True):
        _ensure_sweep_schedule()
    assert interval() == (250_000, "microseconds")


@pytest.mark.django_db(transaction=True)
def test_migrate_with_the_variable_set_moves_the_sweep_of_an_existing_database():
    """As an operator runs it: ``SAGA_SWEEP_INTERVAL=3 manage.py migrate`` on a database whose
    sweep ran every 45 s. Before, the schedule kept its 45 s."""
    console_sets(45)
    done = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--verbosity", "0"],
        cwd=REPO_ROOT,
        env=_worker_env({"SAGA_SWEEP_INTERVAL": "3"}),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert interval() == (3, "seconds")
    assert "periodic.interval_applied" in done.stdout + done.stderr


@pytest.mark.django_db
def test_twin_intervals_made_in_the_console_do_not_stop_a_migrate():
    """django-celery-beat's intervals have no unique constraint: staff can make two of "3
    seconds". Applying the variable then picked one, where get_or_create raised
    MultipleObjectsReturned on every migrate."""
    for _ in range(2):
        IntervalSchedule.objects.create(every=3, period="seconds")
    console_sets(45)
    with override_settings(SAGA_SWEEP_INTERVAL=3.0, SAGA_SWEEP_INTERVAL_SET=True):
        _ensure_sweep_schedule()
    assert interval() == (3, "seconds")


@pytest.mark.django_db
def test_the_webhook_sweep_takes_its_variable_the_same_way():
    """WEBHOOKS_SWEEP_INTERVAL likewise only took effect on a database without the task."""
    from webhooks.apps import SWEEP_TASK_NAME as WEBHOOK_SWEEP
    from webhooks.apps import _ensure_schedules

    def webhook_interval() -> tuple[int, str]:
        task = PeriodicTask.objects.select_related("interval").get(name=WEBHOOK_SWEEP)
        return task.interval.every, task.interval.period

    schedule, _ = IntervalSchedule.objects.get_or_create(every=45, period="seconds")
    PeriodicTask.objects.filter(name=WEBHOOK_SWEEP).update(interval=schedule)
    with override_settings(WEBHOOKS_SWEEP_INTERVAL=10.0, WEBHOOKS_SWEEP_INTERVAL_SET=False):
        _ensure_schedules()
    assert webhook_interval() == (45, "seconds")
    with override_settings(WEBHOOKS_SWEEP_INTERVAL=7.0, WEBHOOKS_SWEEP_INTERVAL_SET=True):
        _ensure_schedules()
    assert webhook_interval() == (7, "seconds")
