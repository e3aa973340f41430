"""The fake carrier: arrange and cancel, repeatable, refusing AQ and late arranges."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from shipping.errors import ShipmentRefused, ShippingUnavailable
from shipping.models import Shipment, ShipmentStatus
from shipping.services import CARRIERS, carrier_for, shipment_arrange, shipment_cancel

KEY = "saga:s:arrange_shipment"


def arrange(order_id=None, country="GB", key=KEY):
    return shipment_arrange(key=key, order_id=order_id or uuid.uuid4(), country=country)


def cancel(key=KEY):
    return shipment_cancel(key=f"{key}:undo", forward_key=key)


@pytest.mark.django_db
def test_arrange_books_a_carrier_with_a_tracking_number():
    """A shipment id, a known carrier and a tracking number, as plain JSON."""
    order_id = uuid.uuid4()
    result = arrange(order_id)
    assert result["carrier"] in CARRIERS and result["tracking_number"]
    assert result["status"] == "arranged"
    assert json.loads(json.dumps(result)) == result
    shipment = Shipment.objects.get(id=result["shipment_id"])
    assert (shipment.order_id, shipment.country) == (order_id, "GB")


@pytest.mark.django_db
def test_carrier_is_chosen_deterministically():
    """The same country always gets the same carrier."""
    assert arrange(country="DE", key="a")["carrier"] == carrier_for("DE")
    assert arrange(country="DE", key="b")["carrier"] == carrier_for("DE")


@pytest.mark.django_db
def test_country_is_normalised_and_validated():
    """Lower-case codes are accepted; something that is not a country code is a caller bug."""
    assert Shipment.objects.get(id=arrange(country=" fr ")["shipment_id"]).country == "FR"
    with pytest.raises(ValueError):
        arrange(country="France", key="other")


@pytest.mark.django_db
def test_repeated_arrange_returns_the_first_shipment():
    """The same key again books nothing new and answers as the first time."""
    first = arrange()
    assert arrange() == first
    assert Shipment.objects.count() == 1


@pytest.mark.django_db
def test_a_first_arrange_is_one_statement_and_a_repeat_reads_what_the_first_left():
    """The row is inserted first and the key read only when it is taken: a first call (every
    order's) costs one round trip, not a read that finds nothing and then the insert. (Only
    the shipments' statements count: fault injection's outage check reads its own table now
    and then, at most every quarter of a second per process, whatever the call.)"""

    def shipments(queries) -> list[str]:
        sql = [q["sql"] for q in queries if '"shipping_shipment"' in q["sql"]]
        return [s.split(" ", 1)[0] for s in sql]

    with CaptureQueriesContext(connection) as first_call:
        first = arrange()
    assert shipments(first_call) == ["INSERT"]
    with CaptureQueriesContext(connection) as repeat:
        assert arrange() == first
    assert shipments(repeat) == ["INSERT", "SELECT"]
    assert Shipment.objects.count() == 1


@pytest.mark.django_db
def test_different_keys_get_different_tracking_numbers():
    """Two shipments never share a tracking number."""
    assert arrange(key="a")["tracking_number"] != arrange(key="b")["tracking_number"]


@pytest.mark.django_db
def test_antarctica_is_unserved_and_the_refusal_is_remembered():
    """AQ: ShippingUnavailable (code shipping_unavailable), the same on a repeat, no shipment."""
    with pytest.raises(ShippingUnavailable) as caught:
        arrange(country="AQ")
    assert caught.value.code == "shipping_unavailable"
    with pytest.raises(ShippingUnavailable):
        arrange(country="AQ")
    assert Shipment.objects.get().status == ShipmentStatus.REFUSED
    result = cancel()
    assert result["cancelled"] is False


@pytest.mark.django_db
def test_cancel_cancels_once():
    """Cancel marks the shipment cancelled; a repeat answers the same."""
    shipped = arrange()
    first = cancel()
    assert first["cancelled"] is True and first["shipment_id"] == shipped["shipment_id"]
    assert cancel() == first
    shipment = Shipment.objects.get()
    assert (
        shipment.status == ShipmentStatus.CANCELLED and shipment.cancelled_by_key == f"{KEY}:undo"
    )


@pytest.mark.django_db
def test_arrange_after_cancel_is_refused():
    """A cancelled shipment is not revived by repeating its arrange."""
    arrange()
    cancel()
    with pytest.raises(ShipmentRefused) as caught:
        arrange()
    assert caught.value.code == "already_compensated"


@pytest.mark.django_db
def test_cancel_with_nothing_arranged_leaves_a_tombstone_refusing_a_late_arrange():
    """A cancel that overtakes its arrange succeeds; the late arrange books nothing."""
    result = cancel()
    assert result["cancelled"] is False and result["tombstone"] is True
    assert cancel() == result
    order_id = uuid.uuid4()
    with pytest.raises(ShipmentRefused):
        arrange(order_id)
    assert not Shipment.objects.filter(order_id=order_id).exists()
    assert not Shipment.objects.filter(status=ShipmentStatus.ARRANGED).exists()


# -- races -----------------------------------------------------------------------------------
def run_together(*calls: Callable[[], Any]) -> list[Any]:
    """Start every call at the same moment on its own thread; return results or exceptions."""
    barrier = threading.Barrier(len(calls))
    outcomes: list[Any] = [None] * len(calls)

    def run(i: int, call: Callable[[], Any]) -> None:
        try:
            barrier.wait(timeout=10)
            outcomes[i] = call()
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test inspects
            outcomes[i] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a racing call never finished"
    return outcomes


@pytest.mark.django_db(transaction=True)
def test_same_key_racing_arranges_once():
    """Four deliveries of one arrange race: one shipment, one answer."""
    order_id = uuid.uuid4()
    outcomes = run_together(*[(lambda: arrange(order_id)) for _ in range(4)])
    assert all(isinstance(o, dict) for o in outcomes), outcomes
    assert len({o["shipment_id"] for o in outcomes}) == 1
    assert Shipment.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_cancel_racing_its_arrange_leaves_no_active_shipment():
    """Whichever of arrange and cancel lands first, nothing stays arranged."""
    arranged, cancelled = run_together(lambda: arrange(), lambda: cancel())
    assert isinstance(cancelled, dict), cancelled
    assert isinstance(arranged, dict | ShipmentRefused), arranged
    assert not Shipment.objects.filter(status=ShipmentStatus.ARRANGED).exists()


NO_WAIT = "set_config('synchronous_commit', 'off', true)"


def _shipment_sql(captured) -> list[str]:
    return [q["sql"] for q in captured if '"shipping_shipment"' in q["sql"]]


@pytest.mark.django_db
def test_a_booking_lost_is_booked_again_the_same():
    """A booking lost with everything after it (a server crash before its commit reached the
    disk) is booked again by the step's retry under the same key: the same shipment id and
    tracking number, so nobody who read the first sees them change. Other keys get others."""
    order_id = uuid.uuid4()
    first = arrange(order_id)
    Shipment.objects.all().delete()  # what the crash lost
    again = arrange(order_id)
    assert again == first
    other = arrange(order_id, key="saga:t:arrange_shipment")
    assert other["shipment_id"] != first["shipment_id"]
    assert other["tracking_number"] != first["tracking_number"]


@pytest.mark.django_db(transaction=True)
def test_a_booking_made_as_a_worker_makes_it_does_not_wait_for_the_disk(settings):
    """Autocommitted (as a worker calls it), the booking's insert commits without waiting for
    its WAL flush; with ``SAGA_ASYNC_LEASE_COMMITS`` off it waits like every other commit."""
    with CaptureQueriesContext(connection) as captured:
        first = arrange()
    [insert] = _shipment_sql(captured)
    assert NO_WAIT in insert and 'INSERT INTO "shipping_shipment"' in insert
    with CaptureQueriesContext(connection) as repeat:
        assert arrange() == first  # a repeat still finds the first booking
    assert [s.split(" ", 1)[0] for s in _shipment_sql(repeat)] == ["WITH", "SELECT"]
    settings.SAGA_ASYNC_LEASE_COMMITS = False
    with CaptureQueriesContext(connection) as waiting:
        arrange(key="saga:t:arrange_shipment")
    [insert] = _shipment_sql(waiting)
    assert NO_WAIT not in insert and insert.startswith('INSERT INTO "shipping_shipment"')
    assert Shipment.objects.count() == 2


@pytest.mark.django_db
def test_inside_a_callers_transaction_a_booking_leaves_its_commit_waiting():
    """Called inside a transaction (as this test is), the booking must not turn off the flush
    wait of the caller's whole transaction."""
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL synchronous_commit = on")
    arrange()
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"
    assert Shipment.objects.get().status == ShipmentStatus.ARRANGED
