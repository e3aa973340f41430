"""``Idempotency-Key`` on ``POST /orders/``: replay, mismatch, in flight, per user, expiry."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from config.idempotency import request_fingerprint
from orders import idempotency
from orders.apps import EXPIRE_IDEMPOTENCY_TASK_NAME
from orders.models import IdempotencyRecord, IdempotencyState, Order
from sagas.models import Saga, SagaSignal

from .conftest import api_client_for, assert_error, counts, order_body

ORDERS = "/api/v1/orders/"


def post(api, body, key):
    return api.post(ORDERS, body, format="json", headers={"Idempotency-Key": key})


@pytest.mark.django_db
def test_same_key_and_body_replays_the_first_response(client_api, catalog):
    """The second POST returns the first status and byte-identical body with
    ``Idempotent-Replayed: true``; only one order and one saga exist."""
    first = post(client_api, order_body(), "order-1")
    assert first.status_code == 201
    assert "Idempotent-Replayed" not in first
    before = counts()

    second = post(client_api, order_body(), "order-1")
    assert second.status_code == 201
    assert second["Idempotent-Replayed"] == "true"
    assert second.content == first.content
    assert second["Location"] == first["Location"]
    assert counts() == before == (1, 1)


@pytest.mark.django_db
def test_replay_ignores_key_order_and_whitespace_of_the_body(client_api, catalog):
    """The fingerprint is over canonical JSON: the same object written differently replays."""
    first = post(client_api, order_body(), "order-1")
    raw = (
        '{ "shipping_address": {"country":"GB","postal_code":"SW1Y 4JH","city":"London",'
        '"line1":"12 St James\'s Square","name":"Ada Lovelace"},'
        '"payment_method":"pm_card_visa", "items":[{"quantity":1,"sku":"lamp"}] }'
    )
    second = client_api.generic(
        "POST", ORDERS, raw, content_type="application/json", HTTP_IDEMPOTENCY_KEY="order-1"
    )
    assert second.status_code == 201
    assert second["Idempotent-Replayed"] == "true"
    assert second.json() == first.json()
    assert Order.objects.count() == 1


@pytest.mark.django_db
def test_replay_returns_the_first_response_even_after_the_order_moved(client_api, catalog):
    """A replay is the response of the first request, not the order's current state."""
    first = post(client_api, order_body(), "order-1")
    Saga.objects.update(current_step="capture_payment", step_index=3)
    replay = post(client_api, order_body(), "order-1")
    assert replay.json()["step"] == "reserve_inventory"
    assert replay.content == first.content


@pytest.mark.django_db
def test_same_key_with_another_body_is_422(client_api, catalog):
    """Another body under a used key: 422 ``idempotency_key_reused``, nothing created."""
    post(client_api, order_body([("lamp", 1)]), "order-1")
    before = counts()
    response = post(client_api, order_body([("lamp", 2)]), "order-1")
    assert_error(response, 422, "idempotency_key_reused")
    assert counts() == before


@pytest.mark.django_db
def test_same_key_while_the_first_request_is_in_flight_is_409(client_api, customer, catalog):
    """While a request holding the key has not finished: 409 with Retry-After, nothing
    created; once it finishes, the same POST replays its response."""
    body = order_body()
    claim = idempotency.idempotency_begin(
        user=customer, key="order-1", fingerprint=request_fingerprint(body)
    )
    response = post(client_api, body, "order-1")
    assert_error(response, 409, "idempotency_request_in_flight")
    assert response["Retry-After"] == "1"
    assert counts() == (0, 0)

    idempotency.idempotency_finish(claim=claim, status=201, body='{"id": "x"}', order=None)
    replay = post(client_api, body, "order-1")
    assert (replay.status_code, replay.json()) == (201, {"id": "x"})


@pytest.mark.django_db
def test_an_abandoned_in_flight_key_is_taken_over(client_api, customer, catalog):
    """A request that died after claiming the key leaves it in flight; after
    IN_FLIGHT_STALE_AFTER the next request with the key places the order, and the dead
    attempt can no longer finish."""
    body = order_body()
    dead = idempotency.idempotency_begin(
        user=customer, key="order-1", fingerprint=request_fingerprint(body)
    )
    IdempotencyRecord.objects.update(
        started_at=timezone.now() - idempotency.IN_FLIGHT_STALE_AFTER - timedelta(seconds=1)
    )
    response = post(client_api, body, "order-1")
    assert response.status_code == 201
    assert "Idempotent-Replayed" not in response
    assert Order.objects.count() == 1
    with pytest.raises(idempotency.IdempotencyRequestInFlight):
        idempotency.idempotency_finish(claim=dead, status=201, body="{}", order=None)


