"""Database helpers every app may use."""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from django.db import (
    DatabaseError,
    IntegrityError,
    connections,
    models,
    router,
    transaction,
)
from django.db.models import Field, Model, QuerySet, signals
from django.db.models.constants import OnConflict
from django.db.models.query import ValuesListIterable

M = TypeVar("M", bound=Model)


def insert_unless_taken(obj: Model, *, wait_flush: bool = True) -> bool:
    """``INSERT`` ``obj`` unless a unique value of it is taken already: ``True`` if it was.

    For a participant's row keyed by idempotency key, with its primary key set before the
    insert (a UUID default). On PostgreSQL, ``INSERT ... ON CONFLICT DO NOTHING RETURNING``
    (its text built once per model, as :func:`insert_row`'s): the row goes in first instead
    of the key being read first, one round trip where a first call took two (a read that
    found nothing, then the insert); a repeat, or a tombstone left under the key, inserts
    nothing, and the caller reads what is there. No error either, so no
    savepoint is needed inside a transaction. A row with the same key that another transaction
    has written but not committed makes this wait for that transaction's end, as the unique
    index makes a plain ``INSERT`` wait, and then the row is there to read (or, rolled back,
    ours went in). Any unique constraint counts, not only the key's: a caller that finds
    nothing under its key afterwards met another one. Elsewhere (SQLite, whose ``INSERT OR
    IGNORE`` would skip a ``NOT NULL`` or ``CHECK`` violation too): a plain insert in a
    savepoint, ``IntegrityError`` meaning taken. Sends no ``post_save``, like ``bulk_create``.

    ``wait_flush=False``: autocommitted on PostgreSQL, the insert's commit does not wait for its
    WAL flush (:data:`NO_FLUSH_WAIT`; the caller says why losing it in a server crash costs
    nothing). Inside a caller's transaction it is ignored: that commit is the caller's.
    """
    meta = obj._meta
    if obj.pk is None:
        raise ValueError(f"{meta.label}: set the primary key before insert_unless_taken()")
    using = router.db_for_write(type(obj), instance=obj)
    if connections[using].vendor != "postgresql":
        try:
            with transaction.atomic(using=using):
                obj.save(force_insert=True, using=using)
        except IntegrityError:
            return False
        return True
    db = connections[using]
    values = None
    if may_skip_save(type(obj), using):
        wait = wait_flush or db.in_atomic_block
        text = _insert_text(type(obj), using, auto_pk=False, unless_taken=True, wait=wait)
        values = _prepared(obj, text.fields, True, db)
    if values is not None:
        with db.cursor() as cursor:
            cursor.execute(text.sql, values)
            inserted = cursor.fetchone() is not None
    else:  # the ORM's own insert compiler: receivers' models, expressions
        fields = [f for f in meta.local_concrete_fields if not f.generated]
        rows = meta.base_manager._insert(  # type: ignore[attr-defined]
            [obj],
            fields=fields,
            returning_fields=[meta.pk],
            on_conflict=OnConflict.IGNORE,
            using=using,
        )
        inserted = bool(rows) and rows[0] is not None
    if inserted:
        obj._state.adding = False
        obj._state.db = using
    return inserted


def column_of(field: Field[Any, Any] | Any) -> str:
    """A concrete field's column name (typed: Django's stubs allow a field without one)."""
    column = getattr(field, "column", None)
    if not isinstance(column, str):
        raise ValueError(f"{field!r} has no column")
    return column


@dataclass(frozen=True)
class _WriteText:
    sql: str
    fields: tuple[Field[Any, Any], ...]
    returns_pk: bool


