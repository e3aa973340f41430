"""The participants on the embedded SQLite database (``make run`` without PostgreSQL).

Run in a process of its own: the suite's database is PostgreSQL. What it pins is what differs
there: a participant inserting its row under a key that is taken replays the first answer,
and a late reserve after a release's tombstone is refused (``config.db.insert_unless_taken``
is a savepoint and a plain insert there, not ``ON CONFLICT``); and an order is placed there
through the ORM's own statements (the catalog read and the order with its items).
"""

from __future__ import annotations

from tests.embedded import run_on_embedded_sqlite

SCRIPT = """
import json, uuid
from decimal import Decimal
import django
django.setup()
from inventory.errors import ReservationRefused
from inventory.models import Product
from inventory.services import reservation_release, reservation_reserve
from shipping.services import shipment_arrange

for sku in ("a", "b"):
    Product.objects.create(sku=sku, name=sku, price=Decimal("1.00"), stock_on_hand=5)
order = uuid.uuid4()
first = reservation_reserve(key="k", order_id=order, lines=[("b", 1), ("a", 2)])
again = reservation_reserve(key="k", order_id=order, lines=[("b", 1), ("a", 2)])
reservation_release(key="t:undo", forward_key="t")
try:
    reservation_reserve(key="t", order_id=order, lines=[("a", 1)])
    late = "took effect"
except ReservationRefused:
    late = "refused"
shipment = shipment_arrange(key="s", order_id=order, country="NL")
from django.contrib.auth import get_user_model
from inventory.services import catalog_prices
from orders.services import order_create
placed = order_create(
    owner=get_user_model().objects.create(username="client"),
    items=[{"sku": "b", "quantity": 2}, {"sku": "a", "quantity": 1}],
    payment_method="pm_card_visa",
    shipping_address={"name": "N", "line1": "L", "city": "C", "postal_code": "P", "country": "NL"},
)
print(json.dumps({
    "prices": {sku: [str(p), c] for sku, (p, c) in catalog_prices(["a", "nope"]).items()},
    "placed": [
        [sku, n, str(price)]
        for sku, n, price in sorted(placed.items.values_list("sku", "quantity", "unit_price"))
    ],
    "reserve_replayed": first == again,
    "late_reserve": late,
    "arrange_replayed": shipment == shipment_arrange(key="s", order_id=order, country="NL"),
    "reserved": sorted(Product.objects.values_list("sku", "reserved")),
}))
"""


def test_participants_replay_a_taken_key_on_sqlite(tmp_path):
    outcome = run_on_embedded_sqlite(tmp_path, SCRIPT)
    assert outcome == {
        "reserve_replayed": True,
        "late_reserve": "refused",
        "arrange_replayed": True,
        "reserved": [["a", 2], ["b", 1]],
        "prices": {"a": ["1.00", "EUR"]},
        "placed": [["a", 1, "1.00"], ["b", 2, "1.00"]],
    }
