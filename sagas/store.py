"""The row store: the saga row's fenced SQL, the claim, and the record of an outcome.

The database row is the truth. A task **claims** a saga with one conditional ``UPDATE ...
RETURNING`` that bumps ``version`` and sets a lease (zero rows: the doorbell was stale or a
duplicate), and **records** an outcome in one transaction fenced on the claimed version: the
saga row, the step row and the timeline events (on PostgreSQL one statement). A record that no
longer matches the version (a newer claim holds the saga) changes nothing. What the outcome is
is the runner's business (:mod:`sagas.runner`); this module only writes it, or refuses to.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg
import structlog
from django.conf import settings
from django.db import (
    DEFAULT_DB_ALIAS,
    DatabaseError,
    OperationalError,
    connection,
    connections,
    models,
    transaction,
)
from django.db.backends.postgresql.base import Cursor as _DjangoClientCursor
from django.db.backends.postgresql.base import ServerBindingCursor as _DjangoServerCursor
from django.db.backends.utils import CursorWrapper
from django.db.models import Exists, Field, Q
from django.utils import timezone
from psycopg._queries import PostgresQuery, _query2pg_nocache

from config.db import NO_FLUSH_WAIT, column_of
from sagas import metrics
from sagas import transactions as step_transactions
from sagas.definition import (
    SagaDefinition,
    change_hook,
    registered_definitions,
    registry_generation,
    type_change_hook,
)
from sagas.doorbell import ring_on_commit
from sagas.models import ACTIVE_STATES, UNDONE_STATUSES, Saga, SagaEvent, SagaState, SagaStep
from sagas.timing import (
    TIMEOUT_SLACK,
    current_task_timeout,
    doorbell_only,
    lease_only_commits,
    lease_seconds,
    max_attempts_of,
    step_timeout,
    task_timeout,
    timeout_at,
    within_inline_budget,
)

log = structlog.get_logger("sagas.engine")

# Fields returned by every claim and record, in model order (what the loop needs to go on).
_SAGA_FIELDS = list(Saga._meta.concrete_fields)
_FIELD_BY_NAME = {f.name: f for f in _SAGA_FIELDS}


_CONVERTERS: list[tuple[int, Any, list]] | None = None
_DJANGO_CURSORS = (_DjangoClientCursor, _DjangoServerCursor)
_ACTIVE = tuple(str(s) for s in ACTIVE_STATES)
# A message may arrive a hair before the due time it was scheduled for.
_DUE_TOLERANCE = timedelta(milliseconds=50)


class _Fenced(Exception):
    """The saga moved on under us (a newer claim holds it): roll back and stop."""


class StepTransaction:
    """The transaction a ``transactional`` step's function shares with its record.

    Opened just before the call. The record commits it, so the participant's write and the
    saga's progress land together (one commit, not two); a function that raises, or a record
    fenced off by a newer claim, rolls it back, so the write never outlives a lost record. For
    any other step it does nothing.
    """

    __slots__ = ("_atomic", "_after", "_token")

    def __init__(self, enabled: bool) -> None:
        self._atomic: Any = None
        self._after: list[Callable[[], None]] = []
        self._token: Any = None
        if enabled:
            self._atomic = transaction.atomic()
            self._atomic.__enter__()
            # A participant's own atomic blocks join this transaction without a savepoint.
            self._token = step_transactions.enter_step(self._atomic, self._after)

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
                try:
                    step_transactions.leave_step(self._token)
                finally:  # the transaction ends whatever happens to the marker
                    if rollback:
                        transaction.set_rollback(True)
                    atomic.__exit__(None, None, None)
        finally:
            after, self._after = self._after, []
            for fn in after:
                fn()


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


def _db() -> Any:
    """The default database's wrapper itself, not Django's ``connection`` proxy.

    Every attribute read through the proxy looks the wrapper up again in a context-local
    (asgiref); the engine's hot path reads it about 150 times per saga (field preparation,
    converters, ``ops``), so each statement's builder resolves it once and passes it on.
    """
    return connections[DEFAULT_DB_ALIAS]


def _row_to_saga(row: Iterable[Any]) -> Saga:
    db = _db()
    values = list(row)
    for i, col, convs in _converters():
        for conv in convs:
            values[i] = conv(values[i], col, db)
    return Saga.from_db(db.alias, _ATTNAMES, values)


def _plain_types(f: Field[Any, Any]) -> tuple[type, ...]:
    """The Python types a field stores as they are (Django's preparation returns them
    untouched). Only these exact field classes: a subclass may convert on save (an encrypted
    text field, say). Integers are not among them either: PostgreSQL's backend wraps each one
    in its column's exact type (``Int2``, ``Int8``)."""
    return _PLAIN_BY_FIELD_CLASS.get(type(f), ())


_PLAIN_BY_FIELD_CLASS: dict[type, tuple[type, ...]] = {
    models.CharField: (type(None), str),
    models.TextField: (type(None), str),
    models.BooleanField: (type(None), bool),
    models.FloatField: (type(None), float),
    models.DateTimeField: (type(None), datetime),
}


def _prep(f: Field[Any, Any], plain: tuple[type, ...], value: Any, db: Any) -> Any:
    """``f.get_db_prep_save(value, db)``, short-cut for the values it would return as they are.

    A record prepares about 70 values per saga through four layers of Django calls each, most
    of them strings and timestamps that come back unchanged. Only exact types count (an enum
    member or a lazy string takes Django's way), and a datetime only when it is aware and the
    database is PostgreSQL, whose adapter takes it as it is (SQLite's makes a string).
    """
    kind = type(value)
    if kind in plain and (kind is not datetime or (value.tzinfo and db.vendor == "postgresql")):
        return value
    return f.get_db_prep_save(value, db)


_PLAIN = {f.name: _plain_types(f) for f in _SAGA_FIELDS}


def prep(name: str, value: Any, db: Any = None) -> Any:
    """A saga column's database value, as Django would prepare it for a save."""
    return _prep(_FIELD_BY_NAME[name], _PLAIN[name], value, db or _db())


def _saga_update_sql(
    saga_id: Any,
    expected_version: int,
    values: dict[str, Any],
    *,
    bump_attempt: bool = False,
    require_due_before: datetime | None = None,
    require_active: bool = False,
    require_known: bool = False,
    require_cancel_reason: str | None = None,
    require_data: dict[str, Any] | None = None,
) -> tuple[str, list[Any]]:
    """``UPDATE saga SET ..., version = version + 1 WHERE id = X AND version = V RETURNING *``.

    The text depends only on the statement's shape (which columns, which conditions), so it is
    built once per shape and process; only the parameters are worked out per call.
    """
    db = _db()
    values = {**values, "updated_at": timezone.now()}
    due = require_due_before is not None
    # Only a saga whose definition this process has, with the same shape: a worker on older
    # code leaves the rest untouched (no lease, no attempt) for one that knows it.
    known = _known_definitions() if require_known else None
    n_known = None if known is None else len(known)
    unchanged_cancel = require_cancel_reason is not None
    unchanged_data = require_data is not None
    shape = (
        db.vendor,
        tuple(values),
        bump_attempt,
        due,
        require_active,
        n_known,
        unchanged_cancel,
        unchanged_data,
    )
    sql = _SQL_BY_SHAPE.get(shape)
    if sql is None:
        sql = _SQL_BY_SHAPE[shape] = _saga_update_text(*shape[1:])
    params = [prep(name, value, db) for name, value in values.items()]
    params += [prep("id", saga_id, db), expected_version]
    if require_active:
        params += _ACTIVE
    if known is not None:
        for triple in known:
            params += triple
    if require_due_before is not None:
        params.append(prep("next_attempt_at", require_due_before, db))
        params.append(prep("lease_until", require_due_before - _DUE_TOLERANCE, db))
    if require_cancel_reason is not None:
        params.append(require_cancel_reason)
    if require_data is not None:
        params.append(prep("data", require_data, db))
    return sql, params