def may_skip_save(model: type[Model], using: str = "default") -> bool:
    """Whether a write of ``model`` may be a plain ``INSERT`` or ``UPDATE`` of its own instead of
    ``save()``: PostgreSQL, no ``pre_save`` or ``post_save`` receivers for it, and nothing only
    ``save()`` knows how to write: a parent model, ``order_with_respect_to``, a composite or
    missing primary key, a database default, a generated column (``save()`` reads it back), or
    a field whose value Django wraps in SQL of its own (``get_placeholder``: arrays, ranges,
    geometries). Checked on every call, so a receiver connected later is honoured."""
    meta = model._meta
    fields = meta.local_concrete_fields
    return (
        connections[using].vendor == "postgresql"
        and not meta.parents
        and not meta.order_with_respect_to
        and isinstance(meta.pk, Field)
        and isinstance(getattr(meta.pk, "column", None), str)
        and not signals.pre_save.has_listeners(model)
        and not signals.post_save.has_listeners(model)
        and not any(
            f.has_db_default() or f.generated or hasattr(f, "get_placeholder") for f in fields
        )
    )


@functools.cache
def _insert_text(
    model: type[Model], using: str, auto_pk: bool, unless_taken: bool = False, wait: bool = True
) -> _WriteText:
    meta, qn = model._meta, connections[using].ops.quote_name
    fields = tuple(
        f
        for f in meta.local_concrete_fields
        if not f.generated and not (auto_pk and f is meta.auto_field)
    )
    sql = (
        f"INSERT INTO {qn(meta.db_table)} ({', '.join(qn(column_of(f)) for f in fields)}) "
        f"VALUES ({', '.join(['%s'] * len(fields))})"
    )
    if unless_taken:
        sql += " ON CONFLICT DO NOTHING"
    if auto_pk or unless_taken:
        sql += f" RETURNING {qn(column_of(meta.pk))}"
        if not wait:
            sql = f"WITH {NO_FLUSH_WAIT}, i AS ({sql}) SELECT i.* FROM i, nf"
    return _WriteText(sql, fields, auto_pk)


@functools.cache
def _update_text(model: type[Model], using: str, names: tuple[str, ...]) -> _WriteText:
    meta, qn = model._meta, connections[using].ops.quote_name
    fields = tuple(meta.get_field(name) for name in names)
    plain = tuple(f for f in fields if isinstance(f, Field) and not f.primary_key)
    if len(plain) != len(fields) or any(not f.concrete or f.generated for f in plain):
        raise ValueError(f"{meta.label}: update_row() sets plain columns only, not {names}")
    sets = ", ".join(f"{qn(column_of(f))} = %s" for f in plain)
    sql = f"UPDATE {qn(meta.db_table)} SET {sets} WHERE {qn(column_of(meta.pk))} = %s"
    return _WriteText(sql, plain, False)


#: A ``WITH`` item that makes the statement's own (autocommitted) transaction commit without
#: waiting for its WAL flush; cross-join ``nf`` into the statement's result so that PostgreSQL
#: evaluates it. For writes whose loss in a server crash costs nothing the next flushed commit
#: does not redo (each user says why); never inside a caller's transaction, whose commit it
#: would loosen too.
NO_FLUSH_WAIT = "nf AS (SELECT set_config('synchronous_commit', 'off', true))"


@dataclass(frozen=True)
class RowParts:
    """A model's columns and their placeholders, for a statement a caller composes itself.

    For writes that must happen together or not at all in one round trip (a data-modifying
    ``WITH``, one row inserted only if another was): :func:`insert_row`'s text cannot be
    nested. ``placeholders`` casts each ``%s`` to its column's type, so the values may stand
    in a ``SELECT`` list (``INSERT ... SELECT ... FROM cte``), where PostgreSQL would otherwise
    take them for text. Built once per model (and field names); PostgreSQL only.
    """

    table: str  # quoted
    columns: str  # "c1", "c2", ... quoted, comma-separated (empty for assignments)
    placeholders: str  # %s::type, ... or, for assignments, "c1" = %s::type, ...
    fields: tuple[Field[Any, Any], ...]

    def values(self, obj: Model, *, add: bool) -> list | None:
        """``obj``'s values for :attr:`fields`, prepared as ``save()`` prepares them (``add``:
        an insert, so ``auto_now_add`` applies); ``None`` if one is an expression."""
        using = obj._state.db or router.db_for_write(type(obj), instance=obj)
        return _prepared(obj, self.fields, add, connections[using])


