"""The broker is a doorbell: when it cannot ring, the saga is still safe in the database."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.db import connection

from sagas.models import Saga, SagaState
from sagas.sweeper import sweep
from tests.conftest import REPO_ROOT, database_url_for
from tests.sagas.sagatypes import ensure_effects_table

SCRIPT = """
import django, time
django.setup()
from django.db import transaction
from sagas.services import saga_start
started = time.monotonic()
ids = []
for _ in range(3):
    with transaction.atomic():
        ids.append(str(saga_start(saga_type="test5", data={}).id))
print(" ".join(ids))
print(round(time.monotonic() - started, 3))
"""


@pytest.mark.django_db(transaction=True)
def test_sagas_started_while_the_broker_is_down_commit_and_are_swept_later(celery_worker, wait_for):
    """With the broker unreachable, starting sagas neither raises nor loses them; once a
    broker answers, the sweeper rings and they run to the end."""
    ensure_effects_table()
    env = {
        **os.environ,
        "DATABASE_URL": database_url_for(connection.settings_dict),
        "CELERY_BROKER_URL": "redis://127.0.0.1:1/0",  # nothing listens on port 1
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ids = done.stdout.split("\n")[0].split()
    assert len(ids) == 3
    assert "saga.doorbell_failed" in done.stderr
    assert set(Saga.objects.filter(id__in=ids).values_list("state", flat=True)) == {"running"}

    def all_succeeded():
        sweep()  # this process's broker answers: the sweeper rings for the overdue sagas
        return Saga.objects.filter(id__in=ids, state=SagaState.SUCCEEDED).count() == 3

    wait_for(
        all_succeeded,
        timeout=60,
        describe=lambda: (
            list(Saga.objects.filter(id__in=ids).values_list("state", "version")),
            list(Saga.objects.get(pk=ids[0]).events.values_list("kind", "step", "detail"))[:30],
        ),
    )
