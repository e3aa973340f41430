"""A worker's start is one line of the project's log, not Celery's banner, and its stop is
one too, not Celery's "Warm shutdown" line.

Runs the worker exactly as ``make run`` starts it (its Procfile's worker line) with
``LOG_FORMAT=json``, on a queue of its own, and reads what it wrote.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import uuid
from pathlib import Path

import pytest

from lab.stack import wait_until
from lab.supervisor import Process
from tests.conftest import _worker_env
from tests.private_broker import make_run_argv

pytestmark = [pytest.mark.worker, pytest.mark.django_db]

#: What Celery's banner is made of: its ASCII art, its sections and its "key: value" lines.
BANNER_MARKS = (" -------------- ", "[config]", "[queues]", "[tasks]", ".> transport:")


def start_worker(tmp_path: Path, queue: str) -> tuple[Process, str]:
    """The worker of make run with LOG_FORMAT=json on ``queue``, started and ready; and its
    node name (stopped again if it does not get ready; else the caller stops it)."""
    node = f"startlog.{os.getpid()}@{socket.gethostname()}"
    argv = [*make_run_argv("worker"), "-Q", queue, "-n", node]
    worker = Process(
        "worker",
        argv,
        env=_worker_env({"LOG_FORMAT": "json"}),
        log_path=tmp_path / "worker.log",
    )
    worker.start()
    try:
        wait_until(
            lambda: f"{node} ready." in worker.log_text() or not worker.alive,
            90,
            "the worker ready",
        )
        assert worker.alive, worker.log_tail(4000)
    except BaseException:
        worker.stop(timeout=30)
        raise
    return worker, node


def test_a_worker_started_and_stopped_writes_only_json_lines(tmp_path: Path):
    """Under LOG_FORMAT=json every line a worker writes, from start to stop, is a JSON object.
    Celery wrote two kinds of plain text besides its banner: "worker: Warm shutdown
    (MainProcess)" on stdout when stopped (it is one ``worker.stopping`` line now), and, run as
    root, its SecurityWarning (eight lines through Python's warning printer, before the log
    took Python's warnings: one ``py.warnings`` line now)."""
    worker, node = start_worker(tmp_path, f"stoplog-{uuid.uuid4().hex[:8]}")
    try:
        worker.signal(signal.SIGTERM)  # what make run, docker and systemd send
        assert worker.wait(60) == 0, worker.log_tail(4000)
    finally:
        worker.stop(timeout=30)
    # What the worker wrote: the log's first line is lab.supervisor's own ("--- ... start").
    written = [line for line in worker.log_text().splitlines()[1:] if line.strip()]

    assert not [line for line in written if "shutdown (MainProcess)" in line], written
    assert [line for line in written if not line.startswith("{")] == [], written
    lines = [json.loads(line) for line in written]
    [stopping] = [line for line in lines if line["event"] == "worker.stopping"]
    assert stopping["level"] == "info" and stopping["logger"] == "config.celery"
    assert stopping["node"] == node
    assert stopping["signal"] == "SIGTERM" and stopping["shutdown"] == "warm"
    assert lines.index(stopping) > [line["event"] for line in lines].index(f"{node} ready.")
    if os.geteuid() == 0:  # Celery warns about root only to root
        [warned] = [line for line in lines if line["logger"] == "py.warnings"]
        assert "SecurityWarning" in warned["event"] and warned["level"] == "warning"


def test_a_worker_starts_with_one_json_line_instead_of_celerys_banner(tmp_path: Path):
    """Celery printed its banner (some twenty lines of art, configuration, queues and tasks)
    straight to stdout, the only lines that were not JSON under LOG_FORMAT=json. Its facts are
    one ``worker.starting`` line now: node, transport (without a password), pool, concurrency,
    queues and tasks."""
    queue = f"startlog-{uuid.uuid4().hex[:8]}"
    worker, node = start_worker(tmp_path, queue)
    worker.stop(timeout=30)
    log = worker.log_text()
    # Everything before the line that says it is ready.
    started = log[: log.rfind("\n", 0, log.index(f"{node} ready."))]

    assert not [mark for mark in BANNER_MARKS if mark in started], started[-4000:]
    lines = [json.loads(line) for line in started.splitlines() if line.startswith("{")]
    [start] = [line for line in lines if line["event"] == "worker.starting"]
    assert start["level"] == "info" and start["logger"] == "config.celery", start
    assert start["node"] == node
    assert start["pool"] == "prefork" and start["concurrency"] == 2
    assert start["queues"] == [queue]
    assert start["transport"].startswith("redis://") and start["task_events"] is False
    assert "sagas.run" in start["tasks"] and "webhooks.deliver" in start["tasks"]


def test_a_pool_process_killed_is_a_json_line_too(tmp_path: Path):
    """The prefork pool says a pool process died (``Process 'ForkPoolWorker-1' pid:123 exited
    with 'signal 9 (SIGKILL)'``) through its own logger, which Celery gave a plain-text handler:
    the one line of the worker's log that was not JSON after a crash."""
    worker, _node = start_worker(tmp_path, f"poolkill-{uuid.uuid4().hex[:8]}")
    try:
        [child, *_] = worker.children()
        os.kill(child, signal.SIGKILL)
        wait_until(lambda: "exited with" in worker.log_text(), 60, "the pool to say so")
    finally:
        worker.stop(timeout=30)
    written = [line for line in worker.log_text().splitlines()[1:] if line.strip()]
    assert [line for line in written if not line.startswith("{")] == [], written
    [exited] = [json.loads(line) for line in written if "exited with" in line]
    assert f"pid:{child} exited with 'signal 9 (SIGKILL)'" in exited["event"], exited
    assert (exited["level"], exited["logger"]) == ("error", "multiprocessing")