def _cast(f: Field[Any, Any], db: Any) -> str:
    """``%s::type`` without the type's modifiers (``varchar``, not ``varchar(64)``): an explicit
    cast to ``varchar(64)`` would cut a longer value silently, where the column's own
    assignment refuses it (``DataError``), as ``save()`` would."""
    return f"%s::{re.sub(r'[(][^)]*[)]', '', str(f.cast_db_type(db)))}"


@functools.cache
def insert_parts(model: type[Model], using: str = "default") -> RowParts:
    """The columns of ``model``'s ``INSERT`` (all concrete ones but an auto-increment key and
    generated columns) with cast placeholders; see :class:`RowParts`. Check
    :func:`may_skip_save` first, as :func:`insert_row` does."""
    db = connections[using]
    meta, qn = model._meta, db.ops.quote_name
    fields = tuple(
        f for f in meta.local_concrete_fields if not f.generated and f is not meta.auto_field
    )
    return RowParts(
        qn(meta.db_table),
        ", ".join(qn(column_of(f)) for f in fields),
        ", ".join(_cast(f, db) for f in fields),
        fields,
    )


@functools.cache
def assignment_parts(
    model: type[Model], names: tuple[str, ...], using: str = "default"
) -> RowParts:
    """``"c1" = %s::type, ...`` for an ``UPDATE``'s ``SET`` of the named plain fields."""
    db = connections[using]
    fields = _update_text(model, using, names).fields
    sets = ", ".join(f"{db.ops.quote_name(column_of(f))} = {_cast(f, db)}" for f in fields)
    return RowParts(db.ops.quote_name(model._meta.db_table), "", sets, fields)


def _prepared(obj: Model, fields: tuple[Field[Any, Any], ...], add: bool, db: Any) -> list | None:
    """Each field's value as Django's own INSERT or UPDATE prepares it (``pre_save``, so
    ``auto_now`` and ``auto_now_add`` land on ``obj`` too, then ``get_db_prep_save``);
    ``None`` if one is an expression, which only ``save()`` resolves."""
    values = []
    for f in fields:
        value = f.pre_save(obj, add)
        if hasattr(value, "resolve_expression"):
            return None
        values.append(f.get_db_prep_save(value, db))
    return values


def insert_row(obj: M) -> M:
    """``obj.save(force_insert=True)``, its ``INSERT`` text built once per model.

    ``Model.save()`` builds the same statement anew on every call (the compiler, each field's
    value through several layers, the signals): about twice the client CPU of the round trip
    itself. A participant writes a row or two on every step. Here the text is built once and
    the values prepared exactly as Django's insert prepares them; an auto-increment key is
    read back into ``obj``. No ``pre_save`` or ``post_save`` is sent, so a model that has
    receivers, or anything else only ``save()`` knows how to write (:func:`may_skip_save`), and
    a value that is an expression go through ``save()`` as before. Raises what ``save()``
    raises (``IntegrityError`` on a taken unique value). Unlike ``save()``, it does not check
    that a related object assigned to a foreign key was saved first: assign saved ones.
    """
    model, meta = type(obj), obj._meta
    using = router.db_for_write(model, instance=obj)
    if not may_skip_save(model, using):
        obj.save(force_insert=True, using=using)
        return obj
    db = connections[using]
    text = _insert_text(model, using, auto_pk=meta.auto_field is not None and obj.pk is None)
    values = _prepared(obj, text.fields, True, db)
    if values is None:
        obj.save(force_insert=True, using=using)
        return obj
    with db.cursor() as cursor:
        cursor.execute(text.sql, values)
        if text.returns_pk:
            obj.pk = cursor.fetchone()[0]
    obj._state.adding = False
    obj._state.db = using
    return obj


