"""The test harness's flush (tests/conftest.py): DELETE under table locks, retried when
PostgreSQL ends it for a deadlock with a worker still finishing a task."""

from __future__ import annotations

import re
import threading

import pytest
from django.contrib.auth.models import Group
from django.core.management import call_command
from django.core.management.color import no_style
from django.core.management.sql import sql_flush
from django.db import connection, connections

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_flush_empties_the_tables_and_goes_on_after_losing_a_deadlock(wait_for):
    """Another connection holds table B and then asks for table A, which the flush locked first
    while it waits for B: PostgreSQL ends the flush (it waited first). The flush runs again,
    and the tables end up empty."""
    Group.objects.create(name="left-behind")
    lock = sql_flush(no_style(), connection, reset_sequences=False, allow_cascade=False)[0]
    first, second = re.findall(r'"([^"]+)"', lock)[:2]

    other = connection.get_new_connection(connection.get_connection_params())
    # This session looks for deadlocks only after 10 s (the server's 1 s stays for the flush),
    # so it is always the flush that finds this one and is ended.
    other.execute("SET deadlock_timeout = '10s'")
    outcome: dict[str, object] = {}

    def flush() -> None:
        try:
            call_command("flush", verbosity=0, interactive=False, inhibit_post_migrate=True)
            outcome["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported by the test
            outcome["error"] = exc
        finally:
            connections.close_all()

    try:
        other.execute(f'SELECT 1 FROM "{second}" LIMIT 1')  # holds B (in its transaction)
        thread = threading.Thread(target=flush)
        thread.start()
        wait_for(  # the flush holds A and waits for B
            lambda: other.execute(
                "SELECT 1 FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
                "WHERE NOT l.granted AND c.relname = %s",
                [second],
            ).fetchone(),
            timeout=30,
        )
        other.execute(f'SELECT 1 FROM "{first}" LIMIT 1')  # waits for A: the deadlock
        other.commit()  # this side was not the one ended; releasing B lets the flush finish
        thread.join(timeout=60)
    finally:
        other.close()
    assert outcome == {"ok": True}, outcome
    assert not Group.objects.exists()
