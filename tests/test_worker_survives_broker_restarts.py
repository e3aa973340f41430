"""A Celery worker's main process outlives pool kills during broker restarts.

The sequence that took ``make run`` down: pool processes die (SIGKILL) while the Redis broker
restarts, again and again. On reconnect the worker registers its pool with the event loop
again; a pool process it had already stopped watching made celery's prefork pool call
``hub.add_reader(None)`` ("Unrecoverable error: ValueError('file descriptor is None')") and the
main process exited. ``config/celery_patches.py`` fixes that; this test runs the sequence
against a real worker and a private ``redis-server`` (never the shared one) and fails
without the fix.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.db import connection

from lab.stack import Proc, Stack, stack_env, wait_until
from tests.conftest import database_url_for

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

ROUNDS = 8


@pytest.fixture
def stack(tmp_path: Path):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    stack = Stack(env={}, log_dir=tmp_path, queue=f"survive-{uuid.uuid4().hex[:8]}")
    metrics = tmp_path / "metrics"
    metrics.mkdir()
    stack.env = stack_env(
        database_url=database_url_for(connection.settings_dict),
        broker_url="redis://127.0.0.1:1/0",
        queue=stack.queue,
        metrics_dir=metrics,
    )
    stack.env["CELERY_BROKER_URL"] = stack.start_redis()
    yield stack
    stack.close()


def _connected(worker: Proc) -> int:
    return worker.log_tail(10**7).count("Connected to redis://")


def _make_run_worker(stack: Stack) -> Proc:
    """The worker exactly as ``make run`` starts it (gossip, mingle and heartbeat included)."""
    argv = [sys.executable, "-m", "celery", "-A", "config", "worker", "-l", "info"]
    argv += ["--concurrency", "2", "-Q", stack.queue, "-n", f"survivor.{os.getpid()}@%h"]
    proc = Proc("survivor", argv, stack.env, stack.log_dir / "worker.log").start()
    stack._remember(proc)
    return proc


def test_worker_main_process_survives_pool_kills_during_broker_restarts(stack):
    """Each round: SIGKILL every pool process, crash the broker, start it again; the worker
    reconnects and refills its pool. After every round the same main process is alive and its
    log has no unrecoverable error."""
    worker = _make_run_worker(stack)
    wait_until(lambda: len(worker.children()) == 2 or not worker.alive, 90, "the worker's pool")
    # Its consumer loop runs (pool processes that die before that stop a worker by design).
    wait_until(
        lambda: " ready." in worker.log_tail(10**7) or not worker.alive, 90, "the worker ready"
    )
    main_pid = worker.pid
    for round_no in range(1, ROUNDS + 1):
        assert worker.alive, f"round {round_no}: worker died:\n{worker.log_tail(4000)}"
        before = _connected(worker)
        for child in worker.children():
            os.kill(child, signal.SIGKILL)
        stack.stop_redis(signal.SIGKILL)
        time.sleep(0.2 * (round_no % 3))  # vary where in the reconnect loop the broker returns
        stack.start_redis()
        wait_until(
            lambda before=before: (
                not worker.alive or (_connected(worker) > before and len(worker.children()) == 2)
            ),
            90,
            f"round {round_no}: the worker to reconnect and refill its pool",
        )
    log = worker.log_tail(10**7)
    assert worker.alive and worker.pid == main_pid, log[-4000:]
    assert "Unrecoverable error" not in log, log[-4000:]