def insert_rows(objs: Sequence[M]) -> None:
    """``bulk_create(objs)`` of one model, as :func:`insert_row` (its text built once per model
    and number of rows, the values prepared as Django prepares them, an auto-increment key
    read back into each object in order), for the few rows a request writes together (an
    order's items). ``bulk_create`` itself where :func:`insert_row` would use ``save()``."""
    if not objs:
        return
    model, meta = type(objs[0]), objs[0]._meta
    using = router.db_for_write(model, instance=objs[0])
    keyed = [o.pk is not None for o in objs]
    auto = meta.auto_field is not None and not any(keyed)
    mixed = any(keyed) and not all(keyed)  # bulk_create inserts the two kinds apart
    if not may_skip_save(model, using) or mixed or any(type(o) is not model for o in objs):
        meta.base_manager.using(using).bulk_create(objs)
        return
    db = connections[using]
    text = _insert_text(model, using, auto_pk=auto)
    values: list[Any] = []
    for obj in objs:
        row = _prepared(obj, text.fields, True, db)
        if row is None:
            meta.base_manager.using(using).bulk_create(objs)
            return
        values += row
    with db.cursor() as cursor:
        cursor.execute(_rows_text(model, using, auto, len(objs)), values)
        ids = cursor.fetchall() if text.returns_pk else []
    for obj, got in zip(objs, ids, strict=bool(ids)):
        obj.pk = got[0]
    for obj in objs:
        obj._state.adding = False
        obj._state.db = using


def insert_with_rows(obj: Model, rows: Sequence[Model]) -> None:
    """:func:`insert_row` of ``obj``, then :func:`insert_rows` of ``rows`` (of one model, which
    refer to it: an order's items), in one statement on PostgreSQL: ``WITH p AS (INSERT obj)
    INSERT rows``, a round trip fewer. The foreign keys are checked at the statement's end, when
    ``obj`` is there. ``obj``'s primary key must be set already (the rows refer to it by it);
    where :func:`insert_row` would use ``save()`` (receivers, expressions, another database), the
    two inserts as before."""
    if not rows:
        insert_row(obj)
        return
    model, child = type(obj), type(rows[0])
    using = router.db_for_write(model, instance=obj)
    keyed = [o.pk is not None for o in rows]
    auto = child._meta.auto_field is not None and not any(keyed)
    together = (
        obj.pk is not None
        and may_skip_save(model, using)
        and may_skip_save(child, using)
        and all(type(o) is child for o in rows)
        and (all(keyed) or not any(keyed))
        and router.db_for_write(child, instance=rows[0]) == using
    )
    db = connections[using]
    text = _insert_text(model, using, auto_pk=False)
    fields = _insert_text(child, using, auto_pk=auto).fields
    prepared = (
        [_prepared(o, text.fields if o is obj else fields, True, db) for o in (obj, *rows)]
        if together
        else [None]
    )
    if any(values is None for values in prepared):
        insert_row(obj)
        insert_rows(rows)
        return
    values = [value for row in prepared if row is not None for value in row]
    sql = f"WITH p AS ({text.sql}) {_rows_text(child, using, auto, len(rows))}"
    with db.cursor() as cursor:
        cursor.execute(sql, values)
        ids = cursor.fetchall() if auto else []
    for o, got in zip(rows, ids, strict=bool(ids)):
        o.pk = got[0]
    for o in (obj, *rows):
        o._state.adding = False
        o._state.db = using


@functools.cache
def _rows_text(model: type[Model], using: str, auto_pk: bool, rows: int) -> str:
    """:func:`insert_row`'s ``INSERT`` of ``rows`` rows."""
    qn = connections[using].ops.quote_name
    fields = _insert_text(model, using, auto_pk=auto_pk).fields
    row = "(" + ", ".join(["%s"] * len(fields)) + ")"
    sql = (
        f"INSERT INTO {qn(model._meta.db_table)} ({', '.join(qn(column_of(f)) for f in fields)}) "
        f"VALUES {', '.join([row] * rows)}"
    )
    return f"{sql} RETURNING {qn(column_of(model._meta.pk))}" if auto_pk else sql


