"""A stack of real processes on a redis-server of its own, for tests that stop or restart
the broker (the shared Redis must never be touched), and ``make run``'s own command lines."""

from __future__ import annotations

import shlex
import shutil
import sys
import uuid
from pathlib import Path

import pytest
from django.db import connection

from lab.stack import Stack, stack_env
from tests.conftest import REPO_ROOT, database_url_for


def private_broker_stack(tmp_path: Path, prefix: str) -> Stack:
    """A :class:`Stack` on this test's database, its own queue and its own redis-server."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    stack = Stack(env={}, log_dir=tmp_path, queue=f"{prefix}-{uuid.uuid4().hex[:8]}")
    metrics = tmp_path / "metrics"
    metrics.mkdir(exist_ok=True)
    # The same dict the stack's processes read when they start (the broker URL comes next).
    stack.env.update(
        stack_env(
            database_url=database_url_for(connection.settings_dict),
            broker_url="redis://127.0.0.1:1/0",
            queue=stack.queue,
            metrics_dir=metrics,
        )
    )
    stack.env["CELERY_BROKER_URL"] = stack.start_redis()
    return stack


def make_run_argv(process: str) -> list[str]:
    """``process``'s command in ``make run``'s Procfile (``worker``, ``beat``), without the
    supervisor in front: the tests run exactly what a user runs."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        import run
    finally:
        sys.path.pop(0)
    lines = dict(line.split(": ", 1) for line in run.procfile(8000).splitlines())
    argv = shlex.split(lines[process].removeprefix("exec "))
    return argv[argv.index("--") + 1 :]
