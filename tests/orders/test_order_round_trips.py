"""What one happy order saga costs the database, pinned: every round trip is paid by every
order, so a new one should be a decision, not an accident.

Run in-process on the real engine and participants (PostgreSQL, outside any transaction, as a
worker runs them). Fault injection's outage check and the health table's occasional trim are
left out of the count: both are sampled, not per call.
"""

from __future__ import annotations

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from orders.models import Order
from providers.models import CallSlot
from sagas import waits
from sagas.definition import definition_of
from sagas.models import Saga, SagaState, SagaStep
from sagas.runner import advance
from sagas.timing import step_timeout
from tests.sagas.inprocess import only_this_process, out_of_workers_reach

from .conftest import make_product, place

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _in_process_only(settings):
    """Nothing but this test runs these sagas, and nothing it does depends on the clock.

    The session's worker (if an earlier test started it) stops taking doorbells: the carrier's
    hand-back rings one, which it would otherwise race this run for. The inline budget is out
    of reach, so a loaded machine does not hand the saga on between steps. And the gate forgets
    which breaker and slot rows exist: the database was emptied since it learnt them.
    """
    settings.SAGA_INLINE_BUDGET = 600.0
    with only_this_process():
        yield


CONTROL = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE")
SAMPLED = ('"providers_fakeproviderstatus"', 'DELETE FROM "providers_healthbucket"')


def _placed_for_this_process(customer, count: int) -> list[Order]:
    """``count`` one-widget orders whose sagas no worker will claim: this test runs them."""
    orders = []
    for _ in range(count):
        with transaction.atomic():
            order = place(customer, [("widget", 1)])
            out_of_workers_reach(order.saga_id, 10_000)  # this run is in-process
        orders.append(order)
    return orders


def _run_in_process(order: Order) -> list[str]:
    """Every statement of the order's saga, run here the way worker tasks would run it."""
    version, timeout, sql = 10_000, None, []
    for _ in range(5):
        with CaptureQueriesContext(connection) as captured:
            advance(order.saga_id, version, timeout)
        sql += [q["sql"] for q in captured]
        saga = Saga.objects.get(pk=order.saga_id)
        if saga.state != SagaState.RUNNING:
            break
        # The carrier's longer step was handed to a task of its own: answer that ring too.
        version, timeout = saga.version, step_timeout(definition_of(saga).step(saga.current_step))
    assert saga.state == SagaState.SUCCEEDED, (saga.current_step, saga.parked_on, saga.attempt)
    return [s for s in sql if not any(x in s for x in SAMPLED)]