def update_row(obj: Model, fields: Sequence[str]) -> None:
    """``obj.save(update_fields=fields)``, its ``UPDATE`` text built once per model and fields
    (see :func:`insert_row` for why, and for when it is ``save()`` after all). As ``save()``,
    it raises ``DatabaseError`` if no row has ``obj``'s primary key."""
    model = type(obj)
    using = obj._state.db or router.db_for_write(model, instance=obj)
    names = tuple(dict.fromkeys(fields))  # once each, in order, as save() takes them
    if not names:
        return  # as save(update_fields=[]): nothing to write
    if not may_skip_save(model, using):
        obj.save(update_fields=names, using=using)
        return
    db = connections[using]
    text = _update_text(model, using, names)
    values = _prepared(obj, text.fields, False, db)
    if values is None:
        obj.save(update_fields=names, using=using)
        return
    values.append(obj._meta.pk.get_db_prep_value(obj.pk, db))
    with db.cursor() as cursor:
        cursor.execute(text.sql, values)
        if cursor.rowcount == 0:
            raise DatabaseError("Save with update_fields did not affect any rows.")


def _plan_went_stale(exc: BaseException) -> bool:
    """PostgreSQL refusing a prepared statement whose result columns changed type since it was
    prepared (``ALTER TABLE ... ALTER COLUMN ... TYPE`` by a migration in another session)."""
    cause = exc.__cause__
    return getattr(cause, "sqlstate", None) == "0A000" and "cached plan must not change" in str(
        cause
    )


def replan_after_schema_change(
    execute: Callable[..., Any], sql: str, params: Any, many: bool, context: dict[str, Any]
) -> Any:
    """Django execute wrapper: forget this connection's prepared statements when a migration
    changed a column type under them, and run the statement again if it was on its own.

    A connection keeps its prepared statements for its whole life (``SAGA_PREPARED_STATEMENTS``
    prepares every query that repeats), and PostgreSQL refuses one whose result row changed
    type, on every run, until they are deallocated: so between a migration and the restart of
    the processes that were already running, each of their repeated queries would fail. A
    refused statement did not run, so on its own (autocommit) it is run again after
    ``DEALLOCATE ALL`` (psycopg forgets its cache when it sees that command). Inside a
    transaction the error stands (the transaction is aborted); its rollback clears the cache
    too, so the caller's retry runs on fresh statements.
    """
    try:
        return execute(sql, params, many, context)
    except DatabaseError as exc:
        db = context["connection"]
        if not _plan_went_stale(exc) or db.in_atomic_block:
            raise
        with db.connection.cursor() as raw:
            raw.execute("DEALLOCATE ALL")
        return execute(sql, params, many, context)


def install_replan(*, connection: Any, **_kwargs: Any) -> None:
    """``connection_created`` receiver: every PostgreSQL connection gets the wrapper once."""
    if connection.vendor == "postgresql" and replan_after_schema_change not in (
        connection.execute_wrappers
    ):
        connection.execute_wrappers.append(replan_after_schema_change)


@functools.cache
def _compiled_tz_loader(tz: Any) -> type | None:
    """A timestamptz loader class for Django's connections on ``tz``, backed by psycopg's
    compiled loader; ``None`` where psycopg has no compiled one (the pure-Python build)."""
    import psycopg
    from psycopg.adapt import Loader
    from psycopg.pq import Format
    from psycopg.types.datetime import TimestamptzLoader as PythonLoader

    oid = psycopg.adapters.types["timestamptz"].oid
    compiled = psycopg.adapters.get_loader(oid, Format.TEXT)
    if compiled is None or issubclass(compiled, PythonLoader):
        return None
    make: type[Any] = compiled

    class CompiledTzLoader(Loader):
        # Django's cursors compare this with the connection's own time zone, and load with
        # their own loader where the two differ (a test that overrides TIME_ZONE).
        timezone = tz

        def __init__(self, oid: int, context: Any = None) -> None:
            super().__init__(oid, context)
            # The compiled loader's own method: psycopg's row loop calls it with no Python
            # frame in between. (Its class cannot be subclassed.)
            self.load = make(oid, context).load  # type: ignore[method-assign]

        def load(self, data: Any) -> Any:  # pragma: no cover - shadowed in __init__
            raise NotImplementedError

    return CompiledTzLoader


