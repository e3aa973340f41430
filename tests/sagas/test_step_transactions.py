"""A participant's atomic block joins a transactional step's transaction without a savepoint.

Run on the real engine's ``StepTransaction`` and the real inventory participant, on PostgreSQL.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from decimal import Decimal

import pytest
from django.db import DataError, connection, transaction
from django.db.transaction import TransactionManagementError
from django.test.utils import CaptureQueriesContext

from inventory.errors import OutOfStock
from inventory.models import Product, Reservation
from inventory.services import reservation_reserve
from providers import breaker, outage
from providers.models import Breaker, FakeProviderStatus
from sagas.provider_seam import call_step
from sagas.store import StepTransaction
from sagas.transactions import StepTransactionSpoiled, in_step_transaction, spoiled, step_atomic
from tests.conftest import wait_until
from tests.sagas.inprocess import one_step_per_delivery

pytestmark = pytest.mark.django_db(transaction=True)


def _product(stock: int = 5) -> Product:
    return Product.objects.create(
        sku="w", name="Widget", price=Decimal("5.00"), stock_on_hand=stock
    )


def _statements(ctx: CaptureQueriesContext) -> list[str]:
    return [q["sql"] for q in ctx.captured_queries]


def _out_of_stock_in_a_step() -> None:
    """A reserve that does not fit, inside a transactional step that the engine rolls back."""
    tx = StepTransaction(True)
    try:
        with pytest.raises(OutOfStock):
            reservation_reserve(key="k1", order_id=uuid.uuid4(), lines=[("w", 2)])
    finally:
        tx.rollback()


def test_inside_a_transactional_step_a_participant_block_adds_no_savepoint():
    _product()
    tx = StepTransaction(True)
    try:
        assert in_step_transaction()
        with CaptureQueriesContext(connection) as ctx:
            reservation_reserve(key="k1", order_id=uuid.uuid4(), lines=[("w", 2)])
    finally:
        tx.commit()
    assert not any(s.startswith(("SAVEPOINT", "RELEASE")) for s in _statements(ctx))
    assert not in_step_transaction()
    assert Product.objects.get(sku="w").reserved == 2


def test_anywhere_else_it_is_an_ordinary_atomic_block():
    """In a caller's own transaction the block is a savepoint, so the caller can go on."""
    _product(stock=1)
    with transaction.atomic():
        assert not in_step_transaction()
        with CaptureQueriesContext(connection) as ctx, pytest.raises(OutOfStock):
            reservation_reserve(key="k1", order_id=uuid.uuid4(), lines=[("w", 2)])
        assert any(s.startswith("SAVEPOINT") for s in _statements(ctx))
        # The savepoint took the reservation's row back; the transaction is usable.
        assert not Reservation.objects.exists()
    assert Product.objects.get(sku="w").reserved == 0


def test_a_participants_own_savepoint_inside_the_step_keeps_the_usual_rules():
    tx = StepTransaction(True)
    try:
        with transaction.atomic():
            assert not in_step_transaction()
            with CaptureQueriesContext(connection) as ctx, step_atomic():
                Product.objects.exists()
        assert any(s.startswith("SAVEPOINT") for s in _statements(ctx))
        assert in_step_transaction()
    finally:
        tx.rollback()


def test_a_failure_inside_the_step_leaves_nothing_once_the_engine_rolls_back():
    """Two lines, the second out of stock: the first line's hold goes with the step."""
    _product(stock=5)
    Product.objects.create(sku="x", name="Scarce", price=Decimal("1.00"), stock_on_hand=1)
    tx = StepTransaction(True)
    try:
        with pytest.raises(OutOfStock):
            reservation_reserve(key="k1", order_id=uuid.uuid4(), lines=[("w", 2), ("x", 3)])
        # Without a savepoint the error spoils the step's transaction: nothing more runs in it.
        assert connection.needs_rollback
    finally:
        tx.rollback()
    assert not Reservation.objects.exists()
    assert Product.objects.get(sku="w").reserved == 0


def test_with_provider_stats_on_a_failure_inside_the_step_keeps_its_own_error(settings):
    """The fault point counts the call's end after the participant raised; in a spoiled step
    transaction that count must not run (its start rolls back with the step), or its error
    would replace the participant's, and an out-of-stock order would look transient."""
    settings.SAGA_FAKE_PROVIDER_STATS = True
    _product(stock=1)
    _out_of_stock_in_a_step()
    assert not Reservation.objects.exists()


def _blocked_on_a_lock(statement_start: str) -> int:
    """How many other backends wait on a lock in that statement (asked from this connection)."""
    with connection.cursor() as cursor:
        # The activity view is read once per transaction unless its snapshot is dropped.
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database() AND query LIKE %s AND pid <> pg_backend_pid()",
            [statement_start + "%"],
        )
        return cursor.fetchone()[0]


