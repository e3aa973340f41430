"""Database helpers every app may use."""

from __future__ import annotations

import contextlib
import uuid
from contextlib import AbstractContextManager
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


class RowBy(Generic[M]):
    """``queryset.filter(<field>=value).first()``, its SQL built by the ORM once per process.

    Django builds a query anew on every call: it clones the queryset, resolves the lookup and
    compiles the SQL, about 0.25 ms of CPU for a one-row read by key on a 2-core machine, more
    than the round trip itself costs the client. A participant reads a row by its idempotency
    key on every step, so it paid that on every step for the same text. Here the ORM builds the
    text once (the columns, the model's ordering, ``select_for_update``: whatever the queryset
    says) and each call runs it through ``Model.objects.raw()``, which applies the fields'
    converters and builds the instance as the ORM does; the value is prepared by the field, as
    a filter would. Reads by key only: the queryset must filter on nothing else that varies.
    """

    def __init__(self, queryset: QuerySet[M], field: str) -> None:
        self._queryset = queryset
        self._lookup = field
        meta = queryset.model._meta
        self._field: Field = meta.pk if field == "pk" else meta.get_field(field)  # type: ignore[assignment]
        self._compiled: tuple[str, list[Any], int] | None = None

    def _compile(self) -> tuple[str, list[Any], int]:
        sample = self._sample()
        using = self._queryset.db
        query = self._queryset.filter(**{self._lookup: sample})[:1].query
        sql, params = query.get_compiler(using=using).as_sql()
        prepared = self._field.get_db_prep_value(sample, connections[using])
        at = [i for i, p in enumerate(params) if p == prepared]
        if len(at) != 1:
            raise ValueError(f"{self._queryset!r} filtered on {self._lookup!r}: not one row by key")
        self._compiled = (sql, list(params), at[0])
        return self._compiled

    def _sample(self) -> Any:
        """A value of the field's type that nothing else in the query can equal."""
        if isinstance(self._field, models.UUIDField):
            return uuid.uuid4()
        if isinstance(self._field, models.IntegerField):
            return -(2**31) + 7919
        return f"rowby-{uuid.uuid4().hex}"

    def __call__(self, value: Any) -> M | None:
        db = connections[self._queryset.db]
        if self._queryset.query.select_for_update and db.get_autocommit():
            # As the ORM refuses it: a lock taken outside a transaction is gone at once.
            raise transaction.TransactionManagementError(
                "select_for_update cannot be used outside of a transaction."
            )
        sql, params, at = self._compiled or self._compile()
        params = params.copy()
        params[at] = self._field.get_db_prep_value(value, db)
        manager = self._queryset.model._default_manager.db_manager(self._queryset.db)
        for row in manager.raw(sql, params):
            return row
        return None
