"""A broker restart leaves a readable worker log: the reconnect is announced in a warning
line or two, with no ERROR and no traceback.

Runs the worker exactly as ``make run`` starts it (its Procfile's worker line) against a
private ``redis-server`` (never the shared one), restarts that Redis, and reads the log once
the worker has run a task through the new broker. Gossip and mingle stay off in that command:
a single worker (and the compose workers, which share nothing but the queue) has no peers,
and with gossip on every reconnect logged "consumer: Error on restarting Gossip" at ERROR with
a traceback. ``worker_cancel_long_running_tasks_on_connection_loss`` is set (False, on
purpose; see config/settings.py), and Celery's reminder about its default is not printed.
"""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from lab.stack import wait_until
from lab.supervisor import Process
from tests.private_broker import make_run_argv, private_broker_stack
from tests.test_worker_survives_broker_restarts import _runs_a_task

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def stack(tmp_path: Path):
    stack = private_broker_stack(tmp_path, "reconnect")
    yield stack
    stack.close()


def test_a_broker_restart_logs_no_error_and_no_traceback(stack):
    node = f"reconnect.{os.getpid()}@{socket.gethostname()}"
    argv = [*make_run_argv("worker"), "-Q", stack.queue, "-n", node]
    worker: Process = stack.supervisor.start("worker", argv, log_name="worker.log")
    wait_until(lambda: _runs_a_task(stack, worker) or not worker.alive, 90, "the worker ready")
    assert worker.alive, worker.log_tail(4000)
    started = len(worker.log_tail(10**7))

    stack.stop_redis(signal.SIGKILL)
    # The broker stays down until the worker has noticed and failed to reconnect once: the
    # consumer's restart then runs against a broker that is not there (where gossip failed).
    wait_until(
        lambda: "Cannot connect to redis" in worker.log_tail(10**7)[started:] or not worker.alive,
        90,
        "the worker to try the stopped broker",
    )
    stack.start_redis()
    wait_until(
        lambda: _runs_a_task(stack, worker) or not worker.alive,
        90,
        "the worker to run a task through the restarted broker",
    )
    assert worker.alive, worker.log_tail(4000)
    after = worker.log_tail(10**7)[started:]

    assert "Connection to broker lost" in after  # it did notice: this is the restart's log
    lines = after.splitlines()
    assert not [line for line in lines if "Traceback" in line], after[-6000:]
    # Celery's own notice while the broker is away ("consumer: Cannot connect to redis://...:
    # Connection refused. Trying again in 2.00 seconds...") is its one ERROR line, without a
    # traceback; nothing else may be an error.
    errors = [
        line
        for line in lines
        if ("ERROR" in line or "level='error'" in line or '"level": "error"' in line)
        and "Cannot connect to" not in line
    ]
    assert not errors, after[-6000:]
    assert "cancels all currently executed tasks" not in after, after[-6000:]
    assert "Gossip" not in after, after[-6000:]


def test_an_ack_the_lost_connection_refused_is_one_warning_line(caplog):
    """A task that finishes while the broker is away cannot acknowledge its message: kombu logs
    "Couldn't ack" at CRITICAL with the transport's traceback, on the logger Celery hands it.
    Through the project's logging it is one WARNING line with no traceback (the broker delivers
    the message again, and the doorbell is fenced as stale)."""
    import logging

    from kombu.message import Message
    from redis.exceptions import ConnectionError as RedisConnectionError

    class GoneChannel:
        no_ack_consumers = None

        def basic_ack(self, delivery_tag, multiple=False):
            raise RedisConnectionError(
                "Error 111 connecting to 127.0.0.1:6399. Connection refused."
            )

    message = Message(channel=GoneChannel(), delivery_tag="4c1d-tag", body=b"{}")
    caplog.set_level(logging.DEBUG)
    message.ack_log_error(logging.getLogger("celery.worker.request"), (RedisConnectionError,))

    records = [r for r in caplog.records if r.name == "celery.worker.request"]
    assert len(records) == 1
    line = records[0]
    assert line.levelno == logging.WARNING and line.exc_info is None, line.getMessage()
    assert "Couldn't ack message 4c1d-tag: broker connection lost" in line.getMessage()
    assert "Traceback" not in caplog.text
