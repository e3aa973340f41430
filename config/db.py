"""Database helpers every app may use."""

from __future__ import annotations

import contextlib
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from django.db import connection, connections, models, transaction
from django.db.models import Field, Model, QuerySet

M = TypeVar("M", bound=Model)


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


@dataclass(frozen=True)
class _Built:
    """One :class:`RowBy` query, built: what each call needs and nothing to work out again."""

    sql: str
    params: list[Any]
    at: int  # where the key goes in ``params``
    attnames: list[str]  # the model's fields, in the order the row has them
    converters: dict[int, tuple[list[Any], Any]]  # position -> (converters, expression)


class RowBy(Generic[M]):
    """``queryset.filter(<field>=value).first()``, its SQL built by the ORM once per process.

    Django builds a query anew on every call: it clones the queryset, resolves the lookup and
    compiles the SQL, about 0.25 ms of CPU for a one-row read by key on a 2-core machine, more
    than the round trip itself costs the client. A participant reads a row by its idempotency
    key on every step, so it paid that on every step for the same text. Here the ORM builds the
    text once (the columns, the model's ordering, ``select_for_update``: whatever the queryset
    says), with the list of columns and the fields' database converters that Django's own
    model iterator takes from the same compiler; each call sends that text with the key,
    prepared by its field as a filter would, applies the converters and builds the instance
    with ``Model.from_db``, as the ORM does. Reads of one model by key only: no
    ``select_related``, ``only``/``defer`` or annotations, and nothing else in the filter varies.
    """

    def __init__(self, queryset: QuerySet[M], field: str) -> None:
        self._queryset = queryset
        self._lookup = field
        meta = queryset.model._meta
        self._field: Field = meta.pk if field == "pk" else meta.get_field(field)  # type: ignore[assignment]
        self._built: _Built | None = None

    def _build(self) -> _Built:
        sample = self._sample()
        using = self._queryset.db
        query = self._queryset.filter(**{self._lookup: sample})[:1].query
        compiler = query.get_compiler(using=using)
        sql, params = compiler.as_sql()
        prepared = self._field.get_db_prep_value(sample, connections[using])
        at = [i for i, p in enumerate(params) if p == prepared]
        info = compiler.klass_info
        whole_row = len(compiler.select) == len(self._queryset.model._meta.concrete_fields)
        if len(at) != 1 or info is None or info.get("related_klass_infos") or not whole_row:
            raise ValueError(f"{self._queryset!r} by {self._lookup!r}: not one model's row by key")
        columns = [col for col, _, _ in compiler.select]
        attnames = [col.target.attname for col in columns]
        self._built = _Built(sql, list(params), at[0], attnames, compiler.get_converters(columns))
        return self._built

    def _sample(self) -> Any:
        """A value of the field's type that nothing else in the query can equal."""
        if isinstance(self._field, models.UUIDField):
            return uuid.uuid4()
        if isinstance(self._field, models.IntegerField):
            return -(2**31) + 7919
        return f"rowby-{uuid.uuid4().hex}"

    def __call__(self, value: Any) -> M | None:
        alias = self._queryset.db
        db = connections[alias]
        if self._queryset.query.select_for_update and db.get_autocommit():
            # As the ORM refuses it: a lock taken outside a transaction is gone at once.
            raise transaction.TransactionManagementError(
                "select_for_update cannot be used outside of a transaction."
            )
        built = self._built or self._build()
        params = built.params.copy()
        params[built.at] = self._field.get_db_prep_value(value, db)
        with db.cursor() as cursor:
            cursor.execute(built.sql, params)
            row = cursor.fetchone()
        if row is None:
            return None
        if built.converters:
            row = list(row)
            for pos, (converters, expression) in built.converters.items():
                for convert in converters:
                    row[pos] = convert(row[pos], expression, db)
        return self._queryset.model.from_db(alias, built.attnames, row)
