"""Beat's housekeeping tasks when the database does not answer: one readable warning line per
missed run, no ERROR with a traceback, and the next run works again."""

from __future__ import annotations

import logging
from unittest import mock

import pytest
from django.db import connection

from accounts.tasks import purge_rate_limit_counts
from lab.stack import spare_port
from orders.tasks import expire_idempotency_keys
from sagas.tasks import sweep_sagas
from webhooks.tasks import purge, sweep

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.parametrize(
    ("task", "name"),
    [
        (sweep_sagas, "sagas.sweep"),
        (sweep, "webhooks.sweep"),
        (purge, "webhooks.purge"),
        (expire_idempotency_keys, "orders.expire_idempotency_keys"),
        (purge_rate_limit_counts, "accounts.purge_rate_limit_counts"),
    ],
)
def test_a_run_the_database_does_not_answer_is_one_line(task, name, caplog):
    """The task runs through Celery (as a worker runs it) while its connection points at a
    port nobody listens on: the run ends normally, with one WARNING naming the task and the
    database's words, and nothing logged with a traceback. The next run sweeps again."""
    connection.close()
    caplog.set_level(logging.INFO)
    with mock.patch.dict(connection.settings_dict, {"HOST": "127.0.0.1", "PORT": spare_port()}):
        result = task.apply()
    connection.close()

    assert result.successful(), result.traceback
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) == 1, [r.getMessage() for r in records]
    line = records[0]
    assert line.levelno == logging.WARNING and line.exc_info is None
    text = line.getMessage()
    assert "periodic.missed" in text and name in text and "OperationalError" in text
    assert "Traceback" not in caplog.text

    caplog.clear()
    assert task.apply().successful()  # the database answers again: a normal run
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
