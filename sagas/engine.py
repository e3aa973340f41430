"""The saga runner: one step, one short claim, one short record.

The database row is the truth and a Celery message is only a doorbell that says "saga X at
version V may have work now". A task:

1. **claims** the saga with one conditional ``UPDATE ... RETURNING`` that bumps ``version`` and
   sets a lease; zero rows means the message is stale or a duplicate, and the task stops;
2. **calls** the step (or compensation) function outside any transaction, with a derived
   idempotency key, so no row lock is held across a provider call;
3. **records** the outcome in one transaction fenced on the claimed version: the saga row
   (next step, retry time or FSM transition), the step row and the timeline events. If the
   next piece of work is due at once and the task is within its time budget, the same UPDATE
   also claims it and the task goes straight on; otherwise the next doorbell rings after commit.

Losing a message loses nothing: the sweeper finds sagas whose ``next_attempt_at`` is overdue and
whose lease has expired, and rings again. Receiving one twice costs one UPDATE that matches no
row. A worker killed mid-step leaves a lease that expires; the next claim counts another attempt
and repeats the call with the same idempotency key, so the participant returns its first result.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import structlog
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from providers import breaker as provider_breaker
from providers.config import breakers_enabled
from sagas import metrics, tracing, waits
from sagas.definition import (
    BusinessFailure,
    RetryPolicy,
    SagaDefinition,
    Step,
    StepContext,
    StepFunction,
    change_hook,
    definition_of,
    get_definition,
    registered_definitions,
)
from sagas.definition import forward_key as make_forward_key
from sagas.definition import undo_key as make_undo_key
from sagas.models import (
    ACTIVE_STATES,
    Saga,
    SagaEvent,
    SagaSignal,
    SagaState,
    SagaStep,
    StepStatus,
)

log = structlog.get_logger("sagas.engine")

# Fields returned by every claim and record, in model order (what the loop needs to go on).
_SAGA_FIELDS = list(Saga._meta.concrete_fields)
_FIELD_BY_NAME = {f.name: f for f in _SAGA_FIELDS}
_CONVERTERS: list[tuple[int, Any, list]] | None = None
_ACTIVE = tuple(str(s) for s in ACTIVE_STATES)
# The sweeper's re-ring backoff stops doubling here (32 x SAGA_STUCK_AFTER).
_MAX_SWEEP_DOUBLINGS = 5
# A message may arrive a hair before the due time it was scheduled for.
_DUE_TOLERANCE = timedelta(milliseconds=50)


class _Fenced(Exception):
    """The saga moved on under us (a newer claim holds it): roll back and stop."""


class _StepTransaction:
    """The transaction a ``transactional`` step's function shares with its record.

    Opened just before the call. The record commits it, so the participant's write and the
    saga's progress land together (one commit, not two); a function that raises, or a record
    fenced off by a newer claim, rolls it back, so the write never outlives a lost record. For
    any other step it does nothing.
    """

    __slots__ = ("_atomic", "_after")

    def __init__(self, enabled: bool) -> None:
        self._atomic: Any = None
        self._after: list[Callable[[], None]] = []
        if enabled:
            self._atomic = transaction.atomic()
            self._atomic.__enter__()

    @property
    def open(self) -> bool:
        return self._atomic is not None

    def after(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the transaction has ended, committed or rolled back."""
        self._after.append(fn)

    def commit(self) -> None:
        self._end(rollback=False)

    def rollback(self) -> None:
        self._end(rollback=True)

    def _end(self, *, rollback: bool) -> None:
        atomic, self._atomic = self._atomic, None
        try:
            if atomic is not None:
                if rollback:
                    transaction.set_rollback(True)
                atomic.__exit__(None, None, None)
        finally:
            after, self._after = self._after, []
            for fn in after:
                fn()


# ---------------------------------------------------------------------------------------------
# Knobs, read when used (never at import time) so tests and workers can set them per process.
# ---------------------------------------------------------------------------------------------
def step_timeout(step: Step | None) -> float:
    """A step's own timeout, or ``SAGA_STEP_TIMEOUT``."""
    if step is not None and step.timeout is not None:
        return step.timeout
    return settings.SAGA_STEP_TIMEOUT


def lease_seconds(timeout: float | None = None) -> float:
    """How long a claim holds a saga: longer than its task can possibly keep running.

    ``timeout`` is the step timeout the task was sent for (its time limits derive from it, see
    :func:`task_time_limits`); the lease outlives the hard limit, so an expired lease always
    means its holder is gone.
    """
    if timeout is None:
        timeout = settings.SAGA_STEP_TIMEOUT
    return timeout + settings.SAGA_INLINE_BUDGET + 5.0


def task_time_limits(timeout: float) -> tuple[float, float]:
    """``(soft, hard)`` Celery time limits of a task sent for a step with ``timeout``.

    The task may run inline steps for ``SAGA_INLINE_BUDGET`` and then one more step; the
    defaults (``CELERY_TASK_ANNOTATIONS``) are these for ``SAGA_STEP_TIMEOUT``.
    """
    soft = timeout + settings.SAGA_INLINE_BUDGET
    return soft, soft + 3.0


# The step timeout the running task was sent for (None: SAGA_STEP_TIMEOUT, the default limits).
_task_timeout: ContextVar[float | None] = ContextVar("saga_task_timeout", default=None)


# Timeouts travel as time limits and back (soft limit minus the inline budget): compare them
# with a little slack for float rounding.
_TIMEOUT_SLACK = 1e-3


def _current_task_timeout() -> float:
    value = _task_timeout.get()
    return settings.SAGA_STEP_TIMEOUT if value is None else value


def _timeout_at(saga: Saga, step_name: str) -> float:
    """The timeout of ``step_name`` in the saga's own definition (the default if unknown)."""
    return _timeout_of(saga.saga_type, saga.definition_version, step_name)


def _timeout_of(saga_type: str, version: int, step_name: str) -> float:
    try:
        return step_timeout(get_definition(saga_type, version).step(step_name))
    except (LookupError, KeyError):
        return settings.SAGA_STEP_TIMEOUT


def _max_attempts(step: Step, *, compensating: bool) -> int:
    policy = step.compensation_retry if compensating else step.retry
    if policy is not None and policy.max_attempts is not None:
        return policy.max_attempts
    if compensating:
        return settings.SAGA_COMPENSATION_MAX_ATTEMPTS
    return settings.SAGA_MAX_ATTEMPTS


def _lease_only_commits() -> bool:
    """Whether commits that only move a lease forward skip the wait for their WAL flush.

    A claim, and a record after which the same task goes straight on to the next step, only
    say "this task holds the saga": nobody else is told (no doorbell, no terminal state). If
    PostgreSQL itself crashed before flushing one, the saga would come back at its previous
    version and the sweeper would run the step again under the same idempotency key, which is
    what a worker crash already does. And the WAL is one sequence: the participant's own
    write in the next step, or the record that hands the saga on, waits for its flush and
    with it for everything before. So only those hand-over commits wait for the disk, which
    takes the engine's own waits for an fsync from six per five-step saga to one.
    """
    return settings.SAGA_ASYNC_LEASE_COMMITS