def install_compiled_tz_loader(*, connection: Any, **_kwargs: Any) -> None:
    """``connection_created`` receiver: ``timestamptz`` columns load in psycopg's C code.

    Django registers a loader of its own on every connection, a subclass of psycopg's
    pure-Python one that only sets the datetime's time zone to the connection's: 2.8 us a
    value against 0.2 us for psycopg's compiled loader. The engine reads a saga row with four
    to seven timestamps at every claim and record, and participants read theirs on every
    step. The result is the same: Django sets the session's ``TimeZone`` to that zone on
    connecting, and psycopg's loader returns datetimes in the session's zone
    (``datetime.timezone.utc`` for UTC, as Django's); where its zone object would not be
    Django's, Django's loader stays. With ``USE_TZ = False`` Django's stays too: it drops the
    zone. One difference remains, on purpose: after a raw ``SET TIME ZONE`` on a connection,
    Django's loader labels the new zone's wall-clock time with its own zone (a wrong instant),
    this one gives the right instant in the session's zone.
    """
    if connection.vendor != "postgresql" or connection.timezone is None:
        return
    if connection.connection.info.timezone != connection.timezone:
        # The zone psycopg would label results with is not Django's own zone object: a
        # ``TIME_ZONE: "UTC"`` in DATABASES (Django's ``ZoneInfo("UTC")``, psycopg's
        # ``datetime.timezone.utc``), or a session that did not take Django's zone.
        return
    loader = _compiled_tz_loader(connection.timezone)
    if loader is not None:
        connection.connection.adapters.register_loader("timestamptz", loader)


@dataclass(frozen=True)
class _Built:
    """A query by key, built: what each call needs and nothing to work out again."""

    sql: str
    params: list[Any]
    at: int  # where the key goes in ``params``
    attnames: list[str]  # a model's fields, in the order the row has them (RowBy)
    converters: dict[int, tuple[list[Any], Any]]  # position -> (converters, expression)


