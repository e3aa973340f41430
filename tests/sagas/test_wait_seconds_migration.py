"""Migration ``sagas.0012``: a wait's length kept on the saga's row (0011) moves to the row of
the step the saga waits at, so a saga parked between the two releases keeps its wait's length.
"""

from __future__ import annotations

import pytest
from django.db import connection, transaction
from django.utils import timezone

from sagas.models import Saga
from sagas.services import saga_start
from tests.migrating import migrated_to
from tests.sagas.inprocess import out_of_workers_reach

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = ("sagas", "0011_saga_wait_seconds")


def _start() -> Saga:
    with transaction.atomic():
        saga = saga_start(saga_type="test_wait", data={})
        out_of_workers_reach(saga.id)
    return saga


def test_a_saga_parked_under_0011_keeps_its_waits_length_on_its_step():
    waiting, running = _start(), _start()
    with migrated_to([BEFORE]), connection.cursor() as cursor:
        cursor.execute(
            "UPDATE sagas_saga SET current_step = 'await_go', step_index = 1, "
            "waiting_since = %s, wait_seconds = 900 WHERE id = %s",
            [timezone.now(), waiting.id],
        )
        cursor.execute(
            "UPDATE sagas_saga SET wait_seconds = 900 WHERE id = %s",  # not waiting
            [running.id],
        )
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT saga_id, name, wait_seconds FROM sagas_sagastep WHERE wait_seconds IS NOT NULL"
        )
        kept = cursor.fetchall()
    assert kept == [(waiting.id, "await_go", 900.0)]
    assert Saga.objects.get(pk=waiting.id).current_step == "await_go"