def backoff_delay(attempt: int, policy: RetryPolicy | None = None) -> float:
    """Exponential backoff with jitter: ``min(cap, base * 2**(attempt-1))`` times [0.5, 1].

    The jitter spreads retries of many sagas hitting the same provider, while keeping each
    saga's delays growing (until the cap), so a flapping provider gets more room every time.
    ``policy`` (a step's own) overrides ``SAGA_BACKOFF_BASE`` and ``SAGA_BACKOFF_MAX``.
    """
    base, cap = settings.SAGA_BACKOFF_BASE, settings.SAGA_BACKOFF_MAX
    if policy is not None:
        base = base if policy.backoff_base is None else policy.backoff_base
        cap = cap if policy.backoff_max is None else policy.backoff_max
    ceiling = min(cap, base * 2 ** max(attempt - 1, 0))
    return ceiling * random.uniform(0.5, 1.0)


# ---------------------------------------------------------------------------------------------
# Fenced UPDATE ... RETURNING on the saga row (portable: PostgreSQL and SQLite >= 3.35).
# ---------------------------------------------------------------------------------------------
def _converters() -> list[tuple[int, Any, list]]:
    """Django's own converters of the columns that have any (on PostgreSQL only the JSON
    ones), as ``(position, column, converters)``, computed once."""
    global _CONVERTERS
    if _CONVERTERS is None:
        out = []
        for i, f in enumerate(_SAGA_FIELDS):
            col = f.get_col(Saga._meta.db_table)
            convs = connection.ops.get_db_converters(col) + f.get_db_converters(connection)
            if convs:
                out.append((i, col, convs))
        _CONVERTERS = out
    return _CONVERTERS


_ATTNAMES = [f.attname for f in _SAGA_FIELDS]


def _row_to_saga(row: Iterable[Any]) -> Saga:
    values = list(row)
    for i, col, convs in _converters():
        for conv in convs:
            values[i] = conv(values[i], col, connection)
    return Saga.from_db(connection.alias, _ATTNAMES, values)


def _prep(name: str, value: Any) -> Any:
    return _FIELD_BY_NAME[name].get_db_prep_save(value, connection)


def _saga_update_sql(
    saga_id: Any,
    expected_version: int,
    values: dict[str, Any],
    *,
    bump_attempt: bool = False,
    require_due_before: datetime | None = None,
    require_active: bool = False,
    require_known: bool = False,
) -> tuple[str, list[Any]]:
    """``UPDATE saga SET ..., version = version + 1 WHERE id = X AND version = V RETURNING *``.

    The text depends only on the statement's shape (which columns, which conditions), so it is
    built once per shape and process; only the parameters are worked out per call.
    """
    values = {**values, "updated_at": timezone.now()}
    due = require_due_before is not None
    # Only a saga whose definition this process has, with the same shape: a worker on older
    # code leaves the rest untouched (no lease, no attempt) for one that knows it.
    known = _known_definitions() if require_known else None
    n_known = None if known is None else len(known)
    shape = (connection.vendor, tuple(values), bump_attempt, due, require_active, n_known)
    sql = _SQL_BY_SHAPE.get(shape)
    if sql is None:
        sql = _SQL_BY_SHAPE[shape] = _saga_update_text(*shape[1:])
    params = [_prep(name, value) for name, value in values.items()]
    params += [_prep("id", saga_id), expected_version]
    if require_active:
        params += _ACTIVE
    if known is not None:
        for triple in known:
            params += triple
    if require_due_before is not None:
        params.append(_prep("next_attempt_at", require_due_before))
        params.append(_prep("lease_until", require_due_before - _DUE_TOLERANCE))
    return sql, params


#: Statement texts by shape, see :func:`_saga_update_sql` and :func:`_record_sql_postgres`.
_SQL_BY_SHAPE: dict[tuple, str] = {}


def _saga_update_text(
    names: tuple[str, ...],
    bump_attempt: bool,
    require_due: bool,
    require_active: bool,
    n_known: int | None,
) -> str:
    qn = connection.ops.quote_name
    sets = [f"{qn('version')} = {qn('version')} + 1"]
    if bump_attempt:
        sets.append(f"{qn('attempt')} = {qn('attempt')} + 1")
    sets += [f"{qn(_FIELD_BY_NAME[name].column)} = %s" for name in names]
    where = [f"{qn('id')} = %s", f"{qn('version')} = %s"]
    if require_active:
        where.append(f"{qn('state')} IN ({', '.join(['%s'] * len(_ACTIVE))})")
    if n_known is not None:
        names_ = ("saga_type", "definition_version", "definition_fingerprint")
        cols = ", ".join(qn(c) for c in names_)
        where.append(f"({cols}) IN ({', '.join(['(%s, %s, %s)'] * n_known)})")
    if require_due:
        where.append(f"({qn('next_attempt_at')} IS NULL OR {qn('next_attempt_at')} <= %s)")
        # Never take over a step that another task still holds.
        where.append(f"({qn('lease_until')} IS NULL OR {qn('lease_until')} <= %s)")
    columns = ", ".join(qn(f.column) for f in _SAGA_FIELDS)
    return (
        f"UPDATE {qn(Saga._meta.db_table)} SET {', '.join(sets)} "
        f"WHERE {' AND '.join(where)} RETURNING {columns}"
    )


def _known_definitions() -> list[tuple[str, int, str]]:
    """``(type, version, fingerprint)`` of every definition registered in this process.

    Each version also matches a blank fingerprint: sagas recorded before fingerprints existed.
    """
    out: list[tuple[str, int, str]] = []
    for d in registered_definitions():
        out += [(d.saga_type, d.version, d.fingerprint), (d.saga_type, d.version, "")]
    return out or [("", 0, "-")]


def _fetch_saga(sql: str, params: list[Any]) -> Saga | None:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return None if row is None else _row_to_saga(row)


def _fenced_update(saga_id: Any, expected_version: int, values: dict[str, Any], **kw: Any):
    """Run the fenced UPDATE; ``None`` when no row matched (stale or duplicate delivery)."""
    return _fetch_saga(*_saga_update_sql(saga_id, expected_version, values, **kw))


_EVENT_COLUMNS = ("at", "kind", "step", "attempt", "detail", "actor", "duration_ms")


# Appended to a statement (as a CTE, joined into its result) so that the implicit transaction
# of that one statement commits without waiting for its WAL flush. See _lease_only_commits().
_NO_FLUSH_WAIT = "nf AS (SELECT set_config('synchronous_commit', 'off', true))"


