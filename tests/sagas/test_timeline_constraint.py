"""The timeline's rows refer to their saga without a database constraint.

Every event is written with its saga's row (in the statement that writes or creates it, or in a
transaction that holds it locked), so an event cannot name a missing saga; the foreign key's
check locked that row once more for every event (``FOR KEY SHARE``: a WAL record and a
dirtied page on the hottest row there is), about a tenth of PostgreSQL's CPU per order in
process. What the constraint gave otherwise, Django still gives: a saga deleted through the ORM
takes its events with it.
"""

from __future__ import annotations

import pytest
from django.db import OperationalError
from django.utils import timezone

from sagas.models import Saga, SagaEvent
from tests.row_lock import held_by_another

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_event_is_written_while_another_transaction_holds_its_saga_row():
    """With the constraint, the insert's check would wait for the holder's lock (and fail at
    the lock timeout); without it, the event goes in at once."""
    saga = Saga.objects.create(saga_type="timeline", current_step="s1")
    with held_by_another(Saga.objects.filter(pk=saga.pk), lock_timeout="2s"):
        try:
            SagaEvent.objects.create(saga=saga, at=timezone.now(), kind="note", detail="held")
        except OperationalError as exc:  # the lock timeout: the check waited for the holder
            pytest.fail(f"writing the event waited for the saga's row: {exc}")
    assert SagaEvent.objects.filter(saga=saga, kind="note").count() == 1

    Saga.objects.filter(pk=saga.pk).delete()
    assert not SagaEvent.objects.filter(saga_id=saga.pk).exists()