#: Statement texts by shape, see :func:`_saga_update_sql` and :func:`_record_sql_postgres`.
_SQL_BY_SHAPE: dict[tuple, str] = {}


def _saga_update_text(
    names: tuple[str, ...],
    bump_attempt: bool,
    require_due: bool,
    require_active: bool,
    n_known: int | None,
    unchanged_cancel: bool = False,
    unchanged_data: bool = False,
) -> str:
    qn = connection.ops.quote_name
    sets = [f"{qn('version')} = {qn('version')} + 1"]
    if bump_attempt:
        sets.append(f"{qn('attempt')} = {qn('attempt')} + 1")
    sets += [f"{qn(column_of(_FIELD_BY_NAME[name]))} = %s" for name in names]
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
    if unchanged_cancel:
        # A cancel request does not move the version of a saga whose step is in flight (its
        # record must land); a batch of steps must not land past one it never saw.
        where.append(f"{qn('cancel_reason')} = %s")
    if unchanged_data:
        # Nor does a change of ``data`` (saga_data_flag): a record told to no change hook must
        # not land past one that made the hook want the saga (see write).
        where.append(f"{qn('data')} = %s")
    columns = ", ".join(qn(column_of(f)) for f in _SAGA_FIELDS)
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


class _PreparedCursor(psycopg.Cursor):
    """Server-side binding, the statement prepared on its first use in a connection.

    The engine runs a handful of statement texts (one per shape, see :func:`_saga_update_sql`)
    thousands of times per connection. Sent as text, PostgreSQL parses, analyses and plans each
    one every time, about half of its CPU per saga; prepared, it only binds and executes.
    """

    def execute(
        self, query: Any, params: Any = None, *, prepare: bool | None = None, binary: Any = None
    ) -> Any:
        return super().execute(query, params, prepare=True, binary=binary)

    def _convert_query(self, query: Any, params: Any = None) -> PostgresQuery:
        """psycopg's own conversion, its parse of the text kept for every engine statement.

        psycopg caches the parse of a statement's text (placeholders into ``$n``) only for
        texts under 4 KB with at most 50 parameters, to spare its cache the endless variety
        an ORM generates. The engine's statements are few (one per shape, each built once),
        but a record of several steps is longer than that, and parsed again every time it
        cost about half a millisecond per saga. So this cursor keeps every parse itself.
        """
        pgq = self._query_cls(self._tx)
        if params is None or not isinstance(query, str):
            pgq.convert(query, params)
            return pgq
        key = (query, self._tx.encoding)
        parsed = _PARSED.get(key)
        if parsed is None:
            parsed = _PARSED[key] = _query2pg_nocache(query.encode(self._tx.encoding), key[1])
        pgq.query, pgq._want_formats, pgq._order, pgq._parts = parsed
        pgq.dump(params)
        return pgq


#: Parsed statement texts of :class:`_PreparedCursor`: bounded by the engine's shapes.
_PARSED: dict[tuple[str, str], Any] = {}


# A prepare_threshold of None (Django's default, for connection poolers) refuses even an
# explicit prepare=True; this one lets this module's cursor prepare while every other cursor,
# which does not ask, keeps behaving as before.
_ONLY_WHEN_ASKED = 2**31 - 1


def _saga_cursor() -> Any:
    """A cursor for the engine's saga statements: Django's own, except that on PostgreSQL with
    ``SAGA_PREPARED_STATEMENTS`` the statements are prepared.

    Still wrapped by Django (execute wrappers, error translation). Sent as text, unprepared,
    where the text is wanted: while Django logs queries (``DEBUG``, a test capturing them),
    whose log of a prepared statement would have no SQL, and where something else installed
    the connection's cursor class (OpenTelemetry's SQL tracing), so the statements stay traced.
    """
    db = _db()
    if db.vendor != "postgresql" or not settings.SAGA_PREPARED_STATEMENTS or db.queries_logged:
        return db.cursor()
    db.close_if_health_check_failed()
    db.ensure_connection()
    raw = db.connection
    if raw.cursor_factory not in _DJANGO_CURSORS:
        return db.cursor()
    if raw.prepare_threshold is None:
        raw.prepare_threshold = _ONLY_WHEN_ASKED
    db.validate_thread_sharing()
    with db.wrap_database_errors:
        return CursorWrapper(_PreparedCursor(raw), db)


def _fetch_saga(sql: str, params: list[Any]) -> Saga | None:
    with _saga_cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return None if row is None else _row_to_saga(row)


def fenced_update(saga_id: Any, expected_version: int, values: dict[str, Any], **kw: Any):
    """Run the fenced UPDATE; ``None`` when no row matched (stale or duplicate delivery)."""
    return _fetch_saga(*_saga_update_sql(saga_id, expected_version, values, **kw))


_EVENT_COLUMNS = ("at", "kind", "step", "attempt", "detail", "actor", "duration_ms")


def _no_flush_wait(sql: str) -> str:
    """``UPDATE ... RETURNING cols`` as a statement whose commit does not wait for the disk."""
    return f"WITH {NO_FLUSH_WAIT}, u AS ({sql}) SELECT u.* FROM u, nf"


def _claim_text(sql: str, n_leaving: int) -> str:
    """A claim's ``UPDATE ... RETURNING cols`` as a statement whose commit waits for the disk
    only if the saga it took is about to run a forward step that may leave the database (one
    of ``n_leaving`` ``(type, version, step)`` parameters after the claim's own, see
    :func:`steps_leaving_database`); otherwise, like any claim, it does not wait.

    Decided inside the statement, from the row it returns: which step a claim runs is known
    only once it has taken the saga, and asking afterwards would cost a round trip. The wait
    is the session's own ``synchronous_commit`` (a server that never waits stays so).
    """
    if not n_leaving:
        return _no_flush_wait(sql)
    qn = connection.ops.quote_name
    triple = f"(u.{qn('saga_type')}, u.{qn('definition_version')}, u.{qn('current_step')})"
    leaving = ", ".join(["(%s, %s, %s)"] * n_leaving)
    return (
        f"WITH u AS ({sql}), nf AS (SELECT set_config('synchronous_commit', CASE WHEN "
        f"u.{qn('state')} = '{SagaState.RUNNING}' AND {triple} IN ({leaving}) "
        "THEN current_setting('synchronous_commit') ELSE 'off' END, true) FROM u) "
        "SELECT u.* FROM u, nf"
    )


def steps_leaving_database() -> list[tuple[str, int, str]]:
    """``(type, version, step)`` of every registered forward step that may leave the database
    (:attr:`sagas.definition.Step.may_leave_database`); kept until the registry changes."""
    return _steps_leaving(registry_generation())


@functools.lru_cache(maxsize=1)
def _steps_leaving(generation: int) -> list[tuple[str, int, str]]:
    # The generation is read before the registry: a change meanwhile is seen at the next call.
    return [
        (d.saga_type, d.version, step.name)
        for d in registered_definitions()
        for step in d.steps
        if step.may_leave_database
    ]


@functools.lru_cache(maxsize=1)
def _leaving_set(generation: int) -> frozenset[tuple[str, int, str]]:
    return frozenset(_steps_leaving(generation))