def _no_flush_wait(sql: str) -> str:
    """``UPDATE ... RETURNING cols`` as a statement whose commit does not wait for the disk."""
    return f"WITH {_NO_FLUSH_WAIT}, u AS ({sql}) SELECT u.* FROM u, nf"


def _record_sql_postgres(
    saga: Saga, fields: dict[str, Any], rec: _Record, now: datetime, *, wait_flush: bool = True
) -> tuple[str, list[Any]]:
    """The whole record as ONE statement: fenced saga UPDATE, step UPDATE, event INSERTs.

    PostgreSQL runs data-modifying CTEs atomically in one statement, and the step update and
    event inserts only touch rows when the fenced UPDATE matched (they read from it). One round
    trip instead of five (BEGIN, three statements, COMMIT) is most of the engine's speed. Its
    text, like the saga UPDATE's, is built once per shape.
    """
    saga_sql, params = _saga_update_sql(saga.id, saga.version, fields)
    step_fields = {**rec.step_fields, "updated_at": now} if rec.step_name is not None else {}
    if len(step_fields) == 1:
        step_fields = {}  # nothing but the timestamp: the step row is left alone
    shape = ("record", saga_sql, wait_flush, tuple(step_fields), len(rec.events))
    sql = _SQL_BY_SHAPE.get(shape)
    if sql is None:
        sql = _SQL_BY_SHAPE[shape] = _record_text(*shape[1:])
    for name, value in step_fields.items():
        params.append(_STEP_FIELDS[name].get_db_prep_save(value, connection))
    if step_fields:
        params += [_prep("id", saga.id), rec.step_name]
    for e in rec.events:
        values = {"at": now, "actor": "engine", "duration_ms": None, **e}
        params += [values[c] for c in _EVENT_COLUMNS]
    return sql, params


_STEP_FIELDS = {f.name: f for f in SagaStep._meta.concrete_fields}
_EVENT_CASTS = {
    "at": "timestamptz",
    "kind": "varchar",
    "step": "varchar",
    "attempt": "integer",
    "detail": "text",
    "actor": "varchar",
    "duration_ms": "double precision",
}


def _record_text(
    saga_sql: str, wait_flush: bool, step_names: tuple[str, ...], n_events: int
) -> str:
    qn = connection.ops.quote_name
    head = "WITH " if wait_flush else f"WITH {_NO_FLUSH_WAIT}, "
    parts = [f"{head}s AS ({saga_sql})"]
    if step_names:
        sets = ", ".join(f"{qn(_STEP_FIELDS[name].column)} = %s" for name in step_names)
        parts.append(
            f", st AS (UPDATE {qn(SagaStep._meta.db_table)} SET {sets} "
            f"WHERE {qn('saga_id')} = %s AND {qn('name')} = %s AND EXISTS (SELECT 1 FROM s))"
        )
    if n_events:
        row = "(" + ", ".join(f"%s::{_EVENT_CASTS[c]}" for c in _EVENT_COLUMNS) + ")"
        cols = ", ".join(qn(c) for c in _EVENT_COLUMNS)
        parts.append(
            f", ev AS (INSERT INTO {qn(SagaEvent._meta.db_table)} ({qn('saga_id')}, {cols}) "
            f"SELECT s.{qn('id')}, {', '.join('v.' + qn(c) for c in _EVENT_COLUMNS)} "
            f"FROM s, (VALUES {', '.join([row] * n_events)}) AS v({cols}))"
        )
    columns = ", ".join(qn(f.column) for f in _SAGA_FIELDS)
    parts.append(f" SELECT {columns} FROM s" if wait_flush else f" SELECT {columns} FROM s, nf")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# The doorbell
# ---------------------------------------------------------------------------------------------
# After a failed publish, skip the broker for this long: the sweeper rings those sagas later,
# and requests and steps do not each pay a connect timeout while the broker is down.
_BREAKER_SECONDS = 2.0
_broker_down_until = 0.0


def _limits(timeout: float | None) -> dict[str, float]:
    """Message options giving a task the time limits of a step with ``timeout`` (none for the
    default timeout: the task's annotations already say that)."""
    if timeout is None or timeout == settings.SAGA_STEP_TIMEOUT:
        return {}
    soft, hard = task_time_limits(timeout)
    return {"soft_time_limit": soft, "time_limit": hard}


def ring(
    saga_id: Any, version: int, countdown: float | None = None, timeout: float | None = None
) -> None:
    """Send "saga X at version V may have work". Never raises: the row is already safe.

    A broker that is down or restarting must not fail the request or the step that committed;
    the sweeper rings again once the broker is back. ``timeout`` is the timeout of the step
    the saga will run: the task gets time limits that fit it.
    """
    global _broker_down_until
    from sagas.tasks import run_saga

    if time.monotonic() < _broker_down_until:
        log.debug("saga.doorbell_skipped", saga_id=str(saga_id), version=version)
        return
    try:
        run_saga.apply_async(
            (str(saga_id), version),
            countdown=countdown if countdown and countdown > 0 else None,
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0.05, "interval_step": 0.2},
            **_limits(timeout),
        )
    except Exception as exc:  # noqa: BLE001 - any broker failure is logged and forgotten
        _broker_down_until = time.monotonic() + _BREAKER_SECONDS
        log.warning("saga.doorbell_failed", saga_id=str(saga_id), version=version, error=repr(exc))


def ring_on_commit(
    saga_id: Any, version: int, countdown: float | None = None, timeout: float | None = None
) -> None:
    transaction.on_commit(lambda: ring(saga_id, version, countdown, timeout))