@pytest.mark.django_db
def test_keys_are_per_user(client_api, other_api, catalog):
    """Two clients using the same key string each get their own order; neither sees a
    replay of the other's."""
    mine = post(client_api, order_body(), "order-1")
    theirs = post(other_api, order_body(), "order-1")
    assert (mine.status_code, theirs.status_code) == (201, 201)
    assert "Idempotent-Replayed" not in theirs
    assert mine.json()["id"] != theirs.json()["id"]
    assert Order.objects.count() == 2


@pytest.mark.django_db
def test_a_failed_request_frees_its_key(client_api, catalog):
    """A 400 stores nothing under the key: the corrected request with the same key (and so a
    different body) places the order."""
    bad = post(client_api, order_body([("unicorn", 1)]), "order-1")
    assert_error(bad, 400, "unknown_sku")
    good = post(client_api, order_body([("lamp", 1)]), "order-1")
    assert good.status_code == 201
    assert IdempotencyRecord.objects.get().state == IdempotencyState.DONE


@pytest.mark.django_db
def test_records_are_kept_for_the_ttl_then_expired_by_the_periodic_task(
    client_api, catalog, settings
):
    """Records younger than IDEMPOTENCY_KEY_TTL_HOURS stay (and replay); older ones are
    deleted by the task, after which the key places a new order. The task is scheduled in
    django-celery-beat."""
    assert settings.IDEMPOTENCY_KEY_TTL_HOURS >= 24
    post(client_api, order_body(), "old")
    post(client_api, order_body(), "recent")
    ttl = timedelta(hours=settings.IDEMPOTENCY_KEY_TTL_HOURS)
    IdempotencyRecord.objects.filter(key="old").update(
        created_at=timezone.now() - ttl - timedelta(minutes=1)
    )
    IdempotencyRecord.objects.filter(key="recent").update(
        created_at=timezone.now() - ttl + timedelta(minutes=5)
    )
    from orders.tasks import expire_idempotency_keys

    assert expire_idempotency_keys() == 1
    assert list(IdempotencyRecord.objects.values_list("key", flat=True)) == ["recent"]
    assert post(client_api, order_body(), "recent")["Idempotent-Replayed"] == "true"
    again = post(client_api, order_body(), "old")
    assert again.status_code == 201 and "Idempotent-Replayed" not in again
    assert Order.objects.count() == 3

    task = PeriodicTask.objects.get(name=EXPIRE_IDEMPOTENCY_TASK_NAME)
    assert task.task == "orders.expire_idempotency_keys"
    assert task.enabled


@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_with_one_key_create_exactly_one_order(customer, catalog):
    """Eight threads POST the same body with one key at the same moment: exactly one order and
    one saga; every answer is the 201 (first or replayed, same body) or a 409 in flight."""
    body = order_body()
    barrier = threading.Barrier(8)
    results: list = []
    lock = threading.Lock()

    def worker() -> None:
        api = api_client_for(customer)
        try:
            barrier.wait(timeout=10)
            response = post(api, body, "race-1")
            with lock:
                results.append(response)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)

    assert len(results) == 8
    assert Order.objects.count() == 1
    assert Saga.objects.count() == 1
    statuses = sorted(r.status_code for r in results)
    assert set(statuses) <= {201, 409}, statuses
    created = [r for r in results if r.status_code == 201]
    originals = [r for r in created if "Idempotent-Replayed" not in r]
    assert len(originals) == 1
    assert all(r.content == originals[0].content for r in created)
    for r in results:
        if r.status_code == 409:
            assert r.json()["code"] == "idempotency_request_in_flight"
    record = IdempotencyRecord.objects.get()
    assert str(record.order_id) == originals[0].json()["id"]


def as_wsgi_hands_it_over(text: str) -> str:
    """A UTF-8 header value as a WSGI server passes it on: its bytes read as Latin-1."""
    return text.encode().decode("latin-1")


