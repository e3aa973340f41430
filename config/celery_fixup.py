"""Celery's Django fix-up, with the worker's database connections kept across tasks.

Celery's own fix-up closes every database connection before and after every task, whatever
``CONN_MAX_AGE`` says (upstream honoured the setting for a while and reverted it: a worker
that forked with an open connection, or never noticed a dead one, broke in confusing ways).
Its escape hatch, ``CELERY_DB_REUSE_MAX``, recycles after a number of tasks and never
health-checks, so a connection the server dropped between tasks fails the next task.

This fix-up keeps everything Celery's does (``django.setup()`` before the tasks are imported,
the fork-safe close in each new pool process, closing caches) and only changes what happens
around a task: Django's ``close_old_connections()``, exactly what Django runs around every
HTTP request. It closes a connection that outlived ``CONN_MAX_AGE``, that had an error, or that
was left in a transaction, and re-arms ``CONN_HEALTH_CHECKS`` so the task's first query
checks the connection and reconnects if the server dropped it (restart,
``pg_terminate_backend``, idle timeout). So a connection is only ever replaced between tasks,
never in the middle of one, and a worker keeps one connection per pool process (or per pool
thread) instead of opening one per task: a backend fork and an authentication per task was
most of what a short task cost, and a storm of connections for PostgreSQL in production.
"""

from __future__ import annotations

from typing import Any

from celery.fixups.django import DjangoFixup, DjangoWorkerFixup


class ReusingDjangoWorkerFixup(DjangoWorkerFixup):
    """Between tasks, close only connections Django itself would close between requests."""

    def close_database(self, **kwargs: Any) -> None:
        from django.db import close_old_connections

        close_old_connections()


class ReusingDjangoFixup(DjangoFixup):
    @property
    def worker_fixup(self) -> DjangoWorkerFixup:
        if self._worker_fixup is None:
            self._worker_fixup = ReusingDjangoWorkerFixup(self.app)
        return self._worker_fixup

    @worker_fixup.setter
    def worker_fixup(self, value: DjangoWorkerFixup) -> None:
        self._worker_fixup = value


def fixup(app: Any) -> DjangoFixup:
    """Installed instead of ``celery.fixups.django:fixup`` (``Celery(fixups=[...])``)."""
    return ReusingDjangoFixup(app).install()
