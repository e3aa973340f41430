"""The order saga's baseline in ``make bench``: the same order as a plain Celery chain.

The comparison is only fair if the chain does the saga's work: it must sell the stock, take
the money and book the carrier through the same participants, idempotently, on a real worker.
"""

from __future__ import annotations

import random

import pytest

from inventory.models import Product
from lab import order_chain
from lab.order_bench import BENCH_SKUS, _bench_catalog
from payments.models import Payment, PaymentStatus, ProviderOperation
from shipping.models import Shipment, ShipmentStatus

pytestmark = pytest.mark.worker

BENCH_WORKER = {"SAGA_DEFINITION_MODULES": "tests.sagas.sagatypes,lab.bench_saga"}


def _stock() -> dict[str, tuple[int, int]]:
    return dict(
        (sku, (on_hand, reserved))
        for sku, on_hand, reserved in Product.objects.filter(sku__in=BENCH_SKUS).values_list(
            "sku", "stock_on_hand", "reserved"
        )
    )


@pytest.mark.django_db(transaction=True)
def test_the_order_chain_does_the_order_sagas_work_once(worker_factory, wait_for):
    worker = worker_factory(BENCH_WORKER, name="bench", exclusive=True)
    _bench_catalog()
    before = _stock()
    prices = order_chain.prices_of(BENCH_SKUS)
    orders = [order_chain.order_facts(random.Random(seed), prices) for seed in range(3)]
    for order in orders:
        order_chain.send(order)

    ids = [order["order_id"] for order in orders]
    order_chain.wait_sold(ids, timeout=60)

    sold: dict[str, int] = {}
    for order in orders:
        for sku, qty in order["lines"]:
            sold[sku] = sold.get(sku, 0) + qty
    after = _stock()
    for sku, (on_hand, reserved) in before.items():
        assert after[sku] == (on_hand - sold.get(sku, 0), reserved), sku
    payments = dict(Payment.objects.filter(order_id__in=ids).values_list("order_id", "status"))
    assert sorted(str(k) for k in payments) == sorted(ids)
    assert set(payments.values()) == {PaymentStatus.CAPTURED}
    shipments = Shipment.objects.filter(order_id__in=ids)
    assert sorted(shipments.values_list("status", flat=True)) == [ShipmentStatus.ARRANGED] * 3

    # Two chains started again (a client retrying its sends): the same keys get the first
    # answers, and nothing is done twice.
    operations = ProviderOperation.objects.count()
    replays = [order_chain.send(orders[0]), order_chain.send(orders[1])]
    wait_for(
        lambda: all(f"{task_id}] succeeded" in worker.log_text() for task_id in replays),
        timeout=60,
        describe=lambda: worker.log_text()[-3000:],
    )
    assert _stock() == after
    assert ProviderOperation.objects.count() == operations
    assert Shipment.objects.filter(order_id__in=ids).count() == 3
