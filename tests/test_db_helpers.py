"""``config.db``: a read by key whose SQL is built once (``RowBy``, ``ValuesBy``) reads what the
ORM reads, and a write built once (``insert_row``, ``update_row``, ``insert_unless_taken``)
writes what ``save()`` writes; timestamps load in psycopg's compiled loader as Django's own
loader loads them."""

from __future__ import annotations

import datetime
import uuid
from typing import Any

import pytest
from django.db import (
    DatabaseError,
    IntegrityError,
    OperationalError,
    connection,
    connections,
    transaction,
)
from django.db.models import Count
from django.db.models.signals import post_save
from django.test.utils import CaptureQueriesContext

from config.db import (
    RowBy,
    ValuesBy,
    assignment_parts,
    insert_parts,
    insert_row,
    insert_rows,
    insert_unless_taken,
    insert_with_rows,
    may_skip_save,
    update_row,
)
from inventory.models import Product, Reservation, ReservationLine
from payments.models import ProviderOperation
from payments.provider import FakePaymentProvider

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_row_by_key_is_the_row_the_orm_reads_and_none_when_there_is_none():
    FakePaymentProvider().authorize(
        key="k1",
        reference="order-1",
        amount_minor=1234,
        currency="EUR",
        payment_method="pm_card_visa",
    )
    by_key = RowBy(ProviderOperation.objects.all(), "key")

    found = by_key("k1")
    expected = ProviderOperation.objects.filter(key="k1").first()
    assert found is not None and expected is not None
    for field in ProviderOperation._meta.concrete_fields:
        assert getattr(found, field.attname) == getattr(expected, field.attname), field.name
    assert isinstance(found.response, dict)  # the JSON field's converter ran
    assert found.response["amount_minor"] == 1234
    assert not found._state.adding and found._state.db == "default"  # saved like an ORM row
    assert by_key("k1").pk == found.pk  # the second call, from the built text, reads it too
    assert by_key("nobody") is None


def test_the_value_is_prepared_by_its_field():
    """A UUID given as a string is compared as a UUID, as ``filter()`` would."""
    order_id = uuid.uuid4()
    made = Reservation.objects.create(key="r1", order_id=order_id)
    by_order = RowBy(Reservation.objects.all(), "order_id")
    assert by_order(str(order_id)).pk == made.pk
    assert by_order(order_id).pk == made.pk
    assert by_order(uuid.uuid4()) is None
    assert RowBy(Reservation.objects.all(), "pk")(made.pk).key == "r1"


def test_select_for_update_locks_the_row_and_is_refused_outside_a_transaction():
    Reservation.objects.create(key="r2", order_id=uuid.uuid4())
    locked = RowBy(Reservation.objects.select_for_update(), "key")
    other = connections.create_connection("default")
    try:
        with transaction.atomic():
            assert locked("r2").key == "r2"
            with pytest.raises(OperationalError), other.cursor() as cursor:
                cursor.execute(
                    "SELECT id FROM inventory_reservation WHERE key = 'r2' FOR UPDATE NOWAIT"
                )
        with other.cursor() as cursor:  # committed: the lock is gone
            cursor.execute(
                "SELECT id FROM inventory_reservation WHERE key = 'r2' FOR UPDATE NOWAIT"
            )
            assert cursor.fetchone() is not None
    finally:
        other.close()
    assert connection.get_autocommit()
    with pytest.raises(transaction.TransactionManagementError):  # as the ORM refuses it
        locked("r2")


@pytest.mark.parametrize(
    "queryset",
    [
        lambda: Reservation.objects.only("key"),
        lambda: Reservation.objects.annotate(n=Count("lines")),
        lambda: ReservationLine.objects.select_related("product"),
    ],
    ids=["only", "annotate", "select_related"],
)
def test_anything_but_whole_rows_of_one_model_is_refused(queryset):
    with pytest.raises(ValueError, match="not one model's row by key"):
        RowBy(queryset(), "pk")(1)


