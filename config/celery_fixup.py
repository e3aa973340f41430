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
was left in a transaction; then, for ``CONN_HEALTH_CHECKS``, it closes one the server dropped
while it was idle (restart, ``pg_terminate_backend``, idle timeout), so the task's first query
reconnects. So a connection is only ever replaced between tasks,
never in the middle of one, and a worker keeps one connection per pool process (or per pool
thread) instead of opening one per task: a backend fork and an authentication per task was
most of what a short task cost, and a storm of connections for PostgreSQL in production.
"""

from __future__ import annotations

import select
from typing import Any

from celery.fixups.django import DjangoFixup, DjangoWorkerFixup


class ReusingDjangoWorkerFixup(DjangoWorkerFixup):
    """Between tasks, close only connections Django itself would close between requests."""

    def close_database(self, **kwargs: Any) -> None:
        from django.db import close_old_connections, connections

        close_old_connections()
        for conn in connections.all(initialized_only=True):
            _health_check_without_a_round_trip(conn)


def _health_check_without_a_round_trip(conn: Any) -> None:
    """``CONN_HEALTH_CHECKS`` for an idle PostgreSQL connection, by looking at its socket.

    Django checks with a ``SELECT 1`` round trip before the first query; for a worker that is
    one more round trip per task. An idle connection has nothing to read unless the server
    spoke first, and a server that drops a connection (``pg_terminate_backend``, a restart,
    ``idle_session_timeout``) says so (a FATAL message, then end of file): a readable socket
    means "close it", and the task's first query opens a new one. A silent network failure
    escapes both checks alike (the query then fails and the sweeper re-rings the saga).
    """
    if (
        conn.vendor != "postgresql"
        or conn.connection is None
        or not conn.health_check_enabled
        or conn.health_check_done
    ):
        return
    try:
        readable, _, _ = select.select([conn.connection.fileno()], [], [], 0)
    except Exception:  # noqa: BLE001 - already closed on our side: reconnect
        readable = [True]
    if readable:
        conn.close()
    else:
        conn.health_check_done = True


class ReusingDjangoFixup(DjangoFixup):
    _worker_fixup: DjangoWorkerFixup | None  # set by DjangoFixup.__init__ (celery has no types)

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