class _ByKey:
    """A queryset filtered on one field, its SQL built by the ORM once per process.

    Django builds a query anew on every call: it clones the queryset, resolves the lookup and
    compiles the SQL, about 0.25 ms of CPU for a one-row read by key on a 2-core machine, more
    than the round trip itself costs the client. A participant reads its rows by idempotency
    key on every step, so it paid that on every step for the same text. Here the ORM builds the
    text once (the columns, joins, ordering, ``select_for_update``: whatever the queryset says)
    with a sample key, and keeps the fields' database converters that Django's own iterators
    take from the same compiler; each call sends that text with the key, prepared by its field
    as a filter would, and applies the converters. Nothing else in the filter may vary.
    """

    _one = False

    def __init__(self, queryset: QuerySet[Any], field: str) -> None:
        self._queryset = queryset
        self._lookup = field
        meta = queryset.model._meta
        self._field: Field = meta.pk if field == "pk" else meta.get_field(field)
        # The key's own column (a foreign key's is its target's): what a sample must match.
        self._column = getattr(self._field, "target_field", self._field)
        kinds = (models.CharField, models.TextField, models.UUIDField, models.IntegerField)
        if not isinstance(self._column, kinds):
            raise TypeError(f"{meta.label}.{field}: a key is a string, UUID or integer column")
        self._locks = bool(queryset.query.select_for_update)
        self._built: _Built | None = None

    def _build(self) -> _Built:
        sample = self._sample()
        using = self._queryset.db
        queryset = self._queryset.filter(**{self._lookup: sample})
        if self._one:  # as first(): the model's ordering, else the primary key's
            queryset = (queryset if queryset.ordered else queryset.order_by("pk"))[:1]
        compiler = queryset.query.get_compiler(using=using)
        sql, params = compiler.as_sql()
        prepared = self._field.get_db_prep_value(sample, connections[using])
        at = [i for i, p in enumerate(params) if p == prepared]
        if len(at) != 1:
            raise ValueError(
                f"{self._queryset.model.__name__} by {self._lookup!r}: the key is not one value"
            )
        columns = [col for col, _, _ in compiler.select]
        self._check(compiler, columns)
        attnames = [getattr(getattr(col, "target", None), "attname", "") for col in columns]
        self._built = _Built(sql, list(params), at[0], attnames, compiler.get_converters(columns))
        return self._built

    def _check(self, compiler: Any, columns: list[Any]) -> None:
        """Refuse, once, a query whose rows the caller's ``__call__`` would build wrongly."""

    def _sample(self) -> Any:
        """A value of the key's type that nothing else in the query can equal."""
        if isinstance(self._column, models.UUIDField):
            return uuid.uuid4()
        if isinstance(self._column, models.IntegerField):
            return 7919  # in range of every integer column, even a small positive one
        return f"bykey-{uuid.uuid4().hex}"

    def _rows(self, value: Any) -> tuple[_Built, list[Any]]:
        """The rows for ``value``, converted as the ORM converts them."""
        if value is None:  # filter(field=None) would mean IS NULL; the built text says "="
            raise ValueError(f"{self._queryset.model.__name__} by {self._lookup!r}: no key given")
        db = connections[self._queryset.db]
        if self._locks and db.features.has_select_for_update and db.get_autocommit():
            # As the ORM refuses it: a lock taken outside a transaction is gone at once.
            raise transaction.TransactionManagementError(
                "select_for_update cannot be used outside of a transaction."
            )
        built = self._built or self._build()
        params = built.params.copy()
        params[built.at] = self._field.get_db_prep_value(value, db)
        with db.cursor() as cursor:
            cursor.execute(built.sql, params)
            rows = cursor.fetchall()
        if built.converters:
            rows = [list(row) for row in rows]
            for row in rows:
                for pos, (converters, expression) in built.converters.items():
                    for convert in converters:
                        row[pos] = convert(row[pos], expression, db)
        return built, rows


class RowBy(_ByKey, Generic[M]):
    """``queryset.filter(<field>=value).first()``, its SQL built once (see ``_ByKey``).

    The instance is built with ``Model.from_db``, as the ORM builds it. Whole rows of one model
    only: no ``select_related``, ``only``/``defer``, annotations or ``values()``.
    """

    _one = True

    def __init__(self, queryset: QuerySet[M], field: str) -> None:  # ties M to the queryset
        super().__init__(queryset, field)

    def _check(self, compiler: Any, columns: list[Any]) -> None:
        info = compiler.klass_info
        whole_row = len(columns) == len(self._queryset.model._meta.concrete_fields)
        if info is None or info.get("related_klass_infos") or not whole_row:
            raise ValueError(
                f"{self._queryset.model.__name__} by {self._lookup!r}: not one model's row by key"
            )

    def __call__(self, value: Any) -> M | None:
        built, rows = self._rows(value)
        if not rows:
            return None
        return self._queryset.model.from_db(self._queryset.db, built.attnames, rows[0])


class ValuesBy(_ByKey):
    """``list(queryset.filter(<field>=value))`` for a ``values_list()`` queryset, its SQL built
    once (see ``_ByKey``): every row, as a tuple of the listed values."""

    def _check(self, compiler: Any, columns: list[Any]) -> None:
        fields = getattr(self._queryset, "_fields", None)
        tuples = self._queryset._iterable_class is ValuesListIterable
        if not tuples or len(columns) != len(fields or ()):
            raise ValueError(f"{self._queryset.model.__name__}: a values_list() of fields only")

    def __call__(self, value: Any) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in self._rows(value)[1]]
