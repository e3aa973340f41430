"""The timeline's rows refer to their saga without a database constraint.

The engine writes each event in the statement that writes (or creates) its saga's row, so an
event cannot name a missing saga; the foreign key's check locked that row once more for every
event (``FOR KEY SHARE``: a WAL record and a dirtied page on the hottest row there is), about a
tenth of PostgreSQL's CPU per order in process. What the constraint gave otherwise, Django
still gives: a saga deleted through the ORM takes its events with it.
"""

from __future__ import annotations

import threading

import pytest
from django.db import OperationalError, connection, transaction
from django.utils import timezone

from sagas.models import Saga, SagaEvent

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_event_is_written_while_another_transaction_holds_its_saga_row():
    """With the constraint, the insert's check would wait for the holder's lock (and fail at
    the lock timeout); without it, the event goes in at once."""
    saga = Saga.objects.create(saga_type="timeline", current_step="s1")
    locked, done = threading.Event(), threading.Event()

    def hold_the_saga() -> None:
        try:
            with transaction.atomic():
                Saga.objects.select_for_update().get(pk=saga.pk)
                locked.set()
                done.wait(30)
        finally:
            connection.close()

    holder = threading.Thread(target=hold_the_saga)
    holder.start()
    try:
        assert locked.wait(10)
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '2s'")
        try:
            SagaEvent.objects.create(saga=saga, at=timezone.now(), kind="note", detail="held")
        except OperationalError as exc:  # the lock timeout: the check waited for the holder
            pytest.fail(f"writing the event waited for the saga's row: {exc}")
    finally:
        done.set()
        holder.join(10)
        with connection.cursor() as cursor:
            cursor.execute("RESET lock_timeout")
    assert SagaEvent.objects.filter(saga=saga, kind="note").count() == 1

    Saga.objects.filter(pk=saga.pk).delete()
    assert not SagaEvent.objects.filter(saga_id=saga.pk).exists()