def ring_many(doorbells: list[tuple[Any, int, float | None]]) -> None:
    """Ring for many sagas at once; never raises, like :func:`ring`.

    The sweeper rings up to ``SAGA_SWEEP_BATCH`` sagas per tick. Through ``apply_async`` each
    doorbell costs about 0.6 ms: a fresh Redis client and round trip, a queue declaration, and
    ``send_task`` working out the same routing and options again. Here the route is worked out
    once, the queue declared once, and each message is built and published with Celery's own
    ``create_task_message`` / ``send_task_message`` (so it is the same task message a worker
    gets from ``apply_async``) inside a kombu producer batch: one pipelined round trip on
    Redis, one publish after another where a transport cannot batch (AMQP). If the batch
    fails, each doorbell goes through :func:`ring` instead (reconnecting, behind the breaker);
    what still fails is forgotten: every saga rung here had its ``sweeps`` counter bumped, so
    a later sweep rings it again after a backoff.
    """
    from kombu.utils.uuid import uuid

    from sagas.tasks import run_saga

    if not doorbells:
        return
    if time.monotonic() < _broker_down_until:
        log.debug("saga.doorbells_skipped", count=len(doorbells))
        return
    app, name = run_saga.app, run_saga.name
    amqp = app.amqp
    try:
        route = amqp.router.route({}, name, (str(doorbells[0][0]), doorbells[0][1]), {}, run_saga)
        with app.producer_or_acquire() as producer, producer.batch(max_size=len(doorbells)):
            declare = None  # the first message declares the queue; the rest need not again
            for saga_id, version, timeout in doorbells:
                args = (str(saga_id), version)
                message = amqp.create_task_message(
                    uuid(),
                    name,
                    args,
                    {},
                    ignore_result=True,
                    argsrepr=repr(args),
                    kwargsrepr="{}",
                    **_limits(timeout),
                )
                amqp.send_task_message(
                    producer, name, message, declare=declare, retry=False, **route
                )
                declare = []
    except Exception as exc:  # noqa: BLE001 - any broker failure: fall back to one by one
        # The pooled connection may have died with a broker restart (py-amqp does not
        # reconnect by itself). ring() publishes with a reconnecting retry; if the broker is
        # really down, its first failure opens the breaker and the rest are skipped at once.
        # A doorbell sent twice (some went out before the failure) is fenced.
        log.warning("saga.doorbells_batch_failed", count=len(doorbells), error=repr(exc))
        for saga_id, version, timeout in doorbells:
            ring(saga_id, version, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Claim
# ---------------------------------------------------------------------------------------------
def claim(saga_id: Any, version: int, timeout: float | None = None) -> Saga | None:
    """Take the saga for one piece of work, or return ``None`` if the message is stale.

    ``timeout``: the step timeout the task was sent for; the lease outlives the task.
    """
    now = timezone.now()
    sql, params = _saga_update_sql(
        saga_id,
        version,
        {"lease_until": now + timedelta(seconds=lease_seconds(timeout)), "sweeps": 0},
        bump_attempt=True,
        require_active=True,
        require_known=True,
        require_due_before=now + _DUE_TOLERANCE,
    )
    if connection.vendor == "postgresql" and _lease_only_commits():
        sql = _no_flush_wait(sql)
    return _fetch_saga(sql, params)


# ---------------------------------------------------------------------------------------------
# The record: everything one outcome changes, written in one fenced transaction
# ---------------------------------------------------------------------------------------------
@dataclass
class _Record:
    fields: dict[str, Any] = field(default_factory=dict)
    transitions: list[str] = field(default_factory=list)
    # The step row to update, by name, and its new values.
    step_name: str | None = None
    step_fields: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    # After commit: ring for the next work with this countdown (None: nothing to ring).
    ring_after: float | None = None
    # The next work is due now: claim it in the same UPDATE and go on in this task.
    go_on: bool = False
    finished: str = ""
    # Written in the same transaction as the record, only if the fenced UPDATE matched (e.g.
    # marking the signal a Wait step consumed).
    on_written: Callable[[], None] | None = None
    # The timeout of the step the after-commit doorbell is for (set by _write).
    ring_timeout: float | None = None

    def event(self, kind: str, saga: Saga, step: str = "", detail: str = "", **extra: Any) -> None:
        self.events.append(
            {"kind": kind, "step": step, "attempt": saga.attempt, "detail": detail[:2000], **extra}
        )


def _write(
    saga: Saga, rec: _Record, *, inline_ok: bool, tx: _StepTransaction | None = None
) -> Saga | None:
    """Apply ``rec`` fenced on the claimed version; return the saga if the task should go on.

    ``tx``: a transactional step's open transaction, committed with the record (or rolled
    back with it when the record is fenced off or fails).
    """
    now = timezone.now()
    fields = dict(rec.fields)
    # A saga type's change hook writes in the record's transaction; when there is none, or it
    # does not want this saga (a dict lookup), the record stays one autocommitted statement.
    hook = change_hook(saga)
    before = copy.copy(saga) if hook is not None else None
    for name in rec.transitions:
        getattr(saga, name)()  # django-fsm checks the source state; raises if not allowed
    if rec.transitions:
        fields["state"] = saga.state
    if saga.parked_on and "parked_on" not in fields:
        fields["parked_on"] = ""  # no longer waiting for a provider
    go_on = rec.go_on and inline_ok
    if rec.go_on or rec.ring_after is not None:
        rec.ring_timeout = _timeout_at(saga, fields.get("current_step", saga.current_step))
        # Straight on only into a step that fits this task's time limits; a longer one gets
        # a doorbell of its own, sent with its limits.
        go_on = go_on and rec.ring_timeout <= _current_task_timeout() + _TIMEOUT_SLACK
    if rec.go_on:
        fields["next_attempt_at"] = now
        if go_on:
            fields["attempt"] = 1
            fields["lease_until"] = now + timedelta(seconds=lease_seconds(_task_timeout.get()))
        else:
            fields["attempt"] = 0
            fields["lease_until"] = None
    try:
        in_transaction = rec.on_written is not None or hook is not None
        with transaction.atomic() if in_transaction else contextlib.nullcontext():
            updated = _write_record(saga, fields, rec, now, go_on, flush=hook is not None)
            if rec.on_written is not None:
                rec.on_written()
            if hook is not None:
                hook(before, updated)
    except _Fenced:
        if tx is not None:
            tx.rollback()
        metrics.STALE_DELIVERIES.inc()
        log.info("saga.fenced", saga_id=str(saga.id), version=saga.version)
        return None
    except BaseException:
        if tx is not None:
            tx.rollback()
        raise
    if tx is not None:
        tx.commit()
    for e in rec.events:
        log.info(
            f"saga.{e['kind']}",
            saga_id=str(saga.id),
            saga_type=saga.saga_type,
            step=e["step"],
            attempt=e["attempt"],
            correlation_id=saga.correlation_id,
        )
    if rec.finished:
        metrics.SAGAS_FINISHED.labels(saga.saga_type, rec.finished).inc()
    return updated if go_on else None


def _write_record(
    saga: Saga, fields: dict[str, Any], rec: _Record, now: datetime, go_on: bool, *, flush: bool
) -> Saga:
    """The fenced record itself; raises :class:`_Fenced` when the saga moved on.

    ``flush``: wait for the WAL flush even if only the lease moves on (a change hook wrote
    something that is announced after commit).
    """
    if connection.vendor != "postgresql":
        return _write_portable(saga, fields, rec, now, go_on)
    sql, params = _record_sql_postgres(
        saga, fields, rec, now, wait_flush=flush or not (go_on and _lease_only_commits())
    )
    updated = _fetch_saga(sql, params)
    if updated is None:
        raise _Fenced
    if rec.ring_after is not None or (rec.go_on and not go_on):
        ring_on_commit(saga.id, updated.version, rec.ring_after, rec.ring_timeout)
    return updated


def _write_portable(
    saga: Saga, fields: dict[str, Any], rec: _Record, now: datetime, go_on: bool
) -> Saga:
    """The same record as three statements in one transaction (SQLite, the embedded default)."""
    with transaction.atomic():
        updated = _fenced_update(saga.id, saga.version, fields)
        if updated is None:
            raise _Fenced
        if rec.step_name is not None and rec.step_fields:
            SagaStep.objects.filter(saga_id=saga.id, name=rec.step_name).update(
                updated_at=now, **rec.step_fields
            )
        if rec.events:
            SagaEvent.objects.bulk_create(
                [SagaEvent(saga_id=saga.id, at=now, **e) for e in rec.events]
            )
        if rec.ring_after is not None or (rec.go_on and not go_on):
            ring_on_commit(saga.id, updated.version, rec.ring_after, rec.ring_timeout)
    return updated


def next_compensable(definition: SagaDefinition, saga: Saga, below: int) -> int | None:
    """The next step at an index < ``below`` that took effect and has a compensation."""
    for j in range(below - 1, -1, -1):
        step = definition.steps[j]
        if step.compensate is not None and step.name in saga.results:
            return j
    return None


def _start_compensation(
    definition: SagaDefinition,
    saga: Saga,
    rec: _Record,
    *,
    reason: str,
    failed_index: int,
    failed_may_have_effect: bool,
) -> None:
    """Turn ``rec`` into "compensate everything up to ``failed_index``, newest first"."""
    rec.transitions.append("begin_compensation")
    rec.fields["failure_code"] = reason
    _unpark(saga, rec)
    failed = definition.steps[failed_index]
    first: int | None = None
    if failed_may_have_effect and failed.compensate is not None:
        first = failed_index
    else:
        first = next_compensable(definition, saga, failed_index)
    rec.event("compensation_started", saga, detail=f"reason: {reason}")
    if first is None:
        rec.transitions.append("finish_compensation")
        rec.fields.update(
            next_attempt_at=None, lease_until=None, finished_at=timezone.now(), attempt=0
        )
        rec.event("compensated", saga, detail="nothing had taken effect")
        rec.finished = "compensated"
        return
    rec.fields.update(step_index=first, current_step=definition.steps[first].name)
    rec.go_on = True


def _escalate(saga: Saga, rec: _Record, *, step: str, error: str) -> None:
    rec.transitions.append("escalate")
    _unpark(saga, rec)
    # An undo that keeps failing is its own fact: the forward failure that started the undoing
    # (failed_step and failure_code, the saga's failure signature) stays as it was.
    where = "failed_undo" if saga.state == SagaState.COMPENSATING else "failed_step"
    rec.fields.update(
        escalated_from=saga.state,
        **{where: step},
        last_error=error[:2000],
        next_attempt_at=None,
        lease_until=None,
    )
    rec.event("needs_manual", saga, step=step, detail=error)
    rec.finished = "needs_manual"


def _context(definition: SagaDefinition, saga: Saga, *, compensating: bool) -> StepContext:
    name = saga.current_step
    fwd = make_forward_key(saga.id, name)
    return StepContext(
        saga_id=str(saga.id),
        saga_type=saga.saga_type,
        step=name,
        attempt=saga.attempt,
        data=saga.data,
        results=saga.results,
        idempotency_key=make_undo_key(saga.id, name) if compensating else fwd,
        forward_key=fwd,
        correlation_id=saga.correlation_id,
        compensating=compensating,
    )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def _boundary_cancel_reason(definition: SagaDefinition, saga: Saga, now: datetime) -> str:
    """A cancel or a passed deadline is honoured only while the pivot has never run."""
    pivot = definition.pivot_index
    i = definition.index_of(saga.current_step)
    before_pivot = i < pivot or (i == pivot and saga.attempt == 1)
    if not before_pivot:
        return ""
    if saga.cancel_reason:
        return saga.cancel_reason
    if saga.deadline_at is not None and now >= saga.deadline_at:
        return "timed_out"
    return ""


def _schedule_retry(
    saga: Saga,
    rec: _Record,
    *,
    step: str,
    phase: str,
    error: str,
    took: float,
    policy: RetryPolicy | None = None,
) -> None:
    """A transient failure with attempts left: persist the next due time, ring with a countdown."""
    delay = backoff_delay(saga.attempt, policy)
    metrics.STEP_RETRIES.labels(saga.saga_type, step, phase).inc()
    kind = "step_retry" if phase == "forward" else "compensation_retry"
    rec.event(
        kind,
        saga,
        step=step,
        detail=f"{error}; next attempt in {delay:.3f}s",
        duration_ms=took * 1e3,
    )
    rec.fields.update(
        next_attempt_at=timezone.now() + timedelta(seconds=delay),
        lease_until=None,
        last_error=error,
    )
    rec.ring_after = delay


# ---------------------------------------------------------------------------------------------
# The provider seam: a gate before a participant call, an outcome report after it
# ---------------------------------------------------------------------------------------------
def _gate(step: Step) -> provider_breaker.Ticket | provider_breaker.Wait | None:
    """Ask the step's provider for a call: a ticket, a wait, or ``None`` if it is not gated."""
    if not step.provider or not breakers_enabled():
        return None
    return provider_breaker.admit(step.provider)


def _call(
    fn: StepFunction,
    ctx: StepContext,
    ticket: provider_breaker.Ticket | None,
    definite: tuple[type[BaseException], ...] = (),
    tx: _StepTransaction | None = None,
) -> Any:
    """Call a step function; its provider's health counts transient failures only.

    ``definite`` (the step's ``non_retryable``) are definite answers too: raised again as a
    :class:`BusinessFailure` carrying the exception's ``code`` (else ``step_failed``).

    A transactional step's outcome is reported outside its transaction (after a failure rolled
    it back, or once the record has committed or been fenced off): the provider's counters are
    shared rows that must neither wait for, nor vanish with, one saga's transaction.
    """
    try:
        result = fn(ctx)
    except BusinessFailure:
        if tx is not None:
            tx.rollback()
        provider_breaker.report(ticket, ok=True)  # a definite answer: the provider is healthy
        raise
    except definite as exc:  # empty: catches nothing
        if tx is not None:
            tx.rollback()
        provider_breaker.report(ticket, ok=True)
        raise BusinessFailure(getattr(exc, "code", "") or "step_failed", str(exc)) from exc
    except BaseException:
        if tx is not None:
            tx.rollback()
        provider_breaker.report(ticket, ok=False)
        raise
    if tx is not None and tx.open:
        tx.after(lambda: provider_breaker.report(ticket, ok=True))
    else:
        provider_breaker.report(ticket, ok=True)
    return result


def _held_back(
    saga: Saga, step: Step, ticket: provider_breaker.Ticket | None
) -> provider_breaker.Wait | None:
    """The last attempt failed, and the provider's breaker is open now: wait, do not give up.

    The breaker may have opened on this very failure: the attempts were spent on the outage,
    not on this saga's request, so the saga keeps its last attempt for after it (the park
    gives it back). Once only: a saga that was already parked before this call (its last
    attempt was the one kept) compensates or escalates as usual, so a request that fails on
    its own while its failures keep the breaker open cannot wait forever.
    """
    if ticket is None or saga.parked_on:
        return None
    return provider_breaker.held_back(step.provider)


def _park_for_provider(
    saga: Saga, rec: _Record, *, step: str, wait: provider_breaker.Wait, inline_ok: bool
) -> Saga | None:
    """The provider cannot take a call now: come back later as if this claim never happened.

    The claim counted an attempt; the park gives it back in the same fenced record, so an
    outage of any length spends none of the saga's attempts. The timeline gets one ``parked``
    event per stay, not one per probe.
    """
    rec.fields.update(
        attempt=max(saga.attempt - 1, 0),
        next_attempt_at=timezone.now() + timedelta(seconds=wait.delay),
        lease_until=None,
        parked_on=wait.provider,
    )
    if saga.parked_on != wait.provider:
        rec.event(
            "parked",
            saga,
            step=step,
            detail=f"provider {wait.provider}: {wait.reason}; next try in {wait.delay:.1f}s",
        )
    rec.ring_after = wait.delay
    return _write(saga, rec, inline_ok=inline_ok)


def _forward(definition: SagaDefinition, saga: Saga, *, inline_ok: bool) -> Saga | None:
    rec = _Record()
    i = definition.index_of(saga.current_step)
    step = definition.steps[i]
    now = timezone.now()
    reason = _boundary_cancel_reason(definition, saga, now)
    if reason:
        # Earlier claims of this step (attempt > 1) may have taken effect.
        rec.event("cancel_honoured", saga, step=step.name, detail=f"reason: {reason}")
        if saga.attempt > 1:
            rec.step_name = step.name
            rec.step_fields = {"maybe_effect": True, "status": StepStatus.FAILED}
        _start_compensation(
            definition,
            saga,
            rec,
            reason=reason,
            failed_index=i,
            failed_may_have_effect=saga.attempt > 1,
        )
        return _write(saga, rec, inline_ok=inline_ok)

    max_attempts = _max_attempts(step, compensating=False)
    if saga.attempt > max_attempts:
        # Claimed again and again without a record: the step keeps killing its worker.
        return _forward_exhausted(
            definition, saga, rec, error="attempts exhausted without an answer (worker lost)"
        )

    ticket = _gate(step)
    if isinstance(ticket, provider_breaker.Wait):
        return _park_for_provider(saga, rec, step=step.name, wait=ticket, inline_ok=inline_ok)
    ctx = _context(definition, saga, compensating=False)
    action = step.action
    if step.park is not None:
        decision = waits.decide(step.park, saga, ctx, now)
        if decision.kind == "park":
            return _park(saga, step, rec, decision, now)
        if decision.kind == "timeout":
            return _wait_timed_out(definition, saga, step, rec, inline_ok=inline_ok)
        if decision.kind == "skip":
            # This saga does not wait here: on to the next step, with no event or result.
            rec.step_name = step.name
            rec.step_fields = {"status": StepStatus.SUCCEEDED, "result": waits.SKIPPED}
            _next_step(definition, saga, rec, i)
            return _write(saga, rec, inline_ok=inline_ok)
        if decision.signal is not None:
            ctx = replace(ctx, signal=decision.signal.payload)
            rec.on_written = _consume(decision.signal, step.name)
        _unpark(saga, rec)
    tx = _StepTransaction(step.transactional and step.park is None)
    started = time.perf_counter()
    try:
        with tracing.saga_span(f"saga.step {step.name}", saga, step=step.name, phase="forward"):
            result = _call(action, ctx, ticket, step.non_retryable, tx)
    except BusinessFailure as exc:
        tx.rollback()
        duration = time.perf_counter() - started
        metrics.STEP_LATENCY.labels(saga.saga_type, step.name, "forward").observe(duration)
        rec.step_name = step.name
        rec.step_fields = {
            "status": StepStatus.FAILED,
            "attempts": saga.attempt,
            "last_error": f"{exc.code}: {exc.detail}"[:2000],
            "maybe_effect": saga.attempt > 1,
        }
        rec.event("step_failed", saga, step=step.name, detail=str(exc), duration_ms=duration * 1e3)
        rec.fields.update(failed_step=step.name, last_error=str(exc)[:2000])
        if i > definition.pivot_index:
            _escalate(saga, rec, step=step.name, error=f"{exc.code} after the pivot: {exc.detail}")
        else:
            _start_compensation(
                definition,
                saga,
                rec,
                reason=exc.code,
                failed_index=i,
                failed_may_have_effect=saga.attempt > 1,
            )
        return _write(saga, rec, inline_ok=inline_ok)
    except Exception as exc:  # noqa: BLE001 - anything but a BusinessFailure is transient
        tx.rollback()
        duration = time.perf_counter() - started
        metrics.STEP_LATENCY.labels(saga.saga_type, step.name, "forward").observe(duration)
        error = _describe(exc)
        rec.on_written = None  # a signal whose decision failed stays pending for the retry
        rec.step_name = step.name
        rec.step_fields = {
            "status": StepStatus.RETRYING,
            "attempts": saga.attempt,
            "last_error": error,
            "maybe_effect": True,
        }
        if saga.attempt >= max_attempts:
            wait = _held_back(saga, step, ticket)
            if wait is not None:
                return _park_for_provider(saga, rec, step=step.name, wait=wait, inline_ok=inline_ok)
            rec.event("step_failed", saga, step=step.name, detail=error, duration_ms=duration * 1e3)
            return _forward_exhausted(definition, saga, rec, error=error)
        _schedule_retry(
            saga,
            rec,
            step=step.name,
            phase="forward",
            error=error,
            took=duration,
            policy=step.retry,
        )
        return _write(saga, rec, inline_ok=inline_ok)
    except BaseException:
        tx.rollback()
        raise

    duration = time.perf_counter() - started
    metrics.STEP_LATENCY.labels(saga.saga_type, step.name, "forward").observe(duration)
    rec.step_name = step.name
    rec.step_fields = {
        "status": StepStatus.SUCCEEDED,
        "attempts": saga.attempt,
        "result": result,
        "took_effect": True,
    }
    rec.fields["results"] = {**saga.results, step.name: result}
    rec.event("step_succeeded", saga, step=step.name, duration_ms=duration * 1e3)
    _next_step(definition, saga, rec, i)
    return _write(saga, rec, inline_ok=inline_ok, tx=tx)


def _next_step(definition: SagaDefinition, saga: Saga, rec: _Record, i: int) -> None:
    """Step ``i`` is done: go on to the next one, or succeed after the last."""
    if i + 1 < len(definition.steps):
        rec.fields.update(step_index=i + 1, current_step=definition.steps[i + 1].name)
        rec.go_on = True
    else:
        rec.transitions.append("succeed")
        rec.fields.update(
            next_attempt_at=None, lease_until=None, finished_at=timezone.now(), attempt=0
        )
        rec.event("succeeded", saga)
        rec.finished = "succeeded"


def _forward_exhausted(
    definition: SagaDefinition, saga: Saga, rec: _Record, *, error: str, inline_ok: bool = True
) -> Saga | None:
    i = definition.index_of(saga.current_step)
    step = definition.steps[i]
    rec.step_name = step.name
    rec.step_fields = {
        **rec.step_fields,
        "status": StepStatus.FAILED,
        "attempts": saga.attempt,
        "maybe_effect": True,
        "last_error": error,
    }
    rec.fields.update(failed_step=step.name, last_error=error[:2000])
    if i >= definition.pivot_index:
        # The pivot (or a step past it) may have taken effect: nobody can undo that blindly.
        _escalate(saga, rec, step=step.name, error=f"step_failed at or after the pivot: {error}")
    else:
        _start_compensation(
            definition, saga, rec, reason="step_failed", failed_index=i, failed_may_have_effect=True
        )
    return _write(saga, rec, inline_ok=inline_ok)


def _compensate(definition: SagaDefinition, saga: Saga, *, inline_ok: bool) -> Saga | None:
    rec = _Record()
    i = definition.index_of(saga.current_step)
    step = definition.steps[i]
    rec.step_name = step.name
    max_attempts = _max_attempts(step, compensating=True)
    if saga.attempt > max_attempts:
        rec.step_fields = {"status": StepStatus.COMPENSATION_FAILED}
        _escalate(saga, rec, step=step.name, error="compensation attempts exhausted (worker lost)")
        return _write(saga, rec, inline_ok=False)
    ticket = _gate(step)
    if isinstance(ticket, provider_breaker.Wait):
        return _park_for_provider(saga, rec, step=step.name, wait=ticket, inline_ok=inline_ok)
    ctx = _context(definition, saga, compensating=True)
    tx = _StepTransaction(step.transactional)
    started = time.perf_counter()
    try:
        assert step.compensate is not None
        with tracing.saga_span(
            f"saga.compensate {step.name}", saga, step=step.name, phase="compensation"
        ):
            _call(step.compensate, ctx, ticket, tx=tx)
    except Exception as exc:  # noqa: BLE001 - a compensation must eventually succeed or escalate
        tx.rollback()
        duration = time.perf_counter() - started
        metrics.STEP_LATENCY.labels(saga.saga_type, step.name, "compensation").observe(duration)
        error = _describe(exc)
        wait = _held_back(saga, step, ticket) if saga.attempt >= max_attempts else None
        if wait is not None:
            rec.step_fields = {"status": StepStatus.COMPENSATING, "last_error": error}
            return _park_for_provider(saga, rec, step=step.name, wait=wait, inline_ok=inline_ok)
        if saga.attempt >= max_attempts:
            rec.step_fields = {
                "status": StepStatus.COMPENSATION_FAILED,
                "compensation_attempts": saga.attempt,
                "last_error": error,
            }
            rec.event(
                "compensation_failed",
                saga,
                step=step.name,
                detail=error,
                duration_ms=duration * 1e3,
            )
            _escalate(saga, rec, step=step.name, error=f"compensation failed: {error}")
            return _write(saga, rec, inline_ok=False)
        rec.step_fields = {
            "status": StepStatus.COMPENSATING,
            "compensation_attempts": saga.attempt,
            "last_error": error,
        }
        _schedule_retry(
            saga,
            rec,
            step=step.name,
            phase="compensation",
            error=error,
            took=duration,
            policy=step.compensation_retry,
        )
        return _write(saga, rec, inline_ok=inline_ok)
    except BaseException:
        tx.rollback()
        raise

    duration = time.perf_counter() - started
    metrics.STEP_LATENCY.labels(saga.saga_type, step.name, "compensation").observe(duration)
    metrics.COMPENSATIONS.labels(saga.saga_type, step.name).inc()
    rec.step_fields = {"status": StepStatus.COMPENSATED, "compensation_attempts": saga.attempt}
    rec.event("compensation_succeeded", saga, step=step.name, duration_ms=duration * 1e3)
    nxt = next_compensable(definition, saga, i)
    if nxt is None:
        rec.transitions.append("finish_compensation")
        rec.fields.update(
            next_attempt_at=None, lease_until=None, finished_at=timezone.now(), attempt=0
        )
        rec.event("compensated", saga, detail=f"reason: {saga.failure_code}")
        rec.finished = "compensated"
    else:
        rec.fields.update(step_index=nxt, current_step=definition.steps[nxt].name)
        rec.go_on = True
    return _write(saga, rec, inline_ok=inline_ok, tx=tx)


# ---------------------------------------------------------------------------------------------
# Parked steps (Wait, Sleep): see sagas.waits for the decision
# ---------------------------------------------------------------------------------------------
def _unpark(saga: Saga, rec: _Record) -> None:
    """Leaving a parked step, whichever way: the saga no longer waits for anything."""
    if saga.waiting_since is not None or saga.waiting_for:
        rec.fields.update(waiting_for="", waiting_since=None)


def _park(
    saga: Saga, step: Step, rec: _Record, decision: waits.WaitDecision, now: datetime
) -> None:
    """Park the saga: no lease, due at its timeout (or never), and nothing else to do.

    The first time it parks at this step, the wait starts (``waiting_since``), the timeline
    says what it waits for, and its deadline moves by the wait's length: the deadline bounds
    the time a saga works, and a declared wait bounds itself.
    """
    park = step.park
    assert park is not None
    rec.fields.update(
        waiting_for=park.signal, next_attempt_at=decision.wake_at, lease_until=None, attempt=0
    )
    if saga.waiting_since is None:
        rec.fields["waiting_since"] = now
        rec.step_name = step.name
        rec.step_fields = {"status": StepStatus.WAITING, "attempts": saga.attempt}
        until = f"until {decision.wake_at.isoformat()}" if decision.wake_at else "with no timeout"
        what = f"for signal {park.signal}" if park.signal else "timer"
        rec.event("waiting", saga, step=step.name, detail=f"{what} {until}")
        if saga.deadline_at is not None and park.duration:
            rec.fields["deadline_at"] = saga.deadline_at + timedelta(seconds=park.duration)
    if decision.wake_at is not None:
        # Short timers also get a doorbell with a countdown (on time, no sweep needed); long
        # ones rely on the sweeper alone, so a million parked sagas are only rows.
        delay = (decision.wake_at - now).total_seconds()
        if delay <= settings.SAGA_TIMER_RING_WITHIN:
            rec.ring_after = max(delay, 0.0)
    _write(saga, rec, inline_ok=False)
    return None


def _wait_timed_out(
    definition: SagaDefinition, saga: Saga, step: Step, rec: _Record, *, inline_ok: bool
) -> Saga | None:
    park = step.park
    assert park is not None
    i = definition.index_of(saga.current_step)
    error = f"no {park.signal} signal within {park.duration or 0:g}s"
    rec.step_name = step.name
    rec.step_fields = {"status": StepStatus.FAILED, "attempts": saga.attempt, "last_error": error}
    rec.event("wait_timed_out", saga, step=step.name, detail=error)
    rec.fields.update(failed_step=step.name, last_error=error)
    if park.on_timeout == "escalate" or i > definition.pivot_index:
        _escalate(saga, rec, step=step.name, error=error)
    else:
        _start_compensation(
            definition, saga, rec, reason="timed_out", failed_index=i, failed_may_have_effect=False
        )
    return _write(saga, rec, inline_ok=inline_ok)


def _consume(signal: SagaSignal, step: str) -> Callable[[], None]:
    def mark() -> None:
        SagaSignal.objects.filter(pk=signal.pk, consumed_at__isnull=True).update(
            consumed_at=timezone.now(), consumed_by=step
        )

    return mark


def run_claimed(saga: Saga, *, inline_ok: bool) -> Saga | None:
    """Do the one piece of work a claimed saga has; return it if the task should go on."""
    definition = definition_of(saga)
    timeout = step_timeout(definition.step(saga.current_step))
    if timeout > _current_task_timeout() + _TIMEOUT_SLACK:
        return _hand_back(saga, timeout)
    if saga.state == SagaState.RUNNING:
        return _forward(definition, saga, inline_ok=inline_ok)
    if saga.state == SagaState.COMPENSATING:
        return _compensate(definition, saga, inline_ok=inline_ok)
    return None


def _hand_back(saga: Saga, timeout: float) -> None:
    """The claimed step needs longer than this task may run (its doorbell was rung without the
    step's timeout): release the claim as if it never happened (no attempt counted) and ring
    again with time limits that fit the step."""
    with transaction.atomic():
        updated = _fenced_update(
            saga.id,
            saga.version,
            {"lease_until": None, "next_attempt_at": timezone.now(), "attempt": saga.attempt - 1},
        )
        if updated is not None:
            ring_on_commit(saga.id, updated.version, None, timeout)
    log.info("saga.handed_back", saga_id=str(saga.id), step=saga.current_step, timeout=timeout)
    return None


def advance(saga_id: Any, version: int, timeout: float | None = None) -> None:
    """The body of the ``sagas.run`` task: claim, then run due work within a time budget.

    ``timeout`` is the step timeout the task was sent for (its time limits derive from it);
    ``None`` means ``SAGA_STEP_TIMEOUT``.
    """
    started = time.monotonic()
    token = _task_timeout.set(timeout)
    try:
        saga = claim(saga_id, version, timeout)
        if saga is None:
            metrics.STALE_DELIVERIES.inc()
            return
        budget = settings.SAGA_INLINE_BUDGET
        with tracing.saga_span("saga.task", saga):
            while saga is not None:
                saga = run_claimed(saga, inline_ok=time.monotonic() - started < budget)
    finally:
        _task_timeout.reset(token)


# ---------------------------------------------------------------------------------------------
# The sweeper
# ---------------------------------------------------------------------------------------------
def sweep(now: datetime | None = None) -> dict[str, int]:
    """Ring for overdue sagas whose lease expired, and time out sagas past their deadline.

    Cost grows with the number of overdue sagas (a partial index holds only active ones), not
    with the table. ``FOR UPDATE SKIP LOCKED`` plus pushing ``next_attempt_at`` to now makes two
    sweeps at once harmless: each rings for different sagas, and a duplicate ring is fenced.
    """
    from sagas.services import saga_request_cancel

    now = now or timezone.now()
    stuck_after = settings.SAGA_STUCK_AFTER
    # Overdue by SAGA_STUCK_AFTER, doubled for every ring that has not been answered yet.
    overdue = Q()
    for n in range(_MAX_SWEEP_DOUBLINGS):
        overdue |= Q(sweeps=n, next_attempt_at__lte=now - timedelta(seconds=stuck_after * 2**n))
    overdue |= Q(
        sweeps__gte=_MAX_SWEEP_DOUBLINGS,
        next_attempt_at__lte=now - timedelta(seconds=stuck_after * 2**_MAX_SWEEP_DOUBLINGS),
    )
    batch = settings.SAGA_SWEEP_BATCH
    picked = (
        Saga.objects.select_for_update(skip_locked=True)
        .filter(state__in=_ACTIVE, next_attempt_at__lte=now - timedelta(seconds=stuck_after))
        .filter(Q(lease_until__isnull=True) | Q(lease_until__lte=now))
        .filter(overdue)
        .order_by("next_attempt_at")
        .values("id")[:batch]
    )
    qn = connection.ops.quote_name
    with transaction.atomic():
        # Pick and re-arm in one statement: UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP
        # LOCKED LIMIT n) RETURNING id, version.
        picked_sql, picked_params = picked.query.sql_with_params()
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {qn(Saga._meta.db_table)} SET {qn('next_attempt_at')} = %s, "
                f"{qn('sweeps')} = {qn('sweeps')} + 1 WHERE {qn('id')} IN ({picked_sql}) "
                f"RETURNING {qn('id')}, {qn('version')}, {qn('saga_type')}, "
                f"{qn('definition_version')}, {qn('current_step')}",
                [_prep("next_attempt_at", now), *picked_params],
            )
            to_uuid = Saga._meta.pk.to_python
            rows = [
                (to_uuid(saga_id), version, _timeout_of(saga_type, definition_version, step))
                for saga_id, version, saga_type, definition_version, step in cursor.fetchall()
            ]
        if rows:
            transaction.on_commit(lambda: ring_many(rows))
    if rows:
        metrics.SWEEP_REDISPATCHED.inc(len(rows))
        log.info("saga.sweep_redispatched", count=len(rows))

    # Past the deadline and still before its pivot (after it, a saga must finish, not undo).
    # The pivot test is in SQL so sagas past their pivot never fill the batch and starve the rest.
    before_pivot = Q()
    for definition in registered_definitions():
        before_pivot |= Q(
            saga_type=definition.saga_type,
            definition_version=definition.version,
            current_step__in=definition.names[: definition.pivot_index],
        )
    timed_out = 0
    late = (
        Saga.objects.filter(state=SagaState.RUNNING, cancel_reason="", deadline_at__lte=now)
        .filter(before_pivot)
        .order_by("deadline_at")
        .values_list("id", flat=True)[:batch]
        if before_pivot
        else []
    )
    from sagas.exceptions import SagaOperationRefused

    for saga_id in late:
        try:
            saga_request_cancel(saga_id=saga_id, reason="timed_out", actor="sweeper")
            timed_out += 1
        except (SagaOperationRefused, LookupError):
            continue  # it moved on (pivot reached, finished) since the query: nothing to do
    return {"redispatched": len(rows), "timed_out": timed_out}
