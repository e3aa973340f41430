"""Beat's housekeeping tasks (the saga and webhook sweeps, purges): a missed run is one line.

Each of them is idempotent and runs again at the next tick, which picks up whatever this one
would have done. So a run that cannot reach the database (a restart, a failover, a network
blip) or gives up on a lock is not worth an ERROR with a traceback in the worker's log, as
Celery writes for any task that raises: it is one WARNING line naming the task and the
database's own words, and the task ends normally. Any other exception is a bug and still
raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import structlog
from django.db import InterfaceError, OperationalError, connections

log = structlog.get_logger("periodic")


@contextmanager
def missed_run_is_one_line(task: str) -> Iterator[None]:
    """Run the body; on a database that cannot be reached (or a lock that cannot be taken),
    log ``periodic.missed`` once and return normally. The broken connection is closed, so the
    next run connects afresh."""
    try:
        yield
    except (OperationalError, InterfaceError) as error:
        reason = (str(error).strip().splitlines() or [""])[0]
        log.warning(
            "periodic.missed",
            task=task,
            error=f"{type(error).__name__}: {reason}",
            next="runs again at its next beat tick",
        )
        for conn in connections.all(initialized_only=True):
            conn.close_if_unusable_or_obsolete()


def ensure_periodic_task(
    name: str,
    task: str,
    every: int,
    period: str,
    description: str,
    *,
    apply_interval: bool = False,
) -> None:
    """Create beat's schedule for ``task`` once, under ``name`` (run from ``post_migrate``);
    after that it belongs to the ops console (but see ``apply_interval``). ``period`` is one of
    django-celery-beat's ``IntervalSchedule`` periods (``"seconds"``, ``"minutes"``, ...).

    ``apply_interval``: the interval was configured explicitly (an environment variable), so an
    existing task is moved to it, one ``periodic.interval_applied`` line saying from what; a
    configured value that changed nothing on a database that already had the task would be a
    knob that does nothing.

    Not in CELERY_BEAT_SCHEDULE on purpose: beat would overwrite an interval that staff changed
    in the admin each time it starts.
    """
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    existing = PeriodicTask.objects.filter(name=name).select_related("interval").first()
    if existing is not None and not apply_interval:
        return
    # Not get_or_create: the table has no unique constraint, and staff may have made twins of
    # an interval in the console (get_or_create would then raise, and stop every migrate).
    same = IntervalSchedule.objects.filter(every=every, period=period).order_by("pk")
    schedule = same.first() or IntervalSchedule.objects.create(every=every, period=period)
    if existing is None:
        PeriodicTask.objects.create(
            name=name, task=task, interval=schedule, description=description
        )
    elif existing.interval_id != schedule.pk:
        was = str(existing.interval) if existing.interval is not None else "another schedule"
        # save() tells beat the schedule changed (django-celery-beat's PeriodicTasks row).
        existing.interval, existing.crontab, existing.solar, existing.clocked = (
            schedule,
            None,
            None,
            None,
        )
        existing.save()
        log.info("periodic.interval_applied", task=name, was=was, now=str(schedule))