def _runs_leaving_step(saga: Saga, step: str) -> bool:
    """Whether the forward step ``step`` of the saga (running) may leave the database."""
    leaving = _leaving_set(registry_generation())
    return saga.state == SagaState.RUNNING and (
        (saga.saga_type, saga.definition_version, step) in leaving
    )


def _record_sql_postgres(
    saga: Saga,
    fields: dict[str, Any],
    rec: Record,
    now: datetime,
    *,
    wait_flush: bool = True,
    claim_next: bool = False,
) -> tuple[str, list[Any]]:
    """The whole record as ONE statement: fenced saga UPDATE, step UPDATEs, event INSERTs.

    PostgreSQL runs data-modifying CTEs atomically in one statement, and the step updates and
    event inserts only touch rows when the fenced UPDATE matched (they read from it). One round
    trip instead of five (BEGIN, three statements, COMMIT) is most of the engine's speed. Its
    text, like the saga UPDATE's, is built once per shape.

    ``claim_next``: the statement also claims the next due saga for the pump
    (:func:`claiming_ahead`), never this one, whether or not the fenced UPDATE matched; its
    row comes back beside the record's.
    """
    saga_sql, params = _saga_update_sql(
        saga.id,
        saga.version,
        fields,
        require_cancel_reason=rec.cancel_reason_seen,
        require_data=rec.data_seen,
    )
    rows = []
    for name, values in rec.step_rows():
        if values:  # a row with nothing but the timestamp to set is left alone
            rows.append((name, {**values, "updated_at": now}))
    carried = tuple(c.ctes for c in rec.carried)
    answers = tuple(column for c in rec.carried for column in c.columns)
    step_shape = tuple(tuple(values) for _, values in rows)
    # Never the record's own saga: one a signal made due and free meanwhile (its record then
    # fenced off) would come back looking like the record's row, and two CTEs must not both
    # update one row.
    claim_sql, claim_params = _claim_due_sql(other_than=saga.id) if claim_next else ("", [])
    shape = (
        "record",
        saga_sql,
        wait_flush,
        step_shape,
        len(rec.events),
        carried,
        claim_sql,
        answers,
    )
    sql = _SQL_BY_SHAPE.get(shape)
    if sql is None:
        sql = _SQL_BY_SHAPE[shape] = _record_text(*shape[1:])
    db = _db()
    saga_id = prep("id", saga.id, db)
    for name, values in rows:
        for column, value in values.items():
            params.append(_prep(_STEP_FIELDS[column], _STEP_PLAIN[column], value, db))
        params += [saga_id, name]
    for e in rec.events:
        values = {"at": now, "actor": "engine", "duration_ms": None, **e}
        params += [values[c] for c in _EVENT_COLUMNS]
    for c in rec.carried:
        params += c.params
    return sql, params + claim_params