def test_values_by_key_are_the_orm_values_in_its_order():
    from inventory.models import Product
    from inventory.services import reservation_reserve

    for sku in ("b-sku", "a-sku", "c-sku"):
        Product.objects.create(sku=sku, name=sku, price="1.00", currency="EUR", stock_on_hand=9)
    reservation_reserve(key="v1", order_id=None, lines=[("c-sku", 3), ("a-sku", 1), ("b-sku", 2)])
    reservation = Reservation.objects.get(key="v1")
    lines = ValuesBy(
        ReservationLine.objects.order_by("product__sku").values_list("product__sku", "quantity"),
        "reservation",
    )
    expected = list(
        reservation.lines.order_by("product__sku").values_list("product__sku", "quantity")
    )
    assert lines(reservation.pk) == expected == [("a-sku", 1), ("b-sku", 2), ("c-sku", 3)]
    assert lines(str(reservation.pk)) == expected  # prepared by the key's field
    assert lines(uuid.uuid4()) == []


@pytest.mark.parametrize(
    "queryset",
    [
        lambda: Reservation.objects.all(),
        lambda: Reservation.objects.values("key"),
        lambda: Reservation.objects.values_list("key", flat=True),
    ],
    ids=["models", "dicts", "flat"],
)
def test_values_by_takes_a_values_list_of_tuples_only(queryset):
    with pytest.raises(ValueError, match="a values_list"):
        ValuesBy(queryset(), "key")("k")


def test_a_key_is_given_and_is_a_string_uuid_or_integer_column():
    with pytest.raises(ValueError, match="no key given"):
        RowBy(Reservation.objects.all(), "key")(None)
    with pytest.raises(TypeError, match="a key is a string, UUID or integer column"):
        RowBy(Reservation.objects.all(), "created_at")
    from sagas.models import SagaStep

    assert RowBy(SagaStep.objects.all(), "index")(3) is None  # a small integer column builds


_TIMESTAMPS = (
    "'2026-12-05 08:00:45.507056+00'",
    "'2026-03-29 01:30:00.5+02'",  # another zone's offset: the same instant in UTC
    "'0001-01-01 00:00:00+00'",
    "'9999-12-31 23:59:59.999999+00'",
    "NULL",
)


def _timestamps(loaded_by: type | None = None) -> tuple[Any, ...]:
    with connection.cursor() as cursor:
        if loaded_by is not None:
            cursor.cursor.adapters.register_loader("timestamptz", loaded_by)
        cursor.execute("SELECT " + ", ".join(f"{t}::timestamptz" for t in _TIMESTAMPS))
        return cursor.fetchone()


def test_timestamps_load_in_psycopgs_compiled_loader_as_djangos_own_loads_them():
    from django.db.backends.postgresql.psycopg_any import BaseTzLoader

    connection.ensure_connection()
    oid = connection.connection.adapters.types["timestamptz"].oid
    loader = connection.connection.adapters.get_loader(oid, 0)
    assert not issubclass(loader, BaseTzLoader)  # not Django's Python loader
    assert loader.timezone == connection.timezone  # so Django's cursors do not swap it back

    class DjangosOwn(BaseTzLoader):
        timezone = connection.timezone

    ours, djangos = _timestamps(), _timestamps(DjangosOwn)
    assert ours == djangos
    assert ours[1].isoformat() == "2026-03-28T23:30:00.500000+00:00"
    assert [v.tzinfo for v in ours[:4]] == [v.tzinfo for v in djangos[:4]]
    assert all(v.tzinfo is datetime.UTC for v in ours[:4])
    assert ours[4] is None


def test_a_model_reads_its_timestamps_as_the_database_holds_them():
    op = FakePaymentProvider().authorize(
        key="k-time",
        reference="order-9",
        amount_minor=100,
        currency="EUR",
        payment_method="pm_card_visa",
    )
    assert op is not None
    row = ProviderOperation.objects.get(key="k-time")
    assert row.created_at.tzinfo is datetime.UTC
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US') "
            "FROM payments_provideroperation WHERE key = %s",
            ["k-time"],
        )
        (text,) = cursor.fetchone()
    assert row.created_at.replace(tzinfo=None).isoformat(timespec="microseconds") == text