def test_one_happy_order_saga_costs_at_most_22_round_trips(customer):
    make_product("widget", stock=5)
    orders = _placed_for_this_process(customer, 2)
    _run_in_process(orders[0])  # the first creates the breakers' rows, as a worker's first does
    sql = _run_in_process(orders[1])

    # The order row is read once (payment method and country, kept by the worker).
    assert sum('FROM "orders_order"' in s for s in sql) == 1
    # Our payment row is one INSERT (no get_or_create SELECT and transaction around it), and
    # each recording of the provider's view one UPDATE (no row lock held around the provider);
    # none of them waits for the disk, and nothing else writes the row.
    assert not any(s.startswith('SELECT "payments_payment"') for s in sql)
    payment_writes = [s for s in sql if '"payments_payment"' in s]
    assert len(payment_writes) == 3
    assert all(s.startswith("WITH nf AS") for s in payment_writes), payment_writes
    # The engine's records that wait for the disk: each one that goes on into a step that may
    # leave the database (authorize, arrange, capture), and the last one; the one that goes on
    # into the sale (transactional) does not. (Claims, which decide as they run, left out.)
    records = [s for s in sql if 'UPDATE "sagas_saga"' in s and "current_setting" not in s]
    flushed = ["'off'" not in s for s in records]
    assert flushed == [True, True, True, False, True], [s[:60] for s in records]
    # A provider call's slot release and health count ride in its step's record, except for
    # the two inventory steps, whose records commit inside their own transaction: the
    # reserve's ride in the payment's record, and the sale's, the task's last call, is
    # reported on its own before the task ends.
    counts = [s for s in sql if 'INSERT INTO "providers_healthbucket"' in s]
    in_records = [s.count('INSERT INTO "providers_healthbucket"') for s in counts if s in records]
    assert (len(counts), in_records) == (4, [2, 1, 1]), [s[:60] for s in counts]
    # Only the first step asks its provider in a statement of its own (after the claim); every
    # later one is admitted by the record that hands the saga on to it.
    admissions = [s for s in sql if 'FROM "providers_breaker"' in s]
    assert [s in records for s in admissions] == [False, True, True, True, True], admissions
    assert not CallSlot.objects.filter(lease_until__isnull=False).exists()
    # The inventory steps' writes join their step's transaction: no savepoint anywhere.
    assert not any(s.startswith(("SAVEPOINT", "RELEASE")) for s in sql)
    # The hold's updates return the products' ids: the products are not looked up first; and
    # the same statement writes the reservation's lines.
    assert not any(s.startswith("SELECT") and 'FROM "inventory_product"' in s for s in sql)
    assert not any(s.startswith('INSERT INTO "inventory_reservationline"') for s in sql)
    assert sum('INSERT INTO "inventory_reservationline"' in s for s in sql) == 1
    # The sale marks the reservation committed in the statement that sells its stock.
    assert not any(s.startswith('UPDATE "inventory_reservation"') for s in sql)
    assert sum('UPDATE "inventory_reservation"' in s for s in sql) == 1
    # Each participant inserts its row under the step's key without reading the key first,
    # and the capture names the authorization from the authorize step's result: no read by
    # idempotency key of ours in a first call. The sale locks its reservation by key, reads
    # its lines and sells them in the one statement that marks it; the reserve inserts its
    # reservation in the statement that holds the stock and writes the lines.
    assert not any(s.startswith("SELECT") and '"inventory_reservation' in s for s in sql)
    sale = [s for s in sql if 'UPDATE "inventory_reservation"' in s]
    assert 'WHERE "key" = ' in sale[0] and "FOR UPDATE), a AS" in sale[0]
    assert 'FROM "inventory_reservationline"' in sale[0]
    reserve = [s for s in sql if 'INSERT INTO "inventory_reservation" (' in s]
    assert len(reserve) == 1 and 'INSERT INTO "inventory_reservationline"' in reserve[0]
    assert not any(s.startswith('SELECT "shipping_') for s in sql)
    # The fake provider does not read a request's key first either, and writes each answer in
    # one statement: the authorize's operation with its authorization, the capture's operation
    # with the authorization's change (after one read of it, the answer's contents).
    assert not any('FROM "payments_provideroperation"' in s for s in sql)
    provider = [s for s in sql if '"payments_provider' in s]
    assert [s.split(" ")[0] for s in provider] == ["WITH", "SELECT", "WITH"], provider
    assert not any(s.startswith('UPDATE "payments_provideroperation"') for s in sql)
    # The waits this order does not need (no 3-D Secure card, no review for its amount) are
    # passed by in the record of the step before them: no record of their own.
    skipped = SagaStep.objects.filter(saga=orders[1].saga_id, result=waits.SKIPPED)
    assert sorted(skipped.values_list("name", flat=True)) == ["confirm_3ds", "fraud_review"]
    # The shipment is one autocommitted INSERT, whose commit does not wait for the disk.
    i = next(i for i, s in enumerate(sql) if 'INSERT INTO "shipping_shipment"' in s)
    assert sql[i - 1] != "BEGIN" and sql[i].startswith("WITH nf AS")

    statements = [s for s in sql if not s.startswith(CONTROL)]
    assert len(sql) <= 22, "\n".join(s[:100] for s in sql)
    assert len(statements) <= 18, "\n".join(s[:100] for s in statements)
