"""Holding, giving back and selling stock, each safe to repeat and to race.

Reserve never takes a long lock: each line is one conditional ``UPDATE`` that only succeeds
while enough stock is free, so two orders for the last unit cannot both get it and neither waits
on the other's network calls. Lines are always touched in sku order so two reservations over the
same products cannot deadlock. The reservation row, keyed by the saga step's forward key, is
what makes a repeat, a race with the same key and a release-before-reserve come out right.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from config.db import RowBy, ValuesBy
from inventory.errors import (
    OutOfStock,
    ReservationNotFound,
    ReservationRefused,
    ReservationStateConflict,
)
from inventory.models import Product, Reservation, ReservationLine, ReservationStatus
from sagas.faults import fault_point
from sagas.transactions import in_step_transaction, step_atomic

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

    existing = _reservation(key)
    if existing is not None:
        return _replay(existing)
    joined = in_step_transaction()
    try:
        with step_atomic():
            # Inserted first: a concurrent reserve with this key (or a release writing its
            # tombstone) blocks on the unique index until this transaction ends.
            reservation = Reservation.objects.create(key=key, order_id=order_uuid)
            _hold(reservation, wanted)
    except IntegrityError:
        if joined:
            # Inside a transactional step, which now rolls back whole: its retry replays what
            # the other writer of this key left.
            raise
        existing = _reservation(key)
        if existing is None:
            raise
        return _replay(existing)
    return _result(reservation, list(wanted.items()))


@fault_point("inventory.release")
def reservation_release(*, key: str, forward_key: str) -> dict[str, Any]:
    """Give back what the reserve under ``forward_key`` holds; repeatable.

    If nothing was reserved under that key (the reserve failed, or has not arrived yet), this
    still succeeds and leaves a tombstone so that a late reserve cannot take effect.
    """
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
        _settle(lines, sold=False)
        reservation.status = ReservationStatus.RELEASED
        reservation.settled_by_key = key
        reservation.save(update_fields=["status", "settled_by_key", "updated_at"])
        return _result(reservation, lines)


@fault_point("inventory.commit")
def reservation_commit(*, key: str, forward_key: str) -> dict[str, Any]:
    """Turn the held stock into sold stock; repeatable.

    Stock on hand and the reservation fall together in one update per line, so ``available``
    does not move and no other order can grab the units in between.
    """
    with step_atomic():
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
        _settle(lines, sold=True)
        reservation.status = ReservationStatus.COMMITTED
        reservation.settled_by_key = key
        reservation.save(update_fields=["status", "settled_by_key", "updated_at"])
        return _result(reservation, lines)


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
    """One conditional update per line; the first line that does not fit undoes them all.

    Each update returns the product's id for the reservation's line, so the products are not
    looked up first: one round trip per line, not one more per reservation.
    """
    sql = _hold_sql()
    now = _now_for_db()
    product_ids = {}
    with connection.cursor() as cursor:
        for sku, quantity in wanted.items():
            cursor.execute(sql, [quantity, now, sku, quantity])
            row = cursor.fetchone()
            if row is None:
                found = Product.objects.filter(sku=sku).first()
                raise OutOfStock(sku, quantity, None if found is None else found.available)
            product_ids[sku] = row[0]
    ReservationLine.objects.bulk_create(
        ReservationLine(reservation=reservation, product_id=product_ids[sku], quantity=quantity)
        for sku, quantity in wanted.items()
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


_lines = ValuesBy(
    ReservationLine.objects.order_by("product__sku").values_list("product__sku", "quantity"),
    "reservation",
)


def _settle(lines: list[tuple[str, int]], *, sold: bool) -> None:
    """Each line's held units given back (a release) or sold (a commit), in sku order: one
    ``UPDATE`` per line, its text built once."""
    sql = _settle_sql(sold)
    now = _now_for_db()
    with connection.cursor() as cursor:
        for sku, quantity in lines:
            cursor.execute(sql, [quantity, quantity, now, sku] if sold else [quantity, now, sku])


@functools.cache
def _settle_sql(sold: bool) -> str:
    """A line's settlement; a sale takes the units off the stock on hand as well."""
    table, column = _product_columns()
    sets = f"{column['reserved']} = {column['reserved']} - %s, {column['updated_at']} = %s"
    if sold:
        sets = f"{column['stock_on_hand']} = {column['stock_on_hand']} - %s, {sets}"
    return f"UPDATE {table} SET {sets} WHERE {column['sku']} = %s"


def _now_for_db() -> Any:
    """``timezone.now()`` as the products' ``updated_at`` column takes it."""
    return Product._meta.get_field("updated_at").get_db_prep_save(timezone.now(), connection)


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