def test_a_connection_whose_zone_psycopg_labels_otherwise_keeps_djangos_loader():
    # TIME_ZONE "UTC" in DATABASES: Django's zone is ZoneInfo("UTC"), psycopg's label for a
    # UTC session is datetime.timezone.utc, so its compiled loader would change the tzinfo.
    import zoneinfo

    from django.db.backends.postgresql.base import DatabaseWrapper
    from django.db.backends.postgresql.psycopg_any import BaseTzLoader

    other = DatabaseWrapper({**connection.settings_dict, "TIME_ZONE": "UTC"}, alias="tz-utc")
    try:
        other.ensure_connection()
        oid = other.connection.adapters.types["timestamptz"].oid
        assert issubclass(other.connection.adapters.get_loader(oid, 0), BaseTzLoader)
        with other.cursor() as cursor:
            cursor.execute("SELECT '2026-12-05 08:00:45+00'::timestamptz")
            (value,) = cursor.fetchone()
        assert value.tzinfo == zoneinfo.ZoneInfo("UTC")
    finally:
        other.close()


# -- writes whose SQL is built once --------------------------------------------------------------
def _columns(obj: Any) -> dict[str, Any]:
    return {f.attname: getattr(obj, f.attname) for f in type(obj)._meta.concrete_fields}


def test_insert_row_writes_what_save_writes_and_reads_back_an_auto_key():
    def operation(key: str) -> ProviderOperation:
        return ProviderOperation(
            key=key,
            kind="capture",
            outcome="succeeded",
            amount_minor=500,
            currency="EUR",
            reference="order-9",
            response={"id": "cap_1", "amount": 500},
        )

    by_orm, by_text = operation("w-orm"), operation("w-text")
    by_orm.save(force_insert=True)
    with CaptureQueriesContext(connection) as ctx:
        insert_row(by_text)
    assert [q["sql"].split(" (")[0] for q in ctx.captured_queries] == [
        'INSERT INTO "payments_provideroperation"'
    ]
    assert by_text.pk is not None and by_text.pk != by_orm.pk  # the sequence's next id
    assert not by_text._state.adding and by_text._state.db == "default"
    assert by_text.created_at is not None  # auto_now_add set on the instance, as save() sets it
    stored = {op.key: _columns(op) for op in ProviderOperation.objects.filter(key__startswith="w-")}
    assert stored["w-text"] == _columns(by_text)
    assert {k: v for k, v in stored["w-text"].items() if k not in ("id", "key", "created_at")} == {
        k: v for k, v in stored["w-orm"].items() if k not in ("id", "key", "created_at")
    }
    with pytest.raises(IntegrityError), transaction.atomic():
        insert_row(operation("w-text"))  # the key is unique: as save() raises


def test_update_row_sets_the_fields_named_and_the_auto_now_stamp_only():
    made = Reservation.objects.create(key="u1", order_id=uuid.uuid4())
    stamped = made.updated_at
    made.status = "committed"
    made.settled_by_key = "u1-commit"
    made.key = "not-saved"  # not among the fields named: stays as stored
    update_row(made, ["status", "settled_by_key", "updated_at"])
    stored = Reservation.objects.get(pk=made.pk)
    assert (stored.status, stored.settled_by_key, stored.key) == ("committed", "u1-commit", "u1")
    assert stored.updated_at == made.updated_at > stamped

    gone = Reservation(key="u2")  # never inserted: no row has its primary key
    with pytest.raises(DatabaseError, match="did not affect any rows"):
        update_row(gone, ["status"])


def test_insert_unless_taken_inserts_once_and_leaves_a_taken_key_alone():
    first = Reservation(key="t1", order_id=uuid.uuid4())
    assert insert_unless_taken(first) is True
    assert not first._state.adding
    with transaction.atomic():  # no error inside a transaction either: no savepoint needed
        assert insert_unless_taken(Reservation(key="t1", order_id=uuid.uuid4())) is False
        assert insert_unless_taken(Reservation(key="t2")) is True
    assert sorted(Reservation.objects.values_list("key", flat=True)) == ["t1", "t2"]
    assert Reservation.objects.get(key="t1").order_id == first.order_id


def test_a_model_with_save_receivers_is_still_saved_by_save():
    seen: list[Any] = []

    def receiver(sender: Any, instance: Any, created: bool, **_kw: Any) -> None:
        seen.append((instance.key, created))

    post_save.connect(receiver, sender=Reservation, dispatch_uid="test-db-helpers")
    try:
        made = insert_row(Reservation(key="s1"))
        made.status = "released"
        update_row(made, ["status"])
    finally:
        post_save.disconnect(sender=Reservation, dispatch_uid="test-db-helpers")
    assert seen == [("s1", True), ("s1", False)]


