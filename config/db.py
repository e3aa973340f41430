"""Database helpers every app may use."""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

from django.db import connection, transaction


def savepoint_if_nested() -> AbstractContextManager[object]:
    """Make one statement's ``IntegrityError`` recoverable, at no cost when it can be.

    Inside a transaction, a failed statement aborts the transaction unless it ran in a
    savepoint, so a caller that catches the error and goes on needs ``atomic()`` there.
    Outside one, the statement is its own transaction: wrapping it in ``atomic()`` would only
    add a ``BEGIN`` and a ``COMMIT``, two round trips, to every call.
    """
    if connection.in_atomic_block:
        return transaction.atomic()
    return contextlib.nullcontext()
