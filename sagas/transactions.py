"""A participant's atomic block that costs nothing inside a transactional step.

A participant groups writes that must land together in ``transaction.atomic()``. Called from a
``transactional`` step, it already runs inside the step's own transaction (see
:class:`sagas.store.StepTransaction`), so that block becomes a savepoint: a ``SAVEPOINT`` and a
``RELEASE``, two round trips per call, paid by every saga. They buy nothing there: the engine
rolls the step's whole transaction back on any exception the step function raises, and the
step's record commits with the writes or not at all.

:func:`step_atomic` is ``transaction.atomic()`` everywhere else, and a savepoint-free join of
the step's transaction there. The rule that comes with it there: once *any* exception has left
the block, the transaction is spoiled (Django refuses further queries in it until it rolls
back), so nothing may catch that exception and go on querying or return as if the call had
succeeded: not the participant, not a wrapper's ``finally``, not the step function.
:func:`in_step_transaction` says when that is the case, so a participant that would catch an
error (a race on its key) lets it through instead, and the step's retry finds what the other
writer left. A step function that returns from a spoiled transaction anyway fails with
:class:`StepTransactionSpoiled`, retried like any transient error.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any

from django.db import connection, transaction
from psycopg import pq

#: The ``Atomic`` of the transactional step running now in this context (task, thread or
#: greenlet), if any.
_STEP_ATOMIC: ContextVar[Any] = ContextVar("sagas_step_atomic", default=None)
#: What runs once that step's transaction has ended, committed or rolled back.
_STEP_AFTER: ContextVar[list[Callable[[], None]] | None] = ContextVar(
    "sagas_step_after", default=None
)
#: The ``Atomic`` of a transaction that already holds earlier steps' writes whose records are
#: deferred (a batch, see ``sagas.store.Batch``).
_SHARED_ATOMIC: ContextVar[Any] = ContextVar("sagas_shared_atomic", default=None)


class StepTransactionSpoiled(Exception):
    """A step function returned after an error spoiled its step's transaction."""


def enter_step(atomic: Any, after: list[Callable[[], None]]) -> tuple[Token[Any], Token[Any]]:
    """Called by the engine when a transactional step's transaction is open; ``after`` is the
    list of what the engine runs once it has ended."""
    return _STEP_ATOMIC.set(atomic), _STEP_AFTER.set(after)


def leave_step(tokens: tuple[Token[Any], Token[Any]]) -> None:
    """Called by the engine once that transaction has ended, committed or rolled back."""
    _STEP_ATOMIC.reset(tokens[0])
    _STEP_AFTER.reset(tokens[1])
    _SHARED_ATOMIC.set(None)


def note_earlier_steps() -> None:
    """Called by the engine when the step transaction now open goes on to hold the writes of
    a step whose record is deferred (a batch): nothing may commit them before that record."""
    _SHARED_ATOMIC.set(_STEP_ATOMIC.get())


def after_step_transaction(fn: Callable[[], None]) -> None:
    """Run ``fn`` once the transactional step's transaction has ended, whether it commits or
    rolls back; at once outside one. For a write that must outlive the step's rollback (a
    fake provider counting the calls it refused while down, say)."""
    after = _STEP_AFTER.get()
    if after is None or not in_step_transaction():
        fn()
    else:
        after.append(fn)


def in_step_transaction() -> bool:
    """Whether the innermost open atomic block is a transactional step's own transaction.

    Only the innermost: a participant that opened a savepoint of its own inside the step is
    back to the usual rules, and gets the usual ``atomic()`` from :func:`step_atomic`.
    """
    atomic = _STEP_ATOMIC.get()
    blocks = connection.atomic_blocks
    return atomic is not None and bool(blocks) and blocks[-1] is atomic


def step_atomic() -> transaction.Atomic:
    """``transaction.atomic()``, without the savepoint inside a transactional step's transaction.

    An exception raised inside it there marks the step's transaction for rollback (Django's
    ``savepoint=False``), which is what the engine does with it anyway.
    """
    return transaction.atomic(savepoint=not in_step_transaction())


def spoiled() -> bool:
    """Whether the current transaction can only roll back.

    Django marks it so when an error left a block without a savepoint (or a failed ORM write,
    or ``set_rollback(True)``); PostgreSQL's own status covers a failed statement that no block
    saw, such as a query whose error was caught right where it ran.
    """
    if not connection.in_atomic_block:
        return False
    if connection.needs_rollback:
        return True
    info = getattr(connection.connection, "info", None)  # psycopg 3; SQLite has none
    return info is not None and info.transaction_status == pq.TransactionStatus.INERROR


def commit_what_the_step_wrote() -> bool:
    """Fault injection only: make what a transactional step's transaction wrote so far durable
    now, record or no record.

    ``lost_response`` and ``crash`` promise that the operation took effect before the caller
    lost its answer or its process. A participant with a commit of its own has; inside a
    transactional step the effect would roll back with the step instead, and the fault would
    rehearse nothing but an error. Committed on the raw connection (Django refuses a commit
    inside ``atomic``); the step's block then ends an empty transaction, committed or rolled
    back. Only where the step's transaction is the whole transaction and holds this step's
    writes alone: not inside a savepoint of the participant's own, not inside a caller's
    transaction (a test's), and not in a batch, whose earlier steps' writes wait for their
    records (there the fault stays an error). Returns whether it committed.
    """
    atomic = _STEP_ATOMIC.get()
    if not in_step_transaction() or len(connection.atomic_blocks) != 1:
        return False
    if atomic is not None and _SHARED_ATOMIC.get() is atomic:
        return False
    connection.connection.commit()
    return True