def test_update_row_of_no_fields_writes_nothing_and_names_each_field_once():
    made = Reservation.objects.create(key="d1")
    with CaptureQueriesContext(connection) as nothing:
        update_row(made, [])
    assert nothing.captured_queries == []  # as save(update_fields=[])
    made.status = "released"
    update_row(made, ["status", "status", "updated_at"])  # a name twice is set once
    assert Reservation.objects.get(pk=made.pk).status == "released"


def test_a_settlement_is_saved_by_save_while_something_listens_for_reservations():
    """Inventory's one-statement sale skips ``save()``; with a receiver for the reservation's
    saves, the sale goes through ``save()`` and the receiver hears it."""
    from inventory.models import Product
    from inventory.services import reservation_commit, reservation_reserve

    Product.objects.create(sku="pear", name="Pear", price="1.00", stock_on_hand=5)
    reservation_reserve(key="rk", order_id=None, lines=[("pear", 2)])
    heard: list[str] = []

    def receiver(sender: Any, instance: Any, **_kw: Any) -> None:
        heard.append(instance.status)

    post_save.connect(receiver, sender=Reservation, dispatch_uid="test-db-helpers-settle")
    try:
        assert not may_skip_save(Reservation)
        reservation_commit(key="rk:c", forward_key="rk")
    finally:
        post_save.disconnect(sender=Reservation, dispatch_uid="test-db-helpers-settle")
    assert may_skip_save(Reservation)
    assert heard == ["committed"]
    assert Product.objects.filter(sku="pear").values_list("stock_on_hand", "reserved").get() == (
        3,
        0,
    )


def test_insert_parts_compose_a_statement_that_writes_what_save_writes():
    """``insert_parts``'s cast placeholders stand in a ``SELECT`` list (where uncast values
    would be taken for text) and write the row ``save()`` writes; ``assignment_parts`` sets
    the named fields, the ``auto_now`` stamp included."""
    parts = insert_parts(ProviderOperation)
    assert "id" not in [f.name for f in parts.fields]  # the sequence's: left to the database

    def operation(key: str) -> ProviderOperation:
        return ProviderOperation(
            key=key, kind="capture", outcome="succeeded", amount_minor=7, response={"n": [1]}
        )

    by_orm, composed = operation("p-orm"), operation("p-text")
    by_orm.save(force_insert=True)
    values = parts.values(composed, add=True)
    assert values is not None
    with connection.cursor() as cursor:
        cursor.execute(
            f"WITH one AS (SELECT 1) INSERT INTO {parts.table} ({parts.columns}) "
            f"SELECT {parts.placeholders} FROM one",
            values,
        )
    stored = {op.key: _columns(op) for op in ProviderOperation.objects.filter(key__startswith="p-")}
    assert {k: v for k, v in stored["p-text"].items() if k not in ("id", "key", "created_at")} == {
        k: v for k, v in stored["p-orm"].items() if k not in ("id", "key", "created_at")
    }
    assert stored["p-text"]["created_at"] == composed.created_at

    made = Reservation.objects.create(key="a1")
    made.status = "released"
    sets = assignment_parts(Reservation, ("status", "updated_at"))
    set_values = sets.values(made, add=False)
    assert set_values is not None
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE {sets.table} SET {sets.placeholders} WHERE id = %s", [*set_values, made.pk]
        )
    stored_made = Reservation.objects.get(pk=made.pk)
    assert (stored_made.status, stored_made.updated_at) == ("released", made.updated_at)


def test_the_provider_saves_its_rows_by_save_while_something_listens_for_them():
    """The fake provider's one-statement authorize and capture skip ``save()``; with a receiver
    for its operations, both go through ``save()`` and the receiver hears every row."""
    provider = FakePaymentProvider()
    heard: list[str] = []

    def pay() -> dict[str, Any]:
        return provider.authorize(
            key="pa",
            reference="o-p",
            amount_minor=900,
            currency="EUR",
            payment_method="pm_card_visa",
        )

    def receiver(sender: Any, instance: Any, **_kw: Any) -> None:
        heard.append(instance.kind)

    post_save.connect(receiver, sender=ProviderOperation, dispatch_uid="test-db-helpers-provider")
    try:
        auth = pay()
        capture = provider.capture(key="pc", authorization_id=auth["id"])
    finally:
        post_save.disconnect(sender=ProviderOperation, dispatch_uid="test-db-helpers-provider")
    assert heard == ["authorize", "capture"]
    assert provider.retrieve_authorization(auth["id"])["capture_id"] == capture["id"]
    assert pay() == auth  # a repeat replays


