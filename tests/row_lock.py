"""Another transaction holding rows locked while a test runs its statements beside it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import connection, transaction


@contextmanager
def held_by_another(queryset: Any, *, lock_timeout: str) -> Iterator[None]:
    """While the block runs, a transaction in another thread (its own connection) holds the
    rows of ``queryset`` ``FOR UPDATE``, and this connection's statements give up after
    ``lock_timeout`` instead of queueing behind it: a statement that should not wait for those
    rows fails the test with a lock timeout if it does."""
    locked, done = threading.Event(), threading.Event()

    def hold() -> None:
        try:
            with transaction.atomic():
                list(queryset.select_for_update())
                locked.set()
                done.wait(30)
        finally:
            connection.close()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert locked.wait(10), "the other transaction did not take the lock"
        with connection.cursor() as cursor:
            cursor.execute(f"SET lock_timeout = '{lock_timeout}'")
        yield
    finally:
        done.set()
        holder.join(10)
        with connection.cursor() as cursor:
            cursor.execute("RESET lock_timeout")
