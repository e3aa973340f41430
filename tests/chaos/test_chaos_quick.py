"""The chaos run in quick mode, as ``make test`` runs it on every change.

``manage.py chaos --quick`` starts a stack of its own (database, Redis, two workers, beat, web),
places 60 orders over HTTP with every fault switched on while it SIGKILLs workers three times,
restarts the broker once, deploys the next order saga version (a rolling restart) and takes the
payment provider down for 12 s, then checks every guarantee. With ``CELERY_BROKER_URL`` pointing at
RabbitMQ the same run uses that broker (its outage simulated by a proxy that cuts connections).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ARTIFACTS_DIR, REPO_ROOT

pytestmark = [pytest.mark.worker, pytest.mark.slow]


def test_quick_chaos_run_settles_every_order_with_no_violation():
    """Every order settles and the run reports 0 violations, 3 kills and 1 broker restart,
    exiting 0: worker kills, broker outages and faults never break a guarantee, and fraud
    reviews were approved and rejected meanwhile."""
    broker = os.environ.get("CELERY_BROKER_URL", "")
    command = [sys.executable, "manage.py", "chaos", "--quick", "--seed", "20261123"]
    if broker.startswith(("amqp", "pyamqp")):
        command += ["--broker-url", broker]
    done = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    ARTIFACTS_DIR.mkdir(exist_ok=True)
    (ARTIFACTS_DIR / f"chaos-quick-{os.getpid()}.log").write_text(output)
    assert done.returncode == 0, output[-6000:]
    assert re.search(r"^\s+violations:\s+0$", done.stdout, re.M), done.stdout[-4000:]
    assert re.search(r"^\s+kills:\s+3 SIGKILL", done.stdout, re.M), done.stdout[-4000:]
    assert re.search(r"^\s+broker restarts:\s+1 ", done.stdout, re.M), done.stdout[-4000:]
    # The outage phase ran, and no order was cancelled for a failed step because of it.
    assert re.search(r"^\s+provider outage:\s+payments down 12s, breakers on", done.stdout, re.M)
    assert re.search(r"cancelled because of the outage: \d+ \(step_failed 0,", done.stdout)
    # The deploy at 20% of the load took: orders started on the new version beside the old.
    versions = re.search(r"^\s+order versions:\s+(.*)$", done.stdout, re.M)
    assert versions and len(versions.group(1).split(", ")) == 2, done.stdout[-4000:]
    # No worker main process, beat or web exited on its own (the harness restarting a worker
    # would otherwise hide it).
    assert re.search(r"^\s+unplanned exits:\s+0$", done.stdout, re.M), done.stdout[-4000:]
    # Large orders waited for their fraud review and the chaos reviewer decided them over the
    # API both ways (its rejections then checked as fraud_rejected, never confirmed).
    reviews = re.search(r"^\s+fraud reviews:\s+(.*)$", done.stdout, re.M)
    assert reviews, done.stdout[-4000:]
    assert re.search(r"\bapproved [1-9]", reviews.group(1)), reviews.group(0)
    assert re.search(r"\brejected [1-9]", reviews.group(1)), reviews.group(0)
    assert "chaos: PASS" in done.stdout