def test_insert_rows_writes_what_bulk_create_writes_and_reads_back_each_auto_key():
    def operations(prefix: str, n: int) -> list[ProviderOperation]:
        return [
            ProviderOperation(
                key=f"{prefix}-{i}", kind="authorize", outcome="succeeded", amount_minor=i
            )
            for i in range(n)
        ]

    by_orm = ProviderOperation.objects.bulk_create(operations("r-orm", 2))
    by_text = operations("r-text", 3)
    with CaptureQueriesContext(connection) as ctx:
        insert_rows(by_text)
    assert len(ctx.captured_queries) == 1  # the three rows in one INSERT
    assert all(op.pk is not None and not op._state.adding for op in by_text)
    assert len({op.pk for op in by_text}) == 3 and min(op.pk for op in by_text) > by_orm[-1].pk
    stored = {op.pk: _columns(op) for op in ProviderOperation.objects.all()}
    assert [stored[op.pk] for op in by_text] == [_columns(op) for op in by_text]
    insert_rows([])  # nothing to write: no statement, no error


def test_insert_rows_of_rows_with_and_without_a_key_is_bulk_creates():
    keyed = ProviderOperation(id=987_654, key="m-1", kind="authorize", outcome="succeeded")
    unkeyed = ProviderOperation(key="m-2", kind="authorize", outcome="succeeded")
    insert_rows([keyed, unkeyed])
    assert unkeyed.pk is not None
    assert set(ProviderOperation.objects.values_list("key", flat=True)) == {"m-1", "m-2"}
    assert ProviderOperation.objects.get(key="m-1").pk == 987_654


def test_insert_with_rows_writes_a_row_and_the_rows_that_refer_to_it_in_one_statement():
    """The row and its rows in one INSERT statement (the foreign keys checked at its end, when
    the row is there), each auto key read back in order; with a receiver listening for the
    rows, the two inserts as before (Django's own for the rows), writing the same."""
    lamp = Product.objects.create(sku="w-lamp", name="Lamp", price="1.00", stock_on_hand=5)
    desk = Product.objects.create(sku="w-desk", name="Desk", price="2.00", stock_on_hand=5)

    def reservation(key: str) -> tuple[Reservation, list[ReservationLine]]:
        made = Reservation(key=key, order_id=uuid.uuid4())
        return made, [
            ReservationLine(reservation=made, product=lamp, quantity=2),
            ReservationLine(reservation=made, product=desk, quantity=1),
        ]

    made, lines = reservation("w-one")
    with CaptureQueriesContext(connection) as ctx:
        insert_with_rows(made, lines)
    assert len(ctx.captured_queries) == 1
    assert ctx.captured_queries[0]["sql"].startswith(
        'WITH p AS (INSERT INTO "inventory_reservation"'
    )
    assert all(not o._state.adding and o._state.db == "default" for o in (made, *lines))
    stored = {line.pk: (line.reservation_id, line.product_id, line.quantity)
              for line in ReservationLine.objects.filter(reservation=made)}  # fmt: skip
    assert stored == {line.pk: (made.pk, line.product_id, line.quantity) for line in lines}
    assert Reservation.objects.get(pk=made.pk).created_at == made.created_at

    heard: list[Any] = []
    post_save.connect(lambda **kw: heard.append(kw["instance"]), sender=ReservationLine,
                      weak=False, dispatch_uid="test-insert-with-rows")  # fmt: skip
    try:
        saved, saved_lines = reservation("w-two")
        with CaptureQueriesContext(connection) as ctx:
            insert_with_rows(saved, saved_lines)
    finally:
        post_save.disconnect(sender=ReservationLine, dispatch_uid="test-insert-with-rows")
    # Django's own inserts (bulk_create for the rows, which sends no signal either).
    assert not any(q["sql"].startswith("WITH p AS") for q in ctx.captured_queries)
    assert sum(q["sql"].startswith("INSERT INTO") for q in ctx.captured_queries) == 2
    assert heard == [] and all(line.pk is not None for line in saved_lines)
    assert ReservationLine.objects.filter(reservation=saved).count() == 2

    alone = Reservation(key="w-three")
    insert_with_rows(alone, [])  # no rows: the row alone
    assert Reservation.objects.filter(key="w-three").exists()
