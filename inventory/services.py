"""Holding, giving back and selling stock, each safe to repeat and to race.

Reserve never takes a long lock: each line's hold is a conditional ``UPDATE`` that only succeeds
while enough stock is free, so two orders for the last unit cannot both get it and neither waits
on the other's network calls. Lines are always touched in sku order so two reservations over the
same products cannot deadlock. The reservation row, keyed by the saga step's forward key, is
what makes a repeat, a race with the same key and a release-before-reserve come out right.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from config.db import (
    RowBy,
    ValuesBy,
    assignment_parts,
    column_of,
    insert_parts,
    insert_unless_taken,
    may_skip_save,
    update_row,
)
from inventory.errors import (
    OutOfStock,
    ReservationNotFound,
    ReservationRefused,
    ReservationStateConflict,
)
from inventory.models import Product, Reservation, ReservationLine, ReservationStatus
from sagas.faults import fault_point
from sagas.transactions import step_atomic

# Every call reads a reservation by its key: the SQL is built once (config.db.RowBy).
_reservation = RowBy(Reservation.objects.all(), "key")
_reservation_for_update = RowBy(Reservation.objects.select_for_update(), "key")


@fault_point("inventory.reserve")
def reservation_reserve(
    *, key: str, order_id: uuid.UUID | str | None, lines: Sequence[tuple[str, int]]
) -> dict[str, Any]:
    """Hold every line or none.

    A repeat with the same key returns the first reservation instead of holding stock again;
    this includes two calls racing with one key, which the unique key constraint serialises.
    """
    wanted = _normalise_lines(lines)
    order_uuid = None if order_id is None else uuid.UUID(str(order_id))

    with step_atomic():
        # Inserted first, before any stock is held: a concurrent reserve with this key (or a
        # release writing its tombstone) waits on the unique index until this transaction
        # ends. The key is read only when it is taken (a repeat, a race lost, a tombstone):
        # one round trip for a first call, not two; on PostgreSQL the insert and the hold are
        # that one round trip (:func:`_reserve_sql`).
        reservation = Reservation(key=key, order_id=order_uuid)
        if may_skip_save(Reservation, connection.alias):
            inserted = _insert_and_hold(reservation, wanted)
        else:
            inserted = insert_unless_taken(reservation)
            if inserted:
                _hold(reservation, wanted)
    if inserted:
        return _result(reservation, list(wanted.items()))
    existing = _reservation(key)
    if existing is None:  # cannot happen: the key is the only unique value
        raise IntegrityError(f"reservation under {key!r}: a unique value is taken")
    return _replay(existing)


@fault_point("inventory.release")
def reservation_release(*, key: str, forward_key: str) -> dict[str, Any]:
    """Give back what the reserve under ``forward_key`` holds; repeatable.

    If nothing was reserved under that key (the reserve failed, or has not arrived yet), this
    still succeeds and leaves a tombstone so that a late reserve cannot take effect.
    """
    return _release(key, forward_key)


def reservation_release_done_by_hand(*, key: str, forward_key: str) -> dict[str, Any]:
    """The release a person marked done by hand after every release the saga tried failed.

    The stock lives in this database, where nobody can give it back by hand (a product's
    ``reserved`` is never edited; only reservations move it): left as it was, the units stayed
    reserved for an order that was cancelled, unavailable to every other client for good.
    So the release is done here, under ``key`` (the undo's, the one the saga's release and a
    resolve use, so it never runs twice), outside ``SAGA_FAULTS`` and outages, which stand
    for the trouble the person worked around. Raises as a release does (a reservation already
    sold), which refuses the operation.
    """
    return _release(key, forward_key)


def _release(key: str, forward_key: str) -> dict[str, Any]:
    with step_atomic():
        reservation = _reservation_for_update(forward_key)
        if reservation is None:
            try:
                with transaction.atomic():
                    reservation = Reservation.objects.create(
                        key=forward_key,
                        status=ReservationStatus.RELEASED,
                        tombstone=True,
                        settled_by_key=key,
                    )
                return _result(reservation, [])
            except IntegrityError:
                # The reserve committed between our read and our insert: release it.
                reservation = Reservation.objects.select_for_update().get(key=forward_key)

        lines = _lines_of(reservation)
        if reservation.status == ReservationStatus.RELEASED:
            return _result(reservation, lines)
        if reservation.status == ReservationStatus.COMMITTED:
            raise ReservationStateConflict(
                f"reservation {reservation.id} is committed: its stock is sold, not held"
            )
        _settle(reservation, lines, sold=False, key=key)
        return _result(reservation, lines)


@fault_point("inventory.commit")
def reservation_commit(*, key: str, forward_key: str) -> dict[str, Any]:
    """Turn the held stock into sold stock; repeatable.

    Stock on hand and the reservation fall together in one update per line, so ``available``
    does not move and no other order can grab the units in between.
    """
    with step_atomic():
        if may_skip_save(Reservation, connection.alias):
            return _sell_in_one_statement(key, forward_key)
        reservation = _reservation_for_update(forward_key)
        if reservation is None:
            raise ReservationNotFound(f"nothing was reserved under {forward_key!r}")
        lines = _lines_of(reservation)
        if reservation.status == ReservationStatus.COMMITTED:
            return _result(reservation, lines)
        if reservation.status == ReservationStatus.RELEASED:
            raise ReservationStateConflict(
                f"reservation {reservation.id} was released; there is nothing to commit"
            )
        _settle(reservation, lines, sold=True, key=key)
        return _result(reservation, lines)


def _sell_in_one_statement(key: str, forward_key: str) -> dict[str, Any]:
    """:func:`reservation_commit` on PostgreSQL in one round trip (:func:`_sell_sql`).

    The reservation is locked, its lines and their products read and locked, the held units
    sold and the reservation marked committed by ``key``, all in one statement: the sale of
    every order paid for, so two reads fewer per order, and the products' rows locked for no
    round trip but this one before the transaction ends. The same answers and errors as the
    three statements it replaces: a repeat finds the reservation committed and changes
    nothing; a released or missing one raises.
    """
    marks = assignment_parts(Reservation, _SETTLED, connection.alias)
    settled = {"status": ReservationStatus.COMMITTED, "settled_by_key": key}
    now = timezone.now()
    values = [f.get_db_prep_save(settled.get(f.name, now), connection) for f in marks.fields]
    with connection.cursor() as cursor:
        cursor.execute(_sell_sql(), [forward_key, *values, _now_for_db(now)])
        row = cursor.fetchone()
    if row is None:
        raise ReservationNotFound(f"nothing was reserved under {forward_key!r}")
    reservation_id, status, tombstone, skus, quantities = row
    if status == ReservationStatus.RELEASED:
        raise ReservationStateConflict(
            f"reservation {reservation_id} was released; there is nothing to commit"
        )
    return {
        "reservation_id": str(reservation_id),
        "status": str(status),
        "tombstone": tombstone,
        "lines": [[sku, quantity] for sku, quantity in zip(skus, quantities, strict=True)],
    }


@functools.cache
def _sell_sql() -> str:
    """The sale in one statement: ``r``, the reservation under the forward key, locked first
    (as :func:`_reservation_for_update` locks it, so a release racing the sale waits or is
    waited for, and the two never interleave); ``a``, its lines; ``l``, only if it is still
    held, their products' rows locked in sku order after it (see :func:`_locked_lines`; a
    repeat, or a sale refused, locks no product); then, if it was held, the units sold and the
    reservation marked. Returns the reservation's id, its status after the statement, its
    tombstone flag and its lines' skus and quantities in the order :func:`_lines_of` reads
    them; no row if nothing was reserved under the key."""
    table, column = _product_columns()
    qn = connection.ops.quote_name
    res, line = Reservation._meta, ReservationLine._meta
    rc = {f.name: qn(column_of(f)) for f in res.concrete_fields}
    lc = {f.name: qn(column_of(f)) for f in line.concrete_fields}
    sku, reserved, on_hand = column["sku"], column["reserved"], column["stock_on_hand"]
    marks = assignment_parts(Reservation, _SETTLED, connection.alias)
    held = f"(SELECT {rc['status']} FROM r) = '{ReservationStatus.HELD.value}'"
    return (
        f"WITH r AS MATERIALIZED (SELECT {rc['id']} AS id, {rc['status']}, {rc['tombstone']} "
        f"FROM {qn(res.db_table)} WHERE {rc['key']} = %s FOR UPDATE), "
        f"a AS MATERIALIZED (SELECT p.{column['id']} AS id, p.{sku} AS sku, "
        f"rl.{lc['quantity']} AS qty FROM {qn(line.db_table)} rl "
        f"JOIN {table} p ON p.{column['id']} = rl.{lc['product']} "
        f"WHERE rl.{lc['reservation']} = (SELECT id FROM r)), "
        f"l AS MATERIALIZED (SELECT p.{column['id']} AS id, a.qty FROM {table} p "
        f"JOIN a ON p.{column['id']} = a.id WHERE {held} "
        f'ORDER BY p.{sku} COLLATE "C" FOR UPDATE OF p), '
        f"m AS (UPDATE {marks.table} SET {marks.placeholders} "
        f"WHERE {rc['id']} = (SELECT id FROM r) AND {held} RETURNING {rc['status']}), "
        f"u AS (UPDATE {table} p SET {on_hand} = p.{on_hand} - l.qty, "
        f"{reserved} = p.{reserved} - l.qty, {column['updated_at']} = %s "
        f"FROM l WHERE p.{column['id']} = l.id) "
        f"SELECT r.id, COALESCE((SELECT {rc['status']} FROM m), r.{rc['status']}), "
        f"r.{rc['tombstone']}, ARRAY(SELECT a.sku FROM a ORDER BY a.sku), "
        "ARRAY(SELECT a.qty FROM a ORDER BY a.sku) FROM r"
    )


def catalog_prices(skus: Iterable[str]) -> dict[str, tuple[Decimal, str]]:
    """Each known sku's price and currency (an unknown sku is left out).

    Read on every order placed, so on PostgreSQL its text is built once (``sku = ANY(%s)``,
    one text for any number of skus, prepared by the connection), not compiled by the ORM for
    each order as ``filter(sku__in=...)`` is."""
    skus = list(skus)
    if connection.vendor != "postgresql":
        rows = Product.objects.filter(sku__in=skus).values_list("sku", "price", "currency")
    else:
        with connection.cursor() as cursor:
            cursor.execute(_catalog_sql(), [skus])
            rows = cursor.fetchall()
    return {sku: (price, currency) for sku, price, currency in rows}


@functools.cache
def _catalog_sql() -> str:
    qn, meta = connection.ops.quote_name, Product._meta
    sku, price, currency = (qn(column_of(meta.get_field(f))) for f in ("sku", "price", "currency"))
    return f"SELECT {sku}, {price}, {currency} FROM {qn(meta.db_table)} WHERE {sku} = ANY(%s)"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _normalise_lines(lines: Iterable[Sequence[Any]]) -> dict[str, int]:
    """Merge repeated skus and sort by sku, the one lock order every writer follows."""
    merged: dict[str, int] = {}
    for sku, quantity in lines:
        if isinstance(quantity, bool) or not isinstance(quantity, int) or quantity <= 0:
            raise ValueError(f"quantity for {sku!r} must be a positive integer, got {quantity!r}")
        merged[str(sku)] = merged.get(str(sku), 0) + quantity
    if not merged:
        raise ValueError("a reservation needs at least one line")
    return dict(sorted(merged.items()))


def _hold(reservation: Reservation, wanted: dict[str, int]) -> None:
    """Every line held by conditional updates; the first line that does not fit undoes them all.

    The updates return the products' ids for the reservation's lines, so the products are not
    looked up first. On PostgreSQL one statement holds every line and writes the
    reservation's lines (:func:`_hold_all_sql`): one round trip per reservation instead of one
    per line and one for the lines, and the products' rows, the hottest of a busy shop, are
    locked for one round trip less before the transaction ends. A line that does not fit
    raises :class:`OutOfStock`, and the caller's transaction (``step_atomic``) takes back the
    other lines' holds and rows with it.
    """
    now = _now_for_db()
    product_ids: dict[str, int] = {}
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(
                _hold_all_sql(), [list(wanted), list(wanted.values()), now, reservation.pk]
            )
            product_ids = {sku: product_id for product_id, sku in cursor.fetchall()}
        else:
            for sku, quantity in wanted.items():
                cursor.execute(_hold_sql(), [quantity, now, sku, quantity])
                row = cursor.fetchone()
                if row is None:
                    break
                product_ids[sku] = row[0]
    _all_held(wanted, product_ids)
    if connection.vendor != "postgresql":
        ReservationLine.objects.bulk_create(
            ReservationLine(reservation=reservation, product_id=product_ids[sku], quantity=qty)
            for sku, qty in wanted.items()
        )


def _all_held(wanted: dict[str, int], product_ids: dict[str, int]) -> None:
    """Raise :class:`OutOfStock` for the first line (in sku order) that was not held."""
    for sku, quantity in wanted.items():
        if sku not in product_ids:
            found = Product.objects.filter(sku=sku).first()
            raise OutOfStock(sku, quantity, None if found is None else found.available)


def _insert_and_hold(reservation: Reservation, wanted: dict[str, int]) -> bool:
    """The reservation inserted unless its key is taken and, if it went in, every line held,
    in one statement (:func:`_reserve_sql`); as :func:`insert_unless_taken` then
    :func:`_hold`, with their answers: ``True`` if it was inserted, :class:`OutOfStock` for a
    line that did not fit (the caller's transaction takes back the rest)."""
    parts = insert_parts(Reservation, connection.alias)
    values = parts.values(reservation, add=True)
    assert values is not None  # plain values: a fresh instance, no expressions
    now = _now_for_db()
    with connection.cursor() as cursor:
        cursor.execute(_reserve_sql(), [*values, list(wanted), list(wanted.values()), now])
        rows = cursor.fetchall()
    if not rows[0][0]:
        return False
    reservation._state.adding = False
    reservation._state.db = connection.alias
    _all_held(wanted, {sku: product_id for _, product_id, sku in rows if product_id is not None})
    return True


@functools.cache
def _reserve_sql() -> str:
    """:func:`_hold_all_sql` behind the reservation's own insert, in one statement.

    ``ins`` inserts the reservation (``ON CONFLICT DO NOTHING``, as
    :func:`insert_unless_taken`); the products' rows are locked (``l``) only if it went in, and
    only after it, so the unique index's wait for a racing reserve or release under the same key
    still comes first, as with two statements. Returns one row per line held, each with
    whether the reservation went in, the product's id and its sku; a single row with no
    product when nothing was held (the key taken, or no line fitting).
    """
    parts = insert_parts(Reservation, connection.alias)
    res_id = connection.ops.quote_name(column_of(Reservation._meta.pk))
    return (
        f"WITH ins AS (INSERT INTO {parts.table} ({parts.columns}) VALUES ({parts.placeholders}) "
        f"ON CONFLICT DO NOTHING RETURNING {res_id}), "
        f"{_locked_lines('EXISTS (SELECT 1 FROM ins)').removeprefix('WITH ')}, "
        f"{_hold_ctes(f'(SELECT {res_id} FROM ins)')} "
        "SELECT EXISTS (SELECT 1 FROM ins), h.id, h.sku FROM (VALUES (1)) AS one(x) "
        "LEFT JOIN h ON true"
    )


@functools.cache
def _hold_sql() -> str:
    """One line's conditional hold, returning the product's id; its text built once."""
    table, column = _product_columns()
    return (
        f"UPDATE {table} SET {column['reserved']} = {column['reserved']} + %s, "
        f"{column['updated_at']} = %s WHERE {column['sku']} = %s "
        f"AND {column['stock_on_hand']} - {column['reserved']} >= %s RETURNING {column['id']}"
    )


@functools.cache
def _locked_lines(only_if: str = "") -> str:
    """The CTEs ``w`` (the lines: ``sku``, ``qty``, from two arrays) and ``l`` (each line's
    product ``id`` and ``qty``), the products' rows locked in sku order; none of them if
    ``only_if``, a condition, is false.

    Every writer of several products locks them in sku order, so two reservations over the same
    products cannot deadlock. One ``UPDATE ... FROM`` would lock its rows in whatever order the
    planner joins them; ``ORDER BY ... FOR UPDATE`` locks them as it sorts, and ``MATERIALIZED``
    keeps the planner from folding it into the update. The order is the ``"C"`` collation's,
    code points, as Python sorts the lines (:func:`_normalise_lines`) and as a writer of one
    line per statement locks them: the database's own collation (``en_US``, say) may sort
    ``"B"`` after ``"a"``.
    """
    table, column = _product_columns()
    sku = column["sku"]
    return (
        "WITH w AS MATERIALIZED (SELECT * FROM unnest(%s::text[], %s::int[]) AS w(sku, qty)), "
        f"l AS MATERIALIZED (SELECT p.{column['id']} AS id, w.qty FROM {table} p "
        f"JOIN w ON p.{sku} = w.sku {f'WHERE {only_if} ' if only_if else ''}"
        f'ORDER BY p.{sku} COLLATE "C" FOR UPDATE OF p)'
    )


@functools.cache
def _hold_all_sql() -> str:
    """Every line's conditional hold in one statement (PostgreSQL), returning ``(id, sku)`` of
    each line that fit (the rows locked first, see :func:`_locked_lines`), and the
    reservation's line for each of them. A line short of stock is simply not updated, and the
    caller, finding it missing, rolls the others back with their lines."""
    reservation_id = Reservation._meta.pk.db_type(connection)
    return f"{_locked_lines()}, {_hold_ctes(f'%s::{reservation_id}')} SELECT h.id, h.sku FROM h"


@functools.cache
def _hold_ctes(reservation: str) -> str:
    """The CTEs ``h`` (each line of ``l`` held if it fits, returning its product's ``id`` and
    ``sku`` and its ``qty``; one ``%s``, the products' new ``updated_at``) and ``i`` (the
    reservation's line for each line held), ``reservation`` being the SQL of its id."""
    table, column = _product_columns()
    sku, reserved = column["sku"], column["reserved"]
    qn = connection.ops.quote_name
    line = ReservationLine._meta
    line_columns = ", ".join(
        qn(column_of(line.get_field(name))) for name in ("reservation", "product", "quantity")
    )
    return (
        f"h AS (UPDATE {table} p SET {reserved} = p.{reserved} + l.qty, "
        f"{column['updated_at']} = %s FROM l WHERE p.{column['id']} = l.id "
        f"AND p.{column['stock_on_hand']} - p.{reserved} >= l.qty "
        f"RETURNING p.{column['id']} AS id, p.{sku} AS sku, l.qty AS qty), "
        f"i AS (INSERT INTO {qn(line.db_table)} ({line_columns}) "
        f"SELECT {reservation}, h.id, h.qty FROM h)"
    )


_lines = ValuesBy(
    ReservationLine.objects.order_by("product__sku").values_list("product__sku", "quantity"),
    "reservation",
)


def _settle(
    reservation: Reservation, lines: list[tuple[str, int]], *, sold: bool, key: str
) -> None:
    """Each line's held units given back (a release) or sold (a commit), in sku order, and the
    reservation marked so by ``key``.

    On PostgreSQL one statement does it all (:func:`_settle_all_sql`): the products' rows,
    locked last, stay locked only until the transaction ends, not across one more round trip
    for the reservation. Elsewhere, or if something listens for the reservation's saves, one
    ``UPDATE`` per line and the reservation saved on its own.
    """
    reservation.status = ReservationStatus.COMMITTED if sold else ReservationStatus.RELEASED
    reservation.settled_by_key = key
    marks = None
    if lines and may_skip_save(Reservation, connection.alias):
        sets = assignment_parts(Reservation, _SETTLED, connection.alias)
        marks = sets.values(reservation, add=False)  # auto_now stamps updated_at, as save()
    if marks is None:
        if lines:
            now = _now_for_db()
            sql = _settle_sql(sold)
            with connection.cursor() as cursor:
                for sku, quantity in lines:
                    params = [quantity, quantity, now, sku] if sold else [quantity, now, sku]
                    cursor.execute(sql, params)
        update_row(reservation, _SETTLED)
        return
    now = _now_for_db(reservation.updated_at)
    skus, quantities = [sku for sku, _ in lines], [q for _, q in lines]
    with connection.cursor() as cursor:
        cursor.execute(_settle_all_sql(sold), [skus, quantities, *marks, reservation.pk, now])


#: What a settlement writes on the reservation.
_SETTLED = ("status", "settled_by_key", "updated_at")


@functools.cache
def _settle_sql(sold: bool) -> str:
    """A line's settlement; a sale takes the units off the stock on hand as well."""
    table, column = _product_columns()
    sets = f"{column['reserved']} = {column['reserved']} - %s, {column['updated_at']} = %s"
    if sold:
        sets = f"{column['stock_on_hand']} = {column['stock_on_hand']} - %s, {sets}"
    return f"UPDATE {table} SET {sets} WHERE {column['sku']} = %s"


@functools.cache
def _settle_all_sql(sold: bool) -> str:
    """Every line's settlement and the reservation's new status in one statement (PostgreSQL),
    the products' rows locked in sku order (see :func:`_locked_lines`)."""
    table, column = _product_columns()
    reserved, on_hand = column["reserved"], column["stock_on_hand"]
    sets = f"{reserved} = p.{reserved} - l.qty, {column['updated_at']} = %s"
    if sold:
        sets = f"{on_hand} = p.{on_hand} - l.qty, {sets}"
    res = Reservation._meta
    marks = assignment_parts(Reservation, _SETTLED, connection.alias)
    mark = (
        f"r AS (UPDATE {marks.table} SET {marks.placeholders} "
        f"WHERE {connection.ops.quote_name(column_of(res.pk))} = %s::{res.pk.db_type(connection)})"
    )
    return (
        f"{_locked_lines()}, {mark} "
        f"UPDATE {table} p SET {sets} FROM l WHERE p.{column['id']} = l.id"
    )


def _now_for_db(now: datetime | None = None) -> Any:
    """``now`` (``timezone.now()`` if not given) as the ``updated_at`` columns take it."""
    field = Product._meta.get_field("updated_at")
    return field.get_db_prep_save(now or timezone.now(), connection)


@functools.cache
def _product_columns() -> tuple[str, dict[str, str]]:
    """The products' table and columns, quoted."""
    qn = connection.ops.quote_name
    product = Product._meta
    return qn(product.db_table), {f.name: qn(str(f.column)) for f in product.concrete_fields}


def _lines_of(reservation: Reservation) -> list[tuple[str, int]]:
    """``(sku, quantity)`` of each line, in sku order (the lock order)."""
    return _lines(reservation.pk)


def _replay(reservation: Reservation) -> dict[str, Any]:
    if reservation.status == ReservationStatus.RELEASED:
        raise ReservationRefused(
            f"the reservation under {reservation.key!r} was already released; "
            "a reserve under that key cannot take effect"
        )
    return _result(reservation, _lines_of(reservation))


def _result(reservation: Reservation, lines: list[tuple[str, int]]) -> dict[str, Any]:
    return {
        "reservation_id": str(reservation.id),
        "status": str(reservation.status),
        "tombstone": reservation.tombstone,
        "lines": [[sku, quantity] for sku, quantity in lines],
    }