_STEP_FIELDS = {f.name: f for f in SagaStep._meta.concrete_fields}
_STEP_PLAIN = {name: _plain_types(f) for name, f in _STEP_FIELDS.items()}
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
    saga_sql: str,
    wait_flush: bool,
    step_rows: tuple[tuple[str, ...], ...],
    n_events: int,
    carried: tuple[str, ...] = (),
    claim_sql: str = "",
    answers: tuple[str, ...] = (),
) -> str:
    qn = connection.ops.quote_name
    head = "WITH " if wait_flush else f"WITH {NO_FLUSH_WAIT}, "
    parts = [f"{head}s AS ({saga_sql})"]
    for n, names in enumerate(step_rows):
        sets = ", ".join(f"{qn(column_of(_STEP_FIELDS[name]))} = %s" for name in names)
        parts.append(
            f", st{n} AS (UPDATE {qn(SagaStep._meta.db_table)} SET {sets} "
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
    parts += [f", {ctes}" for ctes in carried]
    columns = ", ".join([*(qn(column_of(f)) for f in _SAGA_FIELDS), *answers])
    if claim_sql:
        assert not answers  # a task letting go of the saga goes on into none of its steps
        # Only in a statement that waits for the disk: the claim may be of a step that leaves
        # the database, whose claim must (see _claim_text).
        assert wait_flush
        parts.append(f", n AS ({claim_sql}) SELECT {columns} FROM s UNION ALL SELECT * FROM n")
    else:
        parts.append(f" SELECT {columns} FROM s" if wait_flush else f" SELECT {columns} FROM s, nf")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# A new saga's rows
# ---------------------------------------------------------------------------------------------
def insert_new(saga: Saga, steps: Sequence[tuple[str, str]], event: SagaEvent) -> None:
    """Insert a new saga, its step rows (``(name, idempotency key)`` in order) and its first
    timeline event.

    On PostgreSQL one statement (the inserts as data-modifying CTEs, the text built once per
    number of steps) instead of three built by the ORM: starting a saga is on the path of every
    request that starts one, and its round trips count in the saga's latency. A new step row
    differs from a blank one only in its saga, position, name and key, so its values are
    prepared once per process (:func:`_blank_step_params`) rather than through a model
    instance per step (a sixth less CPU per start, measured in-process). Elsewhere, the ORM's
    three inserts. No ``post_save`` is sent either way (nothing listens for these).
    """
    if connection.vendor != "postgresql":
        saga.save(force_insert=True)
        SagaStep.objects.bulk_create(
            SagaStep(saga=saga, index=i, name=name, idempotency_key=key)
            for i, (name, key) in enumerate(steps)
        )
        event.save(force_insert=True)
        return
    shape = ("insert", len(steps))
    sql = _SQL_BY_SHAPE.get(shape)
    if sql is None:
        sql = _SQL_BY_SHAPE[shape] = _insert_text(len(steps))
    db = _db()
    params: list[Any] = [
        f.get_db_prep_save(f.pre_save(saga, True), db) for f in _insert_fields(Saga)
    ]
    blank, (at_saga, at_index, at_name, at_key) = _blank_step_params(db)
    saga_id = params[_saga_id_position()]
    for i, (name, key) in enumerate(steps):
        row = blank.copy()
        row[at_saga], row[at_index], row[at_name], row[at_key] = saga_id, i, name, key
        params += row
    params += [f.get_db_prep_save(f.pre_save(event, True), db) for f in _insert_fields(SagaEvent)]
    with _saga_cursor() as cursor:
        cursor.execute(sql, params)
    saga._state.adding = False
    saga._state.db = db.alias


_BLANK_STEP: dict[str, tuple[list[Any], tuple[int, ...]]] = {}


def _blank_step_params(db: Any) -> tuple[list[Any], tuple[int, ...]]:
    """A new step row's prepared values, and where its saga, index, name and key go.

    Every other column of a new step takes its default, the same for every saga. (A default
    that changes per row, a callable, ``auto_now`` or a database default, would make this
    wrong: the model has none, and ``tests/sagas/test_store_params.py`` pins that, and that a
    started saga's rows equal the ORM's.)
    """
    cached = _BLANK_STEP.get(db.alias)
    if cached is None:
        fields = _insert_fields(SagaStep)
        blank = SagaStep(index=0, name="", idempotency_key="")
        values = [f.get_db_prep_save(f.pre_save(blank, True), db) for f in fields]
        names = [f.name for f in fields]
        where = tuple(names.index(n) for n in ("saga", "index", "name", "idempotency_key"))
        cached = _BLANK_STEP[db.alias] = (values, where)
    return cached


@functools.cache
def _saga_id_position() -> int:
    return [f.name for f in _insert_fields(Saga)].index("id")


def _insert_fields(model: type[Any]) -> list[Field[Any, Any]]:
    """The columns Django's own INSERT would write: all but an auto-increment key."""
    meta = model._meta
    return [f for f in meta.local_concrete_fields if f is not meta.auto_field]


def _insert_text(n_steps: int) -> str:
    qn = connection.ops.quote_name

    def insert(model: type[Any], rows: int) -> str:
        fields = _insert_fields(model)
        row = "(" + ", ".join(["%s"] * len(fields)) + ")"
        cols = ", ".join(qn(column_of(f)) for f in fields)
        return f"INSERT INTO {qn(model._meta.db_table)} ({cols}) VALUES {', '.join([row] * rows)}"

    return (
        f"WITH s AS ({insert(Saga, 1)}), st AS ({insert(SagaStep, n_steps)}) {insert(SagaEvent, 1)}"
    )


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
    if connection.vendor == "postgresql" and lease_only_commits():
        leaving = steps_leaving_database()
        shape = ("claim", sql, len(leaving))
        text = _SQL_BY_SHAPE.get(shape)
        if text is None:
            text = _SQL_BY_SHAPE[shape] = _claim_text(sql, len(leaving))
        sql = text
        for triple in leaving:
            params += triple
    return _fetch_saga(sql, params)


def claim_due() -> Saga | None:
    """Take the oldest saga that is due now and free, for a pump (see :mod:`sagas.pumps`);
    ``None`` if there is none. PostgreSQL only.

    One statement: ``UPDATE ... WHERE id = (SELECT ... ORDER BY next_attempt_at LIMIT 1 FOR
    UPDATE SKIP LOCKED) RETURNING *``, so pumps at once take different sagas, and a doorbell
    still on its way for the saga finds it claimed (a stale delivery, fenced as ever). The same
    conditions as a doorbell's claim (active, due, a definition this process has), except that
    the saga must be held by no task at all: a lease that expired (its task died) is the
    sweeper's to ring, so the pumps' index (``saga_due_free_idx``) holds only sagas waiting
    for a task, and a pump never scans past running work. Not a saga whose step needs longer
    than a pump's task may run either (:func:`~sagas.timing.doorbell_only`): that saga keeps
    the doorbell sent with limits of its own.

    A pump mostly does not need this statement: the record that lets go of the saga before
    makes the same claim (:func:`claiming_ahead`).
    """
    if connection.vendor != "postgresql":
        return None
    sql, params = _claim_due_sql()
    if not lease_only_commits():
        return _fetch_saga(sql, params)
    leaving = steps_leaving_database()
    shape = ("claim_due", sql, len(leaving))
    text = _SQL_BY_SHAPE.get(shape)
    if text is None:
        text = _SQL_BY_SHAPE[shape] = _claim_text(sql, len(leaving))
    for triple in leaving:
        params += triple
    return _fetch_saga(text, params)


def _claim_due_sql(other_than: Any = None) -> tuple[str, list[Any]]:
    """:func:`claim_due`'s ``UPDATE ... RETURNING`` and its parameters, the text built once per
    shape (how many definitions this process has, how many steps are too long for a pump).

    ``other_than``: a saga it must not take (the one a record carrying the claim writes).
    """
    now = timezone.now()
    known, long_steps = _known_definitions(), _long_steps()
    other = other_than is not None
    shape = ("claim_due_update", len(known), len(long_steps), other)
    sql = _SQL_BY_SHAPE.get(shape)
    if sql is None:
        qn = connection.ops.quote_name
        sets = ", ".join(
            [f"{qn('version')} = {qn('version')} + 1", f"{qn('attempt')} = {qn('attempt')} + 1"]
            + [f"{qn(c)} = %s" for c in ("lease_until", "sweeps", "updated_at")]
        )
        columns = ", ".join(qn(column_of(f)) for f in _SAGA_FIELDS)
        table = qn(Saga._meta.db_table)
        sql = _SQL_BY_SHAPE[shape] = (
            f"UPDATE {table} SET {sets} WHERE {qn('id')} = (SELECT {qn('id')} FROM {table} "
            f"WHERE {_due_text(len(known), len(long_steps))}"
            + (f" AND {qn('id')} <> %s" if other else "")
            + f" ORDER BY {qn('next_attempt_at')} LIMIT 1 FOR UPDATE SKIP LOCKED) "
            f"RETURNING {columns}"
        )
    params = [
        prep("lease_until", now + timedelta(seconds=lease_seconds(task_timeout.get()))),
        0,
        prep("updated_at", now),
        *_due_params(now, known, long_steps),
    ]
    if other:
        params.append(prep("id", other_than))
    return sql, params


class ClaimAhead:
    """The saga a pump's record claimed for it (:func:`claiming_ahead`): at most one."""

    __slots__ = ("sagas",)

    def __init__(self) -> None:
        self.sagas: list[Saga] = []

    def take(self) -> Saga | None:
        return self.sagas.pop(0) if self.sagas else None


_AHEAD: ContextVar[ClaimAhead | None] = ContextVar("saga_claim_ahead", default=None)


@contextlib.contextmanager
def claiming_ahead() -> Iterator[ClaimAhead]:
    """While a pump runs: the record that lets go of a saga also claims the next due one.

    A pump's round is "record this saga, claim the next": two statements, and the record
    waits for the disk anyway (a saga that ends, parks or hands over always does), so the
    claim rides in it (:func:`claim_due`'s ``UPDATE`` as one more CTE) for one round trip and
    one commit fewer per saga. The saga claimed is handed over once that commit has happened
    (``on_commit``): a record that rolls back takes its claim with it. A saga the pump will
    not start after all it releases (its claim undone, a doorbell rung), or the sweeper rings
    for it once the lease runs out.
    """
    ahead = ClaimAhead()
    token = _AHEAD.set(ahead)
    try:
        yield ahead
    finally:
        _AHEAD.reset(token)


def due_saga(due_before: datetime | None = None) -> tuple[Any, int] | None:
    """``(id, version)`` of the saga :func:`claim_due` would take now, without taking it;
    with ``due_before``, only one due since before then.

    Rows another transaction holds locked are passed over as :func:`claim_due` passes them
    (the lock this statement takes ends with it, and its commit waits for no WAL flush: it
    changed nothing): a doorbell rung for a locked row would only wait on the lock.
    """
    if connection.vendor != "postgresql":
        return None
    now = timezone.now()
    known, long_steps = _known_definitions(), _long_steps()
    shape = ("due_saga", len(known), len(long_steps))
    sql = _SQL_BY_SHAPE.get(shape)
    if sql is None:
        qn = connection.ops.quote_name
        sql = _SQL_BY_SHAPE[shape] = _no_flush_wait(
            f"SELECT {qn('id')}, {qn('version')} FROM {qn(Saga._meta.db_table)} "
            f"WHERE {_due_text(len(known), len(long_steps))} "
            f"ORDER BY {qn('next_attempt_at')} LIMIT 1 FOR UPDATE SKIP LOCKED"
        )
    params = _due_params(now, known, long_steps)
    if due_before is not None:
        params[0] = prep("next_attempt_at", due_before)
    with _saga_cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    return None if row is None else (row[0], row[1])


def _due_text(n_known: int, n_long: int) -> str:
    """The WHERE of a due, free saga a pump may take (parameters: :func:`_due_params`).

    The states and ``lease_until IS NULL`` are literals, not parameters: the pumps' partial
    index (``saga_due_free_idx``) is then usable by a prepared statement's generic plan too.
    """
    qn = connection.ops.quote_name
    states = ", ".join(f"'{s}'" for s in _ACTIVE)
    where = [
        f"{qn('state')} IN ({states})",
        f"{qn('next_attempt_at')} <= %s",
        f"{qn('lease_until')} IS NULL",
        f"({qn('saga_type')}, {qn('definition_version')}, {qn('definition_fingerprint')}) "
        f"IN ({', '.join(['(%s, %s, %s)'] * n_known)})",
    ]
    if n_long:
        where.append(
            f"({qn('saga_type')}, {qn('definition_version')}, {qn('current_step')}) "
            f"NOT IN ({', '.join(['(%s, %s, %s)'] * n_long)})"
        )
    return " AND ".join(where)


def _due_params(
    now: datetime, known: list[tuple[str, int, str]], long_steps: list[tuple[str, int, str]]
) -> list[Any]:
    params: list[Any] = [prep("next_attempt_at", now + _DUE_TOLERANCE)]
    for triple in (*known, *long_steps):
        params += triple
    return params


def _long_steps() -> list[tuple[str, int, str]]:
    """``(type, version, step)`` of registered steps too long for a pump's task."""
    return [
        (d.saga_type, d.version, step.name)
        for d in registered_definitions()
        for step in d.steps
        if doorbell_only(step_timeout(step))
    ]


def ladder_rows(saga_id: Any) -> tuple[frozenset[str], frozenset[str]]:
    """Names of the saga's steps whose undo has run (by the engine or by hand), which the undo
    ladder passes by, and of those whose row says a run may have taken effect
    (``maybe_effect``), which it takes (:func:`sagas.definition.next_compensable`). Read on
    the compensation path only, in one query."""
    rows = SagaStep.objects.filter(
        Q(status__in=UNDONE_STATUSES) | Q(maybe_effect=True), saga_id=saga_id
    ).values_list("name", "status")
    undone = frozenset(name for name, status in rows if status in UNDONE_STATUSES)
    return undone, frozenset(name for name, _ in rows) - undone


def mark_maybe_effect(saga_id: Any, names: list[str]) -> None:
    """Mark the steps ``names`` as possibly having taken effect with no record saying so."""
    SagaStep.objects.filter(saga_id=saga_id, name__in=names).update(maybe_effect=True)


def run_suspects(definition: SagaDefinition, i: int) -> list[str]:
    """The steps a task that claimed step ``i`` for its first run may have run with it and
    recorded once (:meth:`sagas.definition.SagaDefinition.run_after`): none on a database
    where no run is recorded once (SQLite), nor from a step allowed a single attempt, where
    no run starts (:func:`sagas.runner._batches_on`)."""
    later = definition.run_after(i)
    if not later or connection.vendor != "postgresql":
        return []
    if max_attempts_of(definition.steps[i], compensating=False) < 2:
        return []
    return [definition.steps[j].name for j in later]


def mark_unrecorded_run(definition: SagaDefinition, saga_id: Any, i: int) -> None:
    """Mark the steps a lost first run of step ``i`` may have reached (:func:`run_suspects`)
    ``maybe_effect``, if no run of step ``i`` was ever recorded.

    Called when a run of step ``i`` is known to have ended with no record (the step claimed
    again, or its attempts started over by an operator). Only the first run of a step is ever
    part of a run of several (:func:`sagas.runner._drive`), and its record would have left
    the row's ``attempts`` above 0: if it did not, the task that ran it may have gone on
    through the steps after it and lost their record with its own. One statement, off the
    happy path.
    """
    later = run_suspects(definition, i)
    if not later:
        return
    step = definition.steps[i].name
    recorded = SagaStep.objects.filter(saga_id=saga_id, name=step, attempts__gt=0)
    SagaStep.objects.filter(saga_id=saga_id, name__in=later).filter(~Exists(recorded)).update(
        maybe_effect=True
    )


def effect_possible(saga: Saga, step: str, *, claimed: bool) -> bool:
    """Whether an earlier run of the forward step ``step`` may have taken effect: one before
    the claim running now (``claimed``), or any run so far (an operator's question).

    The step's row knows the runs that were recorded: every record of a failure that may have
    come after the effect (a timeout, a lost worker) sets ``maybe_effect``, and ``attempts`` is
    the number of the last recorded run. A run numbered above it with no record of its own (its
    worker died, or a newer claim fenced it off) may have taken effect too. The saga's attempt
    counter alone cannot say it: a park gives its claim back, so a canary whose call timed out
    after taking effect leaves the counter as if the step had never run. Asked only off the
    happy path (a cancel, a deadline, a failure, an operator), so the row is always read: no
    column of the saga's row can stand in for it (an operator's retry writes ``maybe_effect``
    and leaves nothing else behind).
    """
    before = saga.attempt - 1 if claimed else saga.attempt
    row = (
        SagaStep.objects.filter(saga_id=saga.id, name=step)
        .values_list("maybe_effect", "attempts")
        .first()
    )
    if row is None:
        return before > 0
    maybe, recorded = row
    return maybe or before > recorded


def released_lease(timeout: float, now: datetime) -> datetime | None:
    """The lease of a saga let go of with a doorbell rung for it (handed on or back, due now;
    a retry or a park on its provider, due later): none, or for a step only its doorbell runs,
    one that has already run out.

    Every reader takes a lease that ran out as no lease (the doorbell's claim, the sweeper,
    ``saga_migrate``, the ops console's "stuck"), except the pumps' partial index
    (``saga_due_free_idx``, ``lease_until IS NULL``), which is the point: a pump passes these
    sagas by anyway, and while they waited in its index for their doorbells (a backlog at the
    order saga's carrier step, say) every pump claim read past all of them, one index entry
    and heap row each, to find nothing. Run out by the clock tolerance a doorbell's claim
    allows for ``next_attempt_at``, so a worker whose clock is a little behind still takes it.
    """
    return now - _DUE_TOLERANCE if doorbell_only(timeout) else None


# ---------------------------------------------------------------------------------------------
# The record: everything one outcome changes, written in one fenced transaction
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Carried:
    ctes: str
    params: list[Any]
    done: Callable[[], None]
    alone: Callable[[], None]
    # Columns the statement answers with besides the saga's row, and what to do with their
    # values once it ran (only if the record landed: a fenced-off one returns no row).
    columns: tuple[str, ...] = ()
    took: Callable[[Sequence[Any]], None] | None = None


@dataclass
class Record:
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
    # The timeout of the step the after-commit doorbell is for (set by write).
    ring_timeout: float | None = None
    # Data-modifying CTEs of another module that ride in the record's statement (a provider
    # call's outcome): (SQL, params, run after the statement ran, run instead where no
    # statement can carry them).
    carried: list[Carried] = field(default_factory=list)
    # Rows of steps that ran earlier in the same batch (see Batch), recorded with this one.
    earlier_steps: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # Set for a batch: the cancel request its steps saw; a newer one fences the record off.
    cancel_reason_seen: str | None = None
    # Set by write for a saga whose type's change hook does not want it: the ``data`` the claim
    # read; a change since (the hook came to want the saga) fences the record off.
    data_seen: dict[str, Any] | None = None
    # Rows of the waits this saga passes by on its way to its next step (their ``when`` said
    # no), recorded with this one.
    passed_steps: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # For a record that hands the saga on to its next step: what that step's admission to its
    # provider would carry in this record's statement, given the SQL condition that says the
    # record landed (``None``: nothing), asked only if this task goes straight on into it.
    ahead: Callable[[str], Carried | None] | None = None

    def step_rows(self) -> list[tuple[str, dict[str, Any]]]:
        """``(step name, new values)`` of every step row this record updates."""
        rows = list(self.earlier_steps)
        if self.step_name is not None:
            rows.append((self.step_name, self.step_fields))
        rows += self.passed_steps
        return rows

    def carry(
        self, ctes: str, params: list[Any], *, done: Callable[[], None], alone: Callable[[], None]
    ) -> None:
        """Let the record's statement also run ``ctes`` (named, comma-separated CTE bodies)."""
        self.carried.append(Carried(ctes, params, done, alone))

    def event(self, kind: str, saga: Saga, step: str = "", detail: str = "", **extra: Any) -> None:
        self.events.append(
            {"kind": kind, "step": step, "attempt": saga.attempt, "detail": detail[:2000], **extra}
        )


# ---------------------------------------------------------------------------------------------
# Batches: consecutive transactional steps of one task, one transaction, one record
# ---------------------------------------------------------------------------------------------
class BatchBroken(Exception):
    """The batch's transaction was rolled back: run its steps again one at a time from
    ``snapshot``, the saga as its task held it before the batch."""

    def __init__(self, snapshot: Saga) -> None:
        super().__init__("batch abandoned")
        self.snapshot = snapshot


class Batch:
    """Transactional steps run back to back in one task, in one transaction, with one record.

    A transactional step commits its write with its record. When the next step is
    transactional too and the task goes straight on, the step's record is deferred instead
    (:meth:`defer`): the transaction stays open, the next step runs in it, and the record of
    the step that ends the batch writes every step's row and events in its one statement. For
    five such steps that is one commit instead of five, and one fenced UPDATE instead of five.

    Nothing of a batch outlives its record: the steps' writes, their rows and events commit
    together or not at all. Anything but a success (a failure, a retry, a deadline, a refused
    commit) rolls the whole batch back and the task runs its steps again one at a time from
    the saga it held before the batch (:class:`BatchBroken`), under the same idempotency keys:
    the failing step is called again before its failure counts, and every outcome is then
    recorded as without batching. The record is fenced on the claimed version as always, and
    on the saga's cancel request as the batch saw it: a cancel accepted while the batch ran
    fences it off, the task reads the row again and honours the cancel at the batch's first
    step, with nothing to undo; a newer version means the task lost the saga, and stops.

    *A run of steps that share records* (:attr:`sagas.definition.Step.shares_records`: steps
    that stay in this database through commits of their own) is batched the same way, without
    a transaction: each step's write commits as it is made, and only the records wait, for one
    statement at the end. Broken or fenced off, such a run leaves effects behind that no
    record names: :meth:`broken` marks those steps' rows ``maybe_effect`` (one statement), the
    task runs them again one at a time under the same keys (the participants give back their
    first results), and an undo that starts before they are recorded again takes the marked
    rows too. A task lost in the middle of a run can mark nothing; the claim that takes the
    saga up again does (:func:`mark_unrecorded_run`), for every step the run may have reached:
    undoing one that never ran leaves its tombstone, as for any step.
    """

    __slots__ = ("tx", "snapshot", "records", "plain")

    def __init__(self) -> None:
        self.tx: StepTransaction | None = None
        self.snapshot: Saga | None = None
        self.records: list[Record] = []
        #: A run of steps that share records (no transaction): their writes have committed.
        self.plain = False

    @property
    def pending(self) -> bool:
        return bool(self.records)

    def defer(self, saga: Saga, rec: Record, tx: StepTransaction) -> Saga:
        """Keep ``rec`` for the batch's record; return the saga as that record leaves it."""
        now = timezone.now()
        if not self.records:
            self.snapshot = copy.copy(saga)
            self.tx = tx
            self.plain = not tx.open
            step_transactions.note_earlier_steps()
        for e in rec.events:
            e.setdefault("at", now)
        self.records.append(rec)
        for name, value in rec.fields.items():
            if name == "results":
                # What the next step would read back from the row: JSON, not the objects.
                value = json.loads(json.dumps(value, cls=_RESULTS.encoder), cls=_RESULTS.decoder)
            setattr(saga, name, value)
        saga.attempt = 1
        saga.next_attempt_at = now
        return saga

    def merge_into(self, rec: Record) -> None:
        """Make ``rec`` (the last step's) the record of the whole batch."""
        assert self.snapshot is not None
        fields: dict[str, Any] = {}
        events: list[dict[str, Any]] = []
        for earlier in self.records:
            fields.update(earlier.fields)
            rec.earlier_steps += earlier.step_rows()
            events += earlier.events
        rec.fields = {**fields, **rec.fields}
        rec.events = events + rec.events
        rec.cancel_reason_seen = self.snapshot.cancel_reason

    def broken(self, last: Record | None = None) -> BatchBroken:
        """Roll the batch back; the exception carries the saga to start over from.

        A run of steps that share records has nothing to roll back: what its steps wrote has
        committed. Their rows are marked ``maybe_effect`` instead (and that of ``last``, the
        step whose outcome broke the run, if it may have taken effect), so whatever undoes
        the saga before they run again and are recorded undoes them too.
        """
        snapshot = self.snapshot
        assert snapshot is not None
        ran = [r.step_name for r in self.records if r.step_name] if self.plain else []
        if ran and last is not None and last.step_name:
            fields = last.step_fields
            if fields.get("took_effect") or fields.get("maybe_effect"):
                ran.append(last.step_name)
        self.discard()
        if ran:
            mark_maybe_effect(snapshot.id, ran)
        return BatchBroken(snapshot)

    def close(self) -> None:
        self.tx, self.snapshot, self.records, self.plain = None, None, [], False

    def discard(self) -> None:
        """Roll back whatever the batch holds (its transaction may already have ended)."""
        tx = self.tx
        self.close()
        if tx is not None:
            tx.rollback()


_RESULTS = Saga._meta.get_field("results")
_BATCH: ContextVar[Batch | None] = ContextVar("saga_batch", default=None)


def open_batch(*, enabled: bool = True) -> Token[Batch | None]:
    """Let this task batch its transactional steps, or not, until :func:`close_batch`.

    Set either way, so a task never sees another's batch (an eager task run from inside one).
    """
    return _BATCH.set(Batch() if enabled else None)


def current_batch() -> Batch | None:
    return _BATCH.get()


def close_batch(token: Token[Batch | None]) -> None:
    """End the task's batching; whatever it still holds is rolled back."""
    batch = _BATCH.get()
    _BATCH.reset(token)
    if batch is not None:
        batch.discard()


def write(
    saga: Saga,
    rec: Record,
    *,
    inline_ok: bool,
    tx: StepTransaction | None = None,
    _in_transaction: bool = False,
) -> Saga | None:
    """Apply ``rec`` fenced on the claimed version; return the saga if the task should go on.

    ``tx``: a transactional step's open transaction, committed with the record (or rolled
    back with it when the record is fenced off or fails).

    While a batch is open (:class:`Batch`), the record of the step that ends it carries the
    earlier steps' rows and events too; any other outcome (a failure, a park, a fenced-off
    record) abandons the batch with :class:`BatchBroken`.
    """
    batch = _BATCH.get()
    batched = batch is not None and batch.pending
    if batched:
        assert batch is not None
        if tx is None or tx is not batch.tx:
            raise batch.broken(rec)
        batch.merge_into(rec)
    now = timezone.now()
    fields = dict(rec.fields)
    # A saga type's change hook writes in the record's transaction; when there is none, or it
    # does not want this saga (a dict lookup), the record stays one autocommitted statement.
    hook = change_hook(saga)
    type_hook = hook or type_change_hook(saga)
    before = copy.copy(saga) if type_hook is not None else None
    before_state = saga.state
    for name in rec.transitions:
        getattr(saga, name)()  # django-fsm checks the source state; raises if not allowed
    if rec.transitions:
        fields["state"] = saga.state
    if saga.parked_on and "parked_on" not in fields:
        fields["parked_on"] = ""  # no longer waiting for a provider
        if rec.step_name is not None and "held_generation" not in rec.step_fields:
            # Its holds on a closed breaker (provider_seam.held_back) were this stay's: the
            # step's undo, or its next stay, counts its own afresh.
            rec.step_fields.update(held_generation=None, held_times=None)
    if (
        not rec.go_on
        and rec.cancel_reason_seen is None
        and before_state == SagaState.RUNNING
        and "begin_compensation" not in rec.transitions
    ):
        # A cancel accepted while this claim's step ran only set ``cancel_reason`` (the version
        # stays, so the record lands) and counts on the next boundary. A record that goes on
        # reaches one; one that parks, retries later, stops for a person or succeeds does not,
        # and landing past the request would leave it unheard until the saga is due again (a
        # day's wait, or never). Fenced on the request as the claim saw it, it makes way. (One
        # that ends the saga compensated already, a definite no with nothing to undo, lands:
        # the cancel would end it the same way, and its own reason is the truer one.)
        rec.cancel_reason_seen = saga.cancel_reason
    go_on = rec.go_on and inline_ok and within_inline_budget()
    if rec.go_on or rec.ring_after is not None:
        rec.ring_timeout = timeout_at(saga, fields.get("current_step", saga.current_step))
        # Straight on only into a step that fits this task's time limits; a longer one gets
        # a doorbell of its own, sent with its limits.
        go_on = go_on and rec.ring_timeout <= current_task_timeout() + TIMEOUT_SLACK
    if rec.go_on:
        fields["next_attempt_at"] = now
        if go_on:
            fields["attempt"] = 1
            fields["lease_until"] = now + timedelta(seconds=lease_seconds(task_timeout.get()))
        else:
            assert rec.ring_timeout is not None  # worked out above for every go_on
            fields["attempt"] = 0
            fields["lease_until"] = released_lease(rec.ring_timeout, now)
    # A pump's task letting go of this saga claims its next one in the same statement (one
    # claim ahead at most; none past the budget, as the pump's own loop would not claim).
    ahead = _AHEAD.get()
    if ahead is not None and (go_on or ahead.sagas or not within_inline_budget()):
        ahead = None
    if go_on and rec.ahead is not None and connection.vendor == "postgresql":
        admission = rec.ahead(_RECORD_LANDED)
        if admission is not None:
            rec.carried.append(admission)
    # A hook that does not want the saga as claimed may want it by the time the record lands
    # (saga_data_flag set its flag meanwhile): the record's row, read back, says so, and the
    # hook is told in the record's own transaction, so the change and what the hook writes
    # commit together. A record that would autocommit has no transaction to tell it in: it
    # lands only on the ``data`` its claim read, and otherwise is made again in one
    # (``_in_transaction``), unguarded, which reads the row back like any other.
    late_hook = hook is None and type_hook is not None
    in_transaction = (
        _in_transaction
        or rec.on_written is not None
        or hook is not None
        or (late_hook and connection.vendor != "postgresql")
    )
    autocommitted = not in_transaction and (tx is None or not tx.open)
    rec.data_seen = saga.data if late_hook and autocommitted else None
    # The transaction below is this record's alone: nothing else's writes to lose with it.
    own_transaction = in_transaction and not connection.in_atomic_block and not batched
    try:
        with transaction.atomic() if in_transaction else contextlib.nullcontext():
            updated = _write_record(
                saga, fields, rec, now, go_on, flush=hook is not None, ahead=ahead
            )
            if rec.on_written is not None:
                rec.on_written()
            if late_hook and not autocommitted and type_hook and type_hook.wants(updated):
                hook = type_hook
                if connection.vendor == "postgresql" and go_on and lease_only_commits():
                    _wait_for_flush()  # what the hook writes is announced after commit
            if hook is not None and before is not None:  # both or neither
                hook(before, updated)
    except _CarriedDeadlock:
        # (A transactional step's open transaction is never write's own.)
        if not own_transaction or before is None:
            if tx is not None:
                tx.rollback()
            raise
        # Rolled back whole: the same record again, in a transaction, without what it carried.
        saga.__dict__.update(before.__dict__)  # the transitions undone
        with _without_carried(saga, rec):
            return write(saga, rec, inline_ok=inline_ok, tx=tx, _in_transaction=True)
    except _Fenced:
        # Autocommitted, the fenced-off statement still committed what it carried; inside a
        # transaction that rolled back, it did not, so that is reported on its own.
        for carried in rec.carried:
            (carried.alone if in_transaction else carried.done)()
        if batched:
            assert batch is not None
            # A newer claim, or a cancel request the batch never saw: the runner looks at the
            # row again and stops, or honours the cancel. (A batch's record is never guarded
            # on data: it runs in the batch's transaction and reads the flag back.)
            raise batch.broken(rec) from None
        # The row at the claimed version, read once for both questions below (or not at all).
        row: Saga | None = None
        looked = False
        if rec.cancel_reason_seen is not None:
            # A transactional step's write goes with the record it never got: rolled back
            # before anything else (a read that fails here must not leave it open).
            written_off = tx is not None and tx.open
            if tx is not None:
                tx.rollback()
            row, looked = _claimed_row(saga), True
            if row is not None and row.cancel_reason != rec.cancel_reason_seen:
                # Still this claim's saga: the cancel request is what fenced the record off.
                # Nothing of it landed; the runner goes on from the row as it is, and the
                # boundary honours the request (undoing this step too if it may have run).
                ran = rec.step_fields.get("took_effect") or rec.step_fields.get("maybe_effect")
                if ran and not written_off:
                    # This claim ran the step, and its row will not say so: the boundary counts
                    # only runs before the claim, so mark it here for the undo to include it.
                    SagaStep.objects.filter(saga_id=saga.id, name=rec.step_name).update(
                        maybe_effect=True
                    )
                log.info("saga.cancel_seen_at_record", saga_id=str(saga.id), step=row.current_step)
                return row
        if (
            rec.data_seen is not None
            and before is not None
            and (row if looked else _claimed_row(saga)) is not None
        ):
            # Still this claim's saga, so the data guard is what matched nothing: the same
            # record again, in a transaction and unguarded (what it carried has committed
            # already). Not only when the data compares unequal here: a value whose trip
            # through Python is not exact (a number of over 17 digits) must not fence it off.
            rec.carried, rec.data_seen = [], None
            saga.__dict__.update(before.__dict__)  # the transitions undone
            return write(saga, rec, inline_ok=inline_ok, tx=tx, _in_transaction=True)
        if tx is not None:
            tx.rollback()
        metrics.STALE_DELIVERIES.inc()
        log.info("saga.fenced", saga_id=str(saga.id), version=saga.version)
        return None
    except BaseException:
        if tx is not None:
            tx.rollback()
        raise
    for carried in rec.carried:
        carried.done()
    if batched:
        assert batch is not None
        snapshot = batch.snapshot
        batch.close()  # before the commit runs its on_commit callbacks
        assert tx is not None and snapshot is not None
        try:
            tx.commit()
        except DatabaseError:
            # Refused at COMMIT (a deferred foreign key, a serialization failure): all of it
            # rolled back, so the steps can run again one at a time and record what happens.
            raise BatchBroken(snapshot) from None
    elif tx is not None:
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


def _claimed_row(saga: Saga) -> Saga | None:
    """The saga's row if it is still at the version its claim gave it, else ``None``."""
    return Saga.objects.filter(pk=saga.pk, version=saga.version).first()


def _wait_for_flush() -> None:
    """Make the open transaction's commit wait for its WAL flush after all (a record statement
    built not to wait turned out to carry what a change hook announces after commit): back to
    the session's own setting, whatever it is."""
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL synchronous_commit TO DEFAULT")


def _write_record(
    saga: Saga,
    fields: dict[str, Any],
    rec: Record,
    now: datetime,
    go_on: bool,
    *,
    flush: bool,
    ahead: ClaimAhead | None = None,
) -> Saga:
    """The fenced record itself; raises :class:`_Fenced` when the saga moved on.

    ``flush``: wait for the WAL flush even if only the lease moves on (a change hook wrote
    something that is announced after commit). A record after which the task goes straight on
    into a forward step that may leave the database waits too, as a claim of that step does
    (:func:`_claim_text`); so does one that begins the compensation: the undo it goes on into
    may call out, and lost in a crash the record would leave the saga going forward over an
    undo already done (a retry that succeeds this time, on a hold already voided).

    ``ahead``: a pump's (:func:`claiming_ahead`), when the task lets go of the saga here: the
    record claims the next due saga too, handed to ``ahead`` once the record has committed.
    """
    if connection.vendor != "postgresql":
        return _write_portable(saga, fields, rec, now, go_on)
    lease_only = go_on and lease_only_commits() and "begin_compensation" not in rec.transitions
    if lease_only and _runs_leaving_step(saga, fields.get("current_step", saga.current_step)):
        lease_only = False
    wait_flush = flush or not lease_only
    try:
        updated = _run_record(saga, fields, rec, now, wait_flush, ahead)
    except OperationalError as exc:
        if not _deadlocked_carrying(exc, rec):
            raise
        if connection.in_atomic_block:
            # The transaction is aborted: nothing more can run in it. write() runs the record
            # again if the transaction is its own (a change hook's), once it has rolled back.
            raise _CarriedDeadlock(str(exc)) from exc
        # The statement rolled back whole: run it again at once.
        with _without_carried(saga, rec):
            updated = _run_record(saga, fields, rec, now, wait_flush, ahead)
    if updated is None:
        raise _Fenced
    _ring_after_record(saga, updated, rec, go_on)
    return updated


def _run_record(
    saga: Saga,
    fields: dict[str, Any],
    rec: Record,
    now: datetime,
    wait_flush: bool,
    ahead: ClaimAhead | None,
) -> Saga | None:
    """The record's statement, built and run: the recorded saga, or ``None`` if fenced off."""
    claim_next = ahead is not None  # a task letting go: never a lease-only record
    sql, params = _record_sql_postgres(
        saga, fields, rec, now, wait_flush=wait_flush, claim_next=claim_next
    )
    if ahead is None:
        return _fetch_record_and_answers(sql, params, rec.carried)
    updated, claimed = _fetch_record_and_claim(sql, params, saga.id)
    if claimed is not None:
        # Now if the statement committed on its own, at the commit if it is part of a
        # transaction, never if that rolls back (a fenced record's, a refused batch's).
        transaction.on_commit(lambda: ahead.sagas.append(claimed))
    return updated


@contextlib.contextmanager
def _without_carried(saga: Saga, rec: Record) -> Iterator[None]:
    """Run the record again without what it carried (see :func:`_deadlocked_carrying`); those
    parts then go their own way, whatever the run did: each outcome reported in a statement of
    its own, an admission made ahead not made at all (the step asks for its own)."""
    shed, rec.carried, rec.ahead = rec.carried, [], None
    log.warning(
        "saga.record_deadlock", saga_id=str(saga.id), step=saga.current_step, shed=len(shed)
    )
    try:
        yield
    finally:
        for carried in shed:
            carried.alone()


class _CarriedDeadlock(OperationalError):
    """A record that carried shared rows was aborted by a deadlock inside a transaction."""


def _deadlocked_carrying(exc: OperationalError, rec: Record) -> bool:
    """Whether a record that failed with ``exc`` is to run again without what it carried.

    A provider call's outcome (its call slot given back, its health count) and the next
    step's admission (a call slot taken) write rows that every worker's calls share, so a
    record that carries them can meet another statement in a deadlock on those rows:
    PostgreSQL aborts one of the two after ``deadlock_timeout``. An admission that meets one
    asks again without the outcome it carried (:func:`providers.breaker.admit`); a record
    does the same, for a deadlock only: here if the statement committed on its own, in
    :func:`write` if it ran in write's own transaction (a change hook's). Inside anyone
    else's (a transactional step's, a batch's, a caller's) the abort took their writes with
    it, and the record fails as any other error would.
    """
    return bool(rec.carried) and isinstance(exc.__cause__, psycopg.errors.DeadlockDetected)


#: In a record's statement: the fenced saga UPDATE matched (the record landed).
_RECORD_LANDED = "EXISTS (SELECT 1 FROM s)"


def _fetch_record_and_answers(sql: str, params: list[Any], carried: list[Carried]) -> Saga | None:
    """The recorded saga (``None`` if fenced off), each carried part that answers with
    columns handed its own."""
    with _saga_cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    if row is None:
        return None
    at = len(_SAGA_FIELDS)
    for c in carried:
        if c.columns and c.took is not None:
            c.took(row[at : at + len(c.columns)])
        at += len(c.columns)
    return _row_to_saga(row[: len(_SAGA_FIELDS)])


def _fetch_record_and_claim(
    sql: str, params: list[Any], saga_id: Any
) -> tuple[Saga | None, Saga | None]:
    """The rows of a record that claimed ahead: ``(the recorded saga or None if fenced off, the
    saga claimed or None)``."""
    with _saga_cursor() as cursor:
        cursor.execute(sql, params)
        rows = [_row_to_saga(row) for row in cursor.fetchall()]
    updated = next((r for r in rows if r.id == saga_id), None)
    claimed = next((r for r in rows if r.id != saga_id), None)
    return updated, claimed


def _ring_after_record(saga: Saga, updated: Saga, rec: Record, go_on: bool) -> None:
    """The doorbell a record hands the saga on with (after commit), if it does."""
    if rec.ring_after is not None or (rec.go_on and not go_on):
        ring_on_commit(
            saga.id,
            updated.version,
            rec.ring_after,
            rec.ring_timeout,
            due_now=rec.ring_after is None,  # a hand-over: due now, no live lease (see write)
        )


def _write_portable(
    saga: Saga, fields: dict[str, Any], rec: Record, now: datetime, go_on: bool
) -> Saga:
    """The same record as three statements in one transaction (SQLite, the embedded default)."""
    for carried in rec.carried:
        carried.alone()
    rec.carried = []
    with transaction.atomic():
        updated = fenced_update(
            saga.id,
            saga.version,
            fields,
            require_cancel_reason=rec.cancel_reason_seen,
            require_data=rec.data_seen,
        )
        if updated is None:
            raise _Fenced
        for name, values in rec.step_rows():
            if values:
                SagaStep.objects.filter(saga_id=saga.id, name=name).update(updated_at=now, **values)
        if rec.events:
            SagaEvent.objects.bulk_create(
                [SagaEvent(saga_id=saga.id, **{"at": now, **e}) for e in rec.events]
            )
        _ring_after_record(saga, updated, rec, go_on)
    return updated
