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
import signal
import socket
import sys
import uuid
from pathlib import Path

import pytest

from lab.stack import Stack, wait_until
from lab.supervisor import Process, pid_alive
from tests.private_broker import private_broker_stack

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

ROUNDS = 8
NODE = f"survivor.{os.getpid()}@{socket.gethostname()}"


@pytest.fixture
def stack(tmp_path: Path):
    stack = private_broker_stack(tmp_path, "survive")
    yield stack
    stack.close()


def _runs_a_task(stack: Stack, worker: Process) -> bool:
    """A doorbell for a saga that does not exist goes through the (restarted) broker and is
    run by a pool process: the consumer and the pool both work again."""
    from celery import Celery
    from kombu import Connection

    task_id = uuid.uuid4().hex
    # Not the current app: shared tasks used later in this process (webhook doorbells) would
    # resolve to it and publish to its default queue instead of the project's.
    probe = Celery("probe", set_as_current=False)
    # An explicit connection: CELERY_BROKER_URL in this process names the shared broker.
    try:
        with Connection(stack.env["CELERY_BROKER_URL"], connect_timeout=2) as conn:
            probe.send_task(
                "sagas.run",
                args=[str(uuid.uuid4()), 1],
                queue=stack.queue,
                task_id=task_id,
                connection=conn,
            )
    except Exception:  # noqa: BLE001 - the broker may be starting
        return False

    def done() -> bool:
        return f"{task_id}] succeeded" in worker.log_tail(10**6) or not worker.alive

    try:
        wait_until(done, 10, "the probe task")
    except Exception:  # noqa: BLE001 - not yet: the caller asks again
        return False
    return worker.alive


def _live_children(worker: Process) -> int:
    """Pool processes that run (a killed one stays a zombie until the worker reaps it, and one
    listed a moment ago may be reaped before it is looked at: both count as gone)."""
    return sum(1 for pid in worker.children() if pid_alive(pid))


def _make_run_worker(stack: Stack) -> Process:
    """A prefork worker like the one ``make run`` starts, gossip, mingle and heartbeat on
    (they only add reconnect work; the pool bug does not need them)."""
    argv = [sys.executable, "-m", "celery", "-A", "config", "worker", "-l", "info"]
    argv += ["--concurrency", "2", "-Q", stack.queue, "-n", NODE]
    return stack.supervisor.start("survivor", argv, log_name="worker.log")


def test_worker_main_process_survives_pool_kills_during_broker_restarts(stack):
    """Each round: SIGKILL every pool process, crash the broker, start it again; the worker
    reconnects, refills its pool and runs a task sent through the new broker. After every round
    the same main process is alive and its log has no unrecoverable error."""
    worker = _make_run_worker(stack)
    # Its consumer loop runs (pool processes that die before that stop a worker by design).
    wait_until(lambda: _runs_a_task(stack, worker) or not worker.alive, 90, "the worker ready")
    main_pid = worker.pid
    for round_no in range(1, ROUNDS + 1):
        assert worker.alive, f"round {round_no}: worker died:\n{worker.log_tail(4000)}"
        for child in worker.children():
            os.kill(child, signal.SIGKILL)
        seen = len(worker.log_tail(10**7))
        stack.stop_redis(signal.SIGKILL)
        # Vary where in the reconnect loop the broker returns: at once, once the worker has
        # noticed the loss, or once it has failed to reconnect.
        stage = ("", "Connection to broker lost", "Cannot connect to redis")[round_no % 3]
        wait_until(
            lambda stage=stage, seen=seen: (
                stage in worker.log_tail(10**7)[seen:] or not worker.alive
            ),
            90,
            f"round {round_no}: the worker to log {stage!r}",
        )
        stack.start_redis()
        wait_until(
            lambda: (
                not worker.alive or (_live_children(worker) == 2 and _runs_a_task(stack, worker))
            ),
            90,
            f"round {round_no}: the worker to run a task through the new broker, pool full",
        )
    log = worker.log_tail(10**7)
    assert worker.alive and worker.pid == main_pid, log[-4000:]
    assert "Unrecoverable error" not in log, log[-4000:]
