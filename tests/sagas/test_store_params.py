"""The row store prepares its parameters as Django would, short cut or not.

The store skips Django's field preparation for values it would hand back untouched (plain
strings, booleans, floats, aware timestamps on PostgreSQL). Every saga and step column is
checked here against ``get_db_prep_save``, with the values the engine writes and with those
the short cut must leave to Django (integers, enum members, naive timestamps, JSON, UUIDs).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from psycopg.types.json import Jsonb

from sagas import store
from sagas.models import Saga, SagaState, SagaStep, StepStatus

pytestmark = pytest.mark.django_db

AWARE = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
SAMPLES = [
    None,
    "",
    "reserve_inventory",
    0,
    7,
    2**40,
    True,
    False,
    1.5,
    AWARE,
    SagaState.RUNNING,
    StepStatus.SUCCEEDED,
    {"w": 1},
    [1, "a"],
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
]


def _comparable(value):
    """Jsonb wrappers compare by what they wrap."""
    return ("jsonb", value.obj) if isinstance(value, Jsonb) else value


def _fits(field, value) -> bool:
    """A value the engine could write to the column (Django's own preparation accepts it)."""
    try:
        field.get_db_prep_save(value, connection)
    except (TypeError, ValueError, AttributeError, ValidationError):
        return False
    return True


@pytest.mark.parametrize("model", [Saga, SagaStep])
def test_every_column_is_prepared_as_django_prepares_it(model):
    plain_of = store._PLAIN if model is Saga else store._STEP_PLAIN
    checked = 0
    for field in model._meta.concrete_fields:
        plain = plain_of[field.name]
        for value in SAMPLES:
            if not _fits(field, value):
                continue
            expected = field.get_db_prep_save(value, connection)
            got = store._prep(field, plain, value, connection)
            assert _comparable(got) == _comparable(expected), (field.name, value)
            assert type(got) is type(expected), (field.name, value)
            checked += 1
    assert checked > 100


def test_the_short_cut_applies_to_the_columns_a_record_writes():
    """The values a record writes most (text, timestamps) are the short cut's; integers are
    not (PostgreSQL's backend types them by column)."""
    assert store._PLAIN["current_step"] == (type(None), str)
    assert store._PLAIN["attempt"] == ()
    assert store._PLAIN["lease_until"] == (type(None), datetime)
    assert store._PLAIN["results"] == ()
    assert store._PLAIN["id"] == ()
    # A subclass may convert on save: only the exact field classes are short cut.
    assert store._PLAIN["state"] == ()  # an FSMField, a CharField subclass


def test_a_naive_timestamp_takes_djangos_way():
    """Django warns about a naive timestamp and makes it aware; the short cut must not pass it."""
    field = Saga._meta.get_field("lease_until")
    naive = datetime(2026, 12, 4, 12, 0)
    with pytest.warns(RuntimeWarning, match="naive datetime"):
        got = store._prep(field, store._PLAIN["lease_until"], naive, connection)
    assert got.tzinfo is not None


def test_a_timestamp_on_another_database_takes_djangos_way():
    """Only PostgreSQL's adapter takes an aware datetime as it is (SQLite's makes a string)."""

    class Sqlite:
        vendor = "sqlite"

    class Field:
        def get_db_prep_save(self, value, db):
            return "converted"

    field = Saga._meta.get_field("lease_until")
    assert store._prep(Field(), store._PLAIN["lease_until"], AWARE, Sqlite()) == "converted"
    assert store._prep(field, store._PLAIN["lease_until"], AWARE, connection) is AWARE


def test_a_started_sagas_step_rows_are_the_rows_the_orm_would_insert():
    """A start writes its step rows from values prepared once per process, not through a model
    instance per step: each row must be the one the ORM would insert for the same step."""
    import tests.sagas.sagatypes  # noqa: F401 - registers test5
    from sagas.definition import forward_key, get_definition
    from sagas.services import saga_start

    saga = saga_start(saga_type="test5", data={"script": {}})
    orm = Saga.objects.create(
        saga_type="test5", definition_version=saga.definition_version, current_step="s1"
    )
    names = [s.name for s in get_definition("test5").steps]
    SagaStep.objects.bulk_create(
        SagaStep(saga=orm, index=i, name=n, idempotency_key=forward_key(orm.id, n))
        for i, n in enumerate(names)
    )

    def rows(of):
        found = list(SagaStep.objects.filter(saga=of).order_by("index").values())
        for row in found:
            assert row.pop("idempotency_key") == forward_key(of.id, row["name"])
            row.pop("id"), row.pop("saga_id")
        return found

    started = rows(saga)
    assert [r["name"] for r in started] == names
    assert started == rows(orm)


def test_no_step_column_takes_a_default_that_changes_from_row_to_row():
    """What lets a start prepare a new step row's values once per process."""
    for field in SagaStep._meta.concrete_fields:
        assert not (field.has_default() and callable(field.default)), field.name
        assert not getattr(field, "auto_now", False) and not getattr(field, "auto_now_add", False)
        assert not field.has_db_default(), field.name