@pytest.mark.django_db
def test_a_utf8_key_counts_its_letters_and_is_kept_as_written(client_api, catalog):
    """240 Cyrillic letters (480 bytes) are within the 255 allowed; the key replays."""
    key = "ключ" * 60
    first = post(client_api, order_body(), as_wsgi_hands_it_over(key))
    assert first.status_code == 201, first.content
    assert IdempotencyRecord.objects.get().key == key
    again = post(client_api, order_body(), as_wsgi_hands_it_over(key))
    assert (again.status_code, again["Idempotent-Replayed"]) == (201, "true")
    assert again.json()["id"] == first.json()["id"]
    too_long = post(client_api, order_body(), as_wsgi_hands_it_over("ключ" * 64))
    assert_error(too_long, 400, "invalid_idempotency_key")


@pytest.mark.django_db
def test_a_key_that_is_not_utf8_is_kept_as_latin_1_read_it(client_api, catalog):
    response = post(client_api, order_body(), "caf\xe9")  # the byte 0xE9 alone
    assert response.status_code == 201, response.content
    assert IdempotencyRecord.objects.get().key == "caf\xe9"


@pytest.mark.django_db
def test_a_utf8_signal_key_is_kept_as_written(client_api, catalog):
    """The signal routes read the header the same way (sagas.api)."""
    placed = client_api.post(
        ORDERS, order_body(payment_method="pm_card_3ds_required"), format="json"
    )
    assert placed.status_code == 201, placed.content
    key = "подтверждение" * 15  # 195 letters, 390 bytes
    response = client_api.post(
        f"{ORDERS}{placed.json()['id']}/signals/3ds_confirmed/",
        {"payload": {"approved": True}},
        format="json",
        headers={"Idempotency-Key": as_wsgi_hands_it_over(key)},
    )
    assert response.status_code == 202, response.content
    assert SagaSignal.objects.get().key == key


@pytest.mark.django_db
@pytest.mark.parametrize("route", ["order", "webhook", "saga signal", "order signal"])
@pytest.mark.parametrize(
    "key",
    ["", "   ", "\u200b", "\ufeff\u00a0", "k" * 256, "a\tb"],
    ids=["empty", "blank", "zero-width space", "byte-order mark", "256", "tab"],
)
def test_a_key_that_cannot_be_kept_is_the_same_400_on_every_route_that_takes_one(
    client_api, ops_api, place, route, key
):
    """``400 invalid_idempotency_key`` with its message under ``fields["Idempotency-Key"]``,
    as docs/api.md says once for all: an order and a webhook registration answered with
    ``fields: {}`` while a signal named the header, and a signal said it in other words.
    Nothing is created or delivered."""
    from webhooks.models import Endpoint

    order = place(client_api)
    signal = {"payload": {"approved": True}}
    api, path, body = {
        "order": (client_api, ORDERS, order_body()),
        "webhook": (
            client_api,
            "/api/v1/webhooks/",
            {"url": "https://93.184.215.14/h", "events": ["order.updated"]},
        ),
        "saga signal": (
            ops_api,
            f"/api/v1/sagas/{order['saga']['id']}/signals/3ds_confirmed/",
            signal,
        ),
        "order signal": (
            client_api,
            f"/api/v1/orders/{order['id']}/signals/3ds_confirmed/",
            signal,
        ),
    }[route]
    before = counts()
    response = api.post(path, body, format="json", headers={"Idempotency-Key": key})
    error = assert_error(response, 400, "invalid_idempotency_key")
    assert error["fields"] == {"Idempotency-Key": [error["detail"]]}, error
    said = {
        "": "The Idempotency-Key header is empty.",
        "   ": "The Idempotency-Key header is empty.",
        "\u200b": "The Idempotency-Key header is empty.",
        "\ufeff\u00a0": "The Idempotency-Key header is empty.",
        "k" * 256: "The Idempotency-Key header may be at most 255 characters.",
        "a\tb": "The Idempotency-Key header may not hold control characters.",
    }
    assert error["detail"] == said[key], (route, error)  # the same words on every route
    assert counts() == before
    assert not Endpoint.objects.exists() and not SagaSignal.objects.exists()
