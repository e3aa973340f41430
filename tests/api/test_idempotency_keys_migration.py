"""Migrations ``orders.0003`` and ``sagas.0013``: non-ASCII idempotency keys kept before the
header was read as UTF-8 are rewritten as their clients wrote them, so a retry sent after the
deploy is still a replay (not a second order, not a second signal)."""

from __future__ import annotations

import pytest

from orders.models import IdempotencyRecord, Order
from sagas.models import SagaSignal
from tests.migrating import migrated_to

from .conftest import order_body

pytestmark = pytest.mark.django_db(transaction=True)

ORDERS = "/api/v1/orders/"
BEFORE = [("orders", "0002_idempotency_record"), ("sagas", "0012_wait_seconds_on_the_step")]


def as_wsgi_hands_it_over(text: str) -> str:
    return text.encode().decode("latin-1")


def test_keys_kept_before_the_utf8_reading_still_replay_after_the_migrations(client_api, catalog):
    key = "заказ-1"
    header = {"Idempotency-Key": as_wsgi_hands_it_over(key)}
    body = order_body(payment_method="pm_card_3ds_required")
    placed = client_api.post(ORDERS, body, format="json", headers=header)
    assert placed.status_code == 201, placed.content
    path = f"{ORDERS}{placed.json()['id']}/signals/3ds_confirmed/"
    sent = client_api.post(path, {"payload": {"approved": True}}, format="json", headers=header)
    assert sent.status_code == 202, sent.content
    # As the keys were stored before: the header's bytes read as Latin-1.
    IdempotencyRecord.objects.update(key=as_wsgi_hands_it_over(key))
    SagaSignal.objects.update(key=as_wsgi_hands_it_over(key))

    with migrated_to(BEFORE):
        pass

    assert IdempotencyRecord.objects.get().key == key
    assert SagaSignal.objects.get().key == key
    again = client_api.post(ORDERS, body, format="json", headers=header)
    assert (again.status_code, again["Idempotent-Replayed"]) == (201, "true")
    assert Order.objects.count() == 1
    resent = client_api.post(path, {"payload": {"approved": True}}, format="json", headers=header)
    assert (resent.status_code, resent["Idempotent-Replayed"]) == (202, "true")
    assert SagaSignal.objects.count() == 1
