"""A record that carries shared bookkeeping rows and meets another statement in a deadlock.

A record's statement can carry a provider call's outcome (its call slot given back, its health
count) and the next step's admission (a call slot taken): rows every worker's calls share. With
many calls at once (the threads pool, 32 per process) two such statements can each hold a row
the other waits for, and PostgreSQL aborts one of them after ``deadlock_timeout``. A record
aborted so must not fail its task (the saga would wait for its lease to run out and the sweeper
to ring it): it runs again without what it carried, and the carried parts go their own way.

Run in-process on PostgreSQL, with a second connection of the test's own that holds the row
the carried part waits for and then asks for the saga's row, which the record holds.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import psycopg
import pytest
from django.db import DatabaseError, connection, transaction
from django.utils import timezone

from providers.models import CallSlot
from sagas.models import Saga
from sagas.services import saga_start
from sagas.store import Record, claim, write
from tests.conftest import wait_until
from tests.sagas.inprocess import only_this_process, out_of_workers_reach

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _in_process_only():
    """No worker runs these sagas; and this connection looks for a deadlock 3 s into a wait,
    not the server's 1 s, so a loaded machine has time to start the other side's wait (the
    check runs once per wait: a cycle closed after it would never be found)."""
    with only_this_process():
        with connection.cursor() as cursor:
            cursor.execute("SET deadlock_timeout = '3s'")
        try:
            yield
        finally:
            with connection.cursor() as cursor:
                cursor.execute("RESET deadlock_timeout")


def _claimed(saga_type: str = "test5", **data: object) -> Saga:
    with transaction.atomic():
        saga = saga_start(saga_type=saga_type, data={"script": {}, **data})
        out_of_workers_reach(saga.id)
    claimed = claim(saga.id, 1000)
    assert claimed is not None
    return claimed


def _dsn() -> str:
    s = connection.settings_dict
    return psycopg.conninfo.make_conninfo(
        dbname=s["NAME"], user=s["USER"], password=s["PASSWORD"], host=s["HOST"], port=s["PORT"]
    )


class _Other(threading.Thread):
    """Another worker's statement, played by hand: it holds ``slot`` (as a concurrent
    admission's ``FOR UPDATE`` may), waits until ``waiter`` (the record's backend) waits for
    it, then asks for the saga's row, which the record holds: a deadlock. Its own
    ``deadlock_timeout`` is long, so PostgreSQL aborts the record's statement, not this one."""

    def __init__(self, slot: int, saga_id: object, waiter: int) -> None:
        super().__init__(daemon=True)
        self.slot, self.saga_id, self.waiter = slot, saga_id, waiter
        self.holding = threading.Event()
        self.got_saga_row = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with psycopg.connect(_dsn()) as conn:
                conn.execute("SET deadlock_timeout = '60s'")
                conn.execute(
                    "SELECT 1 FROM providers_callslot WHERE id = %s FOR UPDATE", [self.slot]
                )
                self.holding.set()
                with psycopg.connect(_dsn(), autocommit=True) as look:
                    wait_until(
                        lambda: look.execute(
                            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                            [self.waiter],
                        ).fetchone()[0],
                        describe=lambda: "the record never waited for the slot",
                    )
                conn.execute("SELECT 1 FROM sagas_saga WHERE id = %s FOR UPDATE", [self.saga_id])
                self.got_saga_row = True
                conn.commit()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc
            self.holding.set()


def _deadlocking(claimed: Saga, fields: dict, calls: list[str]) -> tuple[_Other, Record]:
    """A record of ``fields`` carrying a part that waits for a call slot the other worker
    holds, that worker started and holding it; ``calls`` gets "done" or "alone"."""
    slot = CallSlot.objects.create(provider="deadlock-test", n=0)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    other = _Other(slot.pk, claimed.id, pid)
    other.start()
    assert other.holding.wait(30) and other.error is None, other.error
    rec = Record(fields=fields)
    table = CallSlot._meta.db_table
    rec.carry(
        f'dl AS (UPDATE "{table}" SET "lease_until" = "lease_until" WHERE "id" = %s RETURNING 1)',
        [slot.pk],
        done=lambda: calls.append("done"),
        alone=lambda: calls.append("alone"),
    )
    return other, rec


@pytest.mark.parametrize(
    ("saga_type", "data"),
    [
        # One autocommitted statement: it runs again at once.
        ("test5", {}),
        # A change hook that wants the saga puts its record in a transaction of write()'s own
        # (what the hook writes commits with it): that rolls back whole, and the record runs
        # again in a new one.
        ("test_plain_hooked", {"hooked": True}),
    ],
    ids=["autocommitted", "own-transaction"],
)
def test_a_record_aborted_by_a_deadlock_lands_without_what_it_carried(saga_type, data):
    claimed = _claimed(saga_type, **data)
    later = timezone.now() + timedelta(minutes=1)
    calls: list[str] = []
    other, rec = _deadlocking(claimed, {"next_attempt_at": later, "lease_until": None}, calls)
    write(claimed, rec, inline_ok=False)
    other.join(30)

    assert other.error is None and other.got_saga_row, other.error
    # The record landed on its second run, as the claim's own: the version it was fenced on.
    row = Saga.objects.get(pk=claimed.id)
    assert (row.version, row.next_attempt_at, row.lease_until) == (claimed.version + 1, later, None)
    # What it carried went its own way, once, instead of riding in the statement that ran.
    assert calls == ["alone"]


def test_inside_a_transaction_the_deadlock_fails_the_record():
    """Aborted inside someone else's transaction (a transactional step's, here a caller's),
    the statement took their writes with it: nothing to run again, so the error is theirs."""
    claimed = _claimed()
    calls: list[str] = []
    other, rec = _deadlocking(
        claimed, {"next_attempt_at": timezone.now(), "lease_until": None}, calls
    )
    with pytest.raises(DatabaseError, match="deadlock"), transaction.atomic():
        write(claimed, rec, inline_ok=False)
    other.join(30)
    assert other.error is None and other.got_saga_row, other.error
    assert Saga.objects.get(pk=claimed.id).version == claimed.version
    assert calls == []  # the caller's transaction is gone: nothing it carried ran, or ran again
