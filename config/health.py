"""``GET /healthz``: is this process able to reach the database and the broker right now?

Both checks run side by side and share one short deadline, so a load balancer or an
orchestrator gets an answer in about :data:`CHECK_TIMEOUT` seconds even when a dependency is
black-holed. The body names each component; details of a failure go to the log, not to the
(unauthenticated) response.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable

import structlog
from django.conf import settings
from django.db import connections
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from kombu import Connection

from config.api_errors import json_response, read_only_endpoint
from config.recent import Recent

CHECK_TIMEOUT = 2.0

logger = structlog.get_logger(__name__)


def check_database() -> None:
    """Run ``SELECT 1`` on a connection of this (worker) thread, then close it."""
    connection = connections["default"]
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    finally:
        connection.close()


def check_broker() -> None:
    """Open a connection to the configured broker (redis://, amqp://, filesystem://...)."""
    with Connection(
        settings.CELERY_BROKER_URL,
        connect_timeout=CHECK_TIMEOUT,
        transport_options=dict(settings.CELERY_BROKER_TRANSPORT_OPTIONS),
    ) as conn:
        conn.ensure_connection(
            max_retries=1, interval_start=0, interval_step=0.2, timeout=CHECK_TIMEOUT
        )


CHECKS: dict[str, Callable[[], None]] = {"database": check_database, "broker": check_broker}


def run_checks(timeout: float = CHECK_TIMEOUT) -> dict[str, str]:
    """Return ``{component: "ok" | "unavailable" | "timeout"}``."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(CHECKS))
    try:
        futures = {name: pool.submit(check) for name, check in CHECKS.items()}
        concurrent.futures.wait(futures.values(), timeout=timeout)
        results = {}
        for name, future in futures.items():
            if not future.done():
                results[name] = "timeout"
                logger.warning("healthz.check_timeout", component=name, timeout=timeout)
            elif (exc := future.exception()) is not None:
                results[name] = "unavailable"
                logger.warning("healthz.check_failed", component=name, error=repr(exc))
            else:
                results[name] = "ok"
        return results
    finally:
        # Do not wait for a hung check: its thread ends on its own connect timeout.
        pool.shutdown(wait=False, cancel_futures=True)


#: How long one process reuses its last answer: /healthz is open to anyone, and each check
#: opens a database connection and a broker connection of its own.
REUSE_SECONDS = 1.0
_recent: Recent[dict[str, str]] = Recent(lambda: REUSE_SECONDS)


def _where() -> tuple:
    """What the answer is about: the broker and database it checked."""
    db = connections.settings["default"]
    return (settings.CELERY_BROKER_URL, db.get("HOST"), db.get("PORT"), db.get("NAME"))


def current_results() -> dict[str, str]:
    """:func:`run_checks`' answer, fresh or at most :data:`REUSE_SECONDS` old (one check at a
    time per process)."""
    return _recent.get(run_checks, key=_where())


@never_cache
@read_only_endpoint
def healthz(request: HttpRequest) -> JsonResponse:
    results = current_results()
    healthy = all(value == "ok" for value in results.values())
    body: dict[str, str | list[str]] = {"status": "ok" if healthy else "unavailable", **results}
    if not healthy:
        body["down"] = sorted(name for name, value in results.items() if value != "ok")
    return json_response(body, 200 if healthy else 503)