def test_a_reserve_that_races_its_key_inside_a_step_answers_with_the_other_writers():
    """The other writer of the key commits while our INSERT waits on it: the INSERT inserts
    nothing (no error, so nothing spoils the step's transaction, which has no savepoint to
    carry on from), and the same attempt answers with the other writer's reservation."""
    _product()
    inserted, failures = threading.Event(), []
    theirs: list[Reservation] = []

    def other_writer() -> None:
        try:
            with transaction.atomic():
                theirs.append(Reservation.objects.create(key="k1", order_id=uuid.uuid4()))
                inserted.set()
                wait_until(
                    lambda: _blocked_on_a_lock('WITH ins AS (INSERT INTO "inventory_reservation"')
                )
        except BaseException as exc:  # noqa: BLE001 - reported by the test below (a timeout too)
            failures.append(exc)
            inserted.set()
        finally:
            connection.close()

    thread = threading.Thread(target=other_writer)
    thread.start()
    assert inserted.wait(10)
    tx = StepTransaction(True)
    try:
        answer = reservation_reserve(key="k1", order_id=uuid.uuid4(), lines=[("w", 1)])
        assert not spoiled()
    finally:
        tx.commit()
    thread.join(10)
    assert not failures and not thread.is_alive()
    assert answer["reservation_id"] == str(theirs[0].id)
    # Ours held nothing (the other writer's row has no lines of its own).
    assert Product.objects.get(sku="w").reserved == 0


def test_a_step_that_swallows_an_error_of_its_spoiled_transaction_fails_clearly():
    """A function that catches the participant's error inside the step and returns anyway:
    its transaction cannot commit, so the step fails with an error that says why (retried like
    any transient error), instead of a record that dies on the spoiled transaction."""
    _product(stock=1)

    def swallowing(ctx):
        try:
            reservation_reserve(key="k1", order_id=uuid.uuid4(), lines=[("w", 2)])
        except OutOfStock:
            return {"held": False}
        return {"held": True}

    tx = StepTransaction(True)
    try:
        with pytest.raises(StepTransactionSpoiled, match="spoiled"):
            call_step(swallowing, None, None, (), tx)
        assert not tx.open
    finally:
        tx.rollback()
    assert not Reservation.objects.exists()


def test_a_step_that_catches_a_failed_statement_where_it_ran_fails_clearly():
    """No atomic block saw this error, so Django did not mark the transaction: PostgreSQL's
    own status says it is spoiled, and the step fails as above instead of a dead record."""

    def catches_where_it_ran(ctx):
        with connection.cursor() as cursor, contextlib.suppress(DataError):
            cursor.execute("SELECT 1 / 0")
        return {"done": True}

    tx = StepTransaction(True)
    try:
        with pytest.raises(StepTransactionSpoiled):
            call_step(catches_where_it_ran, None, None, (), tx)
    finally:
        tx.rollback()


def test_a_step_that_queries_its_spoiled_transaction_is_not_held_against_its_provider(settings):
    """The function's fault, not the provider's: the call counts as a healthy one."""
    one_step_per_delivery(
        settings, {"card": {"min_calls": 1, "failure_rate": 0.5, "cooldown": 60, "canaries": 1}}
    )
    _product(stock=1)

    def queries_on(ctx):
        try:
            reservation_reserve(key="k1", order_id=uuid.uuid4(), lines=[("w", 2)])
        except OutOfStock:
            return {"left": Product.objects.count()}  # refused: the transaction is spoiled
        return {}

    ticket = breaker.admit("card")  # as the engine does: before the step's transaction
    tx = StepTransaction(True)
    try:
        with pytest.raises(TransactionManagementError):
            call_step(queries_on, None, ticket, (), tx)
    finally:
        tx.rollback()
    assert breaker.window_counts("card") == (1, 0)
    assert Breaker.objects.get(provider="card").state == "closed"


def test_a_stats_row_made_in_a_step_that_rolled_back_is_made_again(settings):
    """The first counted call of a provider makes its stats row; inside a step's transaction
    that rolls back, the row goes with it, and the process must not think it still exists."""
    settings.SAGA_FAKE_PROVIDER_STATS = True
    outage._stat_rows.clear()
    _product(stock=1)
    _out_of_stock_in_a_step()
    assert not FakeProviderStatus.objects.exists()
    reservation_reserve(key="k2", order_id=uuid.uuid4(), lines=[("w", 1)])
    status = FakeProviderStatus.objects.get(provider="inventory")
    assert (status.calls, status.in_flight) == (1, 0)
