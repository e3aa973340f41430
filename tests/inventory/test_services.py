"""Reserve, release and commit: all-or-nothing, repeatable, and safe against a late reserve."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal

import pytest
from django.db import IntegrityError, connection, transaction
from django.test.utils import CaptureQueriesContext

from inventory.errors import (
    OutOfStock,
    ReservationNotFound,
    ReservationRefused,
    ReservationStateConflict,
)
from inventory.models import Product, Reservation, ReservationStatus
from inventory.services import (
    _lines_of,
    reservation_commit,
    reservation_release,
    reservation_reserve,
)

pytestmark = pytest.mark.django_db


def make_product(sku: str, stock: int, price: str = "9.99") -> Product:
    return Product.objects.create(
        sku=sku, name=sku.title(), price=Decimal(price), stock_on_hand=stock
    )


def stock(sku: str) -> tuple[int, int]:
    p = Product.objects.get(sku=sku)
    return p.stock_on_hand, p.reserved


def reserve(key: str = "saga:1:reserve_inventory", lines=(("apple", 1),), order_id=None):
    return reservation_reserve(key=key, order_id=order_id or uuid.uuid4(), lines=list(lines))


@pytest.fixture
def catalog():
    return [make_product("apple", 5), make_product("banana", 3), make_product("cherry", 1)]


# -- the model's own invariants --------------------------------------------------------------
def test_available_is_stock_minus_reserved(catalog):
    """``available`` is what can still be promised: on hand minus held."""
    Product.objects.filter(sku="apple").update(reserved=2)
    assert Product.objects.get(sku="apple").available == 3


@pytest.mark.parametrize(
    ("stock_on_hand", "reserved"), [(-1, 0), (3, -1), (3, 4)], ids=["neg-stock", "neg-held", "over"]
)
def test_database_refuses_rows_that_oversell(stock_on_hand, reserved):
    """The check constraints stop negative stock and holding more than is on hand."""
    with pytest.raises(IntegrityError), transaction.atomic():
        Product.objects.create(
            sku="x", name="x", price=Decimal("1.00"), stock_on_hand=stock_on_hand, reserved=reserved
        )


def test_currency_defaults_to_euro_and_price_is_decimal(catalog):
    """Prices come back as Decimal with two places, in EUR unless said otherwise."""
    product = Product.objects.get(sku="apple")
    assert product.currency == "EUR"
    assert product.price == Decimal("9.99") and isinstance(product.price, Decimal)


# -- reserve ---------------------------------------------------------------------------------
def test_reserve_holds_every_line_in_sku_order(catalog):
    """All lines are held together; the result lists them in sku order and is plain JSON."""
    order_id = uuid.uuid4()
    result = reserve(lines=[("banana", 2), ("apple", 3)], order_id=order_id)
    assert result["lines"] == [["apple", 3], ["banana", 2]]
    assert result["status"] == "held"
    assert stock("apple") == (5, 3) and stock("banana") == (3, 2)
    reservation = Reservation.objects.get(id=result["reservation_id"])
    assert reservation.order_id == order_id
    assert json.loads(json.dumps(result)) == result


def test_every_line_is_held_and_settled_by_one_statement_on_the_products(catalog):
    """Three lines, one round trip to the products for the hold, one for the sale, one for
    the release: a statement per line would cost a round trip per line on every order."""

    def product_updates(call):
        with CaptureQueriesContext(connection) as queries:
            call()
        return [q["sql"] for q in queries if 'UPDATE "inventory_product"' in q["sql"]]

    three = [("apple", 1), ("banana", 1), ("cherry", 1)]
    assert len(product_updates(lambda: reserve(key="k", lines=three))) == 1
    assert len(product_updates(lambda: reservation_commit(key="k:c", forward_key="k"))) == 1
    assert len(product_updates(lambda: reserve(key="j", lines=three[:2]))) == 1
    assert len(product_updates(lambda: reservation_release(key="j:r", forward_key="j"))) == 1
    assert stock("apple") == (4, 0) and stock("banana") == (2, 0) and stock("cherry") == (0, 0)


def test_a_first_reserve_does_not_read_its_key_before_inserting(catalog):
    """The reservation is inserted first and its key read only when taken: a first call
    (every order's) sends no read of the reservations, a repeat reads what the first left."""

    def reservation_reads(call):
        with CaptureQueriesContext(connection) as queries:
            answer = call()
        reads = [q for q in queries if q["sql"].startswith('SELECT "inventory_reservation"."id"')]
        return answer, len(reads)

    first, reads = reservation_reads(lambda: reserve(key="k", lines=[("apple", 1)]))
    assert reads == 0
    again, reads = reservation_reads(lambda: reserve(key="k", lines=[("apple", 1)]))
    assert (again, reads) == (first, 1)
    assert stock("apple") == (5, 1)


def test_a_first_reserve_and_a_sale_are_one_statement_each(catalog):
    """Every order reserves once and sells once: the reservation goes in with its hold, and
    the sale reads the reservation and its lines in the statement that sells them, one round
    trip each (three had been two, and three), with the answers the separate reads gave."""

    def statements(call):
        # Fault injection's outage check is sampled (cached for a moment), not per call.
        with CaptureQueriesContext(connection) as queries:
            answer = call()
        return answer, [
            q["sql"]
            for q in queries
            if not q["sql"].startswith(("SAVEPOINT", "RELEASE"))
            and '"providers_fakeproviderstatus"' not in q["sql"]
        ]

    lines = [("banana", 2), ("apple", 1)]
    held, sql = statements(lambda: reserve(key="k", lines=lines))
    assert len(sql) == 1, sql
    assert held["lines"] == [["apple", 1], ["banana", 2]] and held["status"] == "held"
    sold, sql = statements(lambda: reservation_commit(key="k:c", forward_key="k"))
    assert len(sql) == 1, sql
    assert sold == {**held, "status": "committed"}
    assert stock("apple") == (4, 0) and stock("banana") == (1, 0)
    # Its lines come back in the order the reservation's own read gives them (the database's
    # collation), upper and lower case mixed too.
    make_product("Zeta", 5)
    make_product("alpha", 5)
    reserve(key="j", lines=[("Zeta", 1), ("alpha", 1), ("banana", 1)])
    sold = reservation_commit(key="j:c", forward_key="j")
    assert sold["lines"] == [list(line) for line in _lines_of(Reservation.objects.get(key="j"))]


def test_with_a_save_receiver_on_reservations_the_separate_statements_answer_the_same(catalog):
    """A project that listens for reservation saves gets the statements that send them (a
    hold, the sale's reads and its settlement apart), with the same answers and stock."""
    from django.db.models.signals import post_save

    saved = []

    def receiver(instance, **_):
        saved.append(instance.status)

    post_save.connect(receiver, sender=Reservation)
    try:
        held = reserve(key="k", lines=[("banana", 2), ("apple", 1)])
        sold = reservation_commit(key="k:c", forward_key="k")
    finally:
        post_save.disconnect(receiver, sender=Reservation)
    assert held["lines"] == [["apple", 1], ["banana", 2]] and held["status"] == "held"
    assert sold == {**held, "status": "committed"}
    assert stock("apple") == (4, 0) and stock("banana") == (1, 0)
    assert saved == ["committed"]  # the settlement's save: the other path ran


def test_reserve_merges_repeated_skus(catalog):
    """Two lines for one sku are one hold of their sum."""
    result = reserve(lines=[("apple", 1), ("apple", 2)])
    assert result["lines"] == [["apple", 3]]
    assert stock("apple") == (5, 3)


def test_reserve_accepts_order_id_as_string(catalog):
    """Saga data carries ids as strings; they are stored as UUIDs."""
    order_id = uuid.uuid4()
    result = reserve(order_id=str(order_id))
    assert Reservation.objects.get(id=result["reservation_id"]).order_id == order_id


def test_out_of_stock_rolls_back_every_line(catalog):
    """If one line does not fit, nothing is held and no reservation is written."""
    with pytest.raises(OutOfStock) as caught:
        reserve(lines=[("apple", 2), ("cherry", 2)])
    assert caught.value.code == "out_of_stock"
    assert caught.value.sku == "cherry"
    assert caught.value.available == 1
    assert stock("apple") == (5, 0) and stock("cherry") == (1, 0)
    assert not Reservation.objects.exists()


def test_unknown_sku_is_out_of_stock(catalog):
    """A sku that does not exist cannot be held: out_of_stock, naming the sku."""
    with pytest.raises(OutOfStock) as caught:
        reserve(lines=[("apple", 1), ("durian", 1)])
    assert caught.value.code == "out_of_stock" and caught.value.sku == "durian"
    assert stock("apple") == (5, 0)


def test_out_of_stock_is_not_remembered(catalog):
    """A refused reserve leaves no trace, so the same key may succeed once stock arrives."""
    with pytest.raises(OutOfStock):
        reserve(key="k", lines=[("cherry", 2)])
    Product.objects.filter(sku="cherry").update(stock_on_hand=2)
    assert reserve(key="k", lines=[("cherry", 2)])["lines"] == [["cherry", 2]]


def test_reserving_exactly_what_is_available_succeeds(catalog):
    """The last units can be held: the condition is ``available >= quantity``."""
    reserve(lines=[("cherry", 1)])
    assert stock("cherry") == (1, 1)
    with pytest.raises(OutOfStock):
        reserve(key="other", lines=[("cherry", 1)])


def test_repeated_reserve_returns_the_first_result(catalog):
    """The same key again holds nothing more and answers exactly as the first time."""
    first = reserve(key="k", lines=[("apple", 2)])
    again = reserve(key="k", lines=[("apple", 2)])
    assert again == first
    assert stock("apple") == (5, 2)
    assert Reservation.objects.count() == 1


@pytest.mark.parametrize("quantity", [0, -1, True, 1.5])
def test_reserve_rejects_non_positive_or_non_integer_quantities(catalog, quantity):
    """Bad quantities are a caller's bug, not a business answer: ValueError, nothing held."""
    with pytest.raises(ValueError):
        reserve(lines=[("apple", quantity)])
    assert stock("apple") == (5, 0)


def test_reserve_rejects_an_empty_order(catalog):
    """A reservation needs at least one line."""
    with pytest.raises(ValueError):
        reserve(lines=[])


# -- release ---------------------------------------------------------------------------------
def test_release_gives_back_what_was_held(catalog):
    """Released stock is available again; the reservation says released."""
    held = reserve(key="k", lines=[("apple", 2), ("banana", 1)])
    result = reservation_release(key="k:undo", forward_key="k")
    assert result["status"] == "released" and result["tombstone"] is False
    assert result["reservation_id"] == held["reservation_id"]
    assert result["lines"] == [["apple", 2], ["banana", 1]]
    assert stock("apple") == (5, 0) and stock("banana") == (3, 0)
    row = Reservation.objects.get(key="k")
    assert (row.status, row.settled_by_key) == ("released", "k:undo")


def test_release_is_idempotent(catalog):
    """Releasing twice gives back once."""
    reserve(key="k", lines=[("apple", 2)])
    first = reservation_release(key="k:undo", forward_key="k")
    again = reservation_release(key="k:undo", forward_key="k")
    assert again == first
    assert stock("apple") == (5, 0)


def test_release_with_nothing_reserved_succeeds_and_leaves_a_tombstone(catalog):
    """A release that overtakes its reserve succeeds and marks the key as released."""
    result = reservation_release(key="k:undo", forward_key="k")
    assert result["status"] == "released" and result["tombstone"] is True
    assert result["lines"] == []
    tombstone = Reservation.objects.get(key="k")
    assert tombstone.status == ReservationStatus.RELEASED and tombstone.tombstone
    assert reservation_release(key="k:undo", forward_key="k") == result


def test_late_reserve_after_tombstone_is_refused_and_holds_nothing(catalog):
    """A reserve arriving after its release raises and does not take effect."""
    reservation_release(key="k:undo", forward_key="k")
    with pytest.raises(ReservationRefused) as caught:
        reserve(key="k", lines=[("apple", 1)])
    assert caught.value.code == "already_compensated"
    assert stock("apple") == (5, 0)
    assert not Reservation.objects.get(key="k").lines.exists()


def test_reserve_after_a_real_release_is_refused(catalog):
    """Once released, the key's reservation is over; repeating the reserve does not re-hold."""
    reserve(key="k", lines=[("apple", 1)])
    reservation_release(key="k:undo", forward_key="k")
    with pytest.raises(ReservationRefused):
        reserve(key="k", lines=[("apple", 1)])
    assert stock("apple") == (5, 0)


def test_release_after_out_of_stock_is_a_tombstone(catalog):
    """The saga may release a reserve that failed; nothing moves and the key is closed."""
    with pytest.raises(OutOfStock):
        reserve(key="k", lines=[("cherry", 5)])
    assert reservation_release(key="k:undo", forward_key="k")["tombstone"] is True
    assert stock("cherry") == (1, 0)


def test_release_of_committed_stock_is_refused(catalog):
    """Sold stock cannot be un-held: a release after commit is a conflict and changes nothing."""
    reserve(key="k", lines=[("apple", 2)])
    reservation_commit(key="k:commit", forward_key="k")
    with pytest.raises(ReservationStateConflict):
        reservation_release(key="k:undo", forward_key="k")
    assert stock("apple") == (3, 0)


# -- commit ----------------------------------------------------------------------------------
def test_commit_turns_held_stock_into_sold_stock(catalog):
    """Stock on hand and held fall together; ``available`` does not move; the reservation row
    says committed, by whom and when (the same statement that sells the stock marks it)."""
    reserve(key="k", lines=[("apple", 2), ("banana", 3)])
    before = Product.objects.get(sku="apple").available
    held_at = Reservation.objects.get(key="k").updated_at
    result = reservation_commit(key="k:commit", forward_key="k")
    assert result["status"] == "committed"
    assert stock("apple") == (3, 0) and stock("banana") == (0, 0)
    assert Product.objects.get(sku="apple").available == before
    row = Reservation.objects.get(key="k")
    assert (row.status, row.settled_by_key) == ("committed", "k:commit")
    assert row.updated_at > held_at


def test_commit_is_idempotent(catalog):
    """Committing twice sells once."""
    reserve(key="k", lines=[("apple", 2)])
    first = reservation_commit(key="k:commit", forward_key="k")
    assert reservation_commit(key="k:commit", forward_key="k") == first
    assert stock("apple") == (3, 0)


def test_reserve_after_commit_replays_the_reservation(catalog):
    """A repeated reserve after the commit answers with the first result and holds nothing."""
    first = reserve(key="k", lines=[("apple", 2)])
    reservation_commit(key="k:commit", forward_key="k")
    again = reserve(key="k", lines=[("apple", 2)])
    assert again["reservation_id"] == first["reservation_id"]
    assert stock("apple") == (3, 0)


def test_commit_after_release_is_refused(catalog):
    """Released stock is not sold: commit after release is a conflict."""
    reserve(key="k", lines=[("apple", 2)])
    reservation_release(key="k:undo", forward_key="k")
    with pytest.raises(ReservationStateConflict) as caught:
        reservation_commit(key="k:commit", forward_key="k")
    assert caught.value.code == "reservation_state_conflict"
    assert stock("apple") == (5, 0)


def test_commit_of_nothing_is_not_found(catalog):
    """A commit needs a reservation to commit; it does not leave a tombstone."""
    with pytest.raises(ReservationNotFound) as caught:
        reservation_commit(key="k:commit", forward_key="k")
    assert caught.value.code == "reservation_not_found"
    assert not Reservation.objects.exists()


def test_commit_after_a_tombstone_is_refused(catalog):
    """A tombstone holds a key, not stock: there is nothing to commit."""
    reservation_release(key="k:undo", forward_key="k")
    with pytest.raises(ReservationStateConflict):
        reservation_commit(key="k:commit", forward_key="k")
