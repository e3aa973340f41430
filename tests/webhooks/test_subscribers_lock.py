"""An order being placed while its client registers its first endpoint is never missed: the
read of the client's endpoints (``subscribers``) and a registration (``_lock_owner``) are
ordered by a per-client advisory lock, so the read either comes first (and the registration
then marks the order) or sees the endpoint."""

from __future__ import annotations

import threading

import psycopg
import pytest
from django.db import connection, connections, transaction

from webhooks import services
from webhooks.models import Endpoint

from .conftest import api_client_for, register

pytestmark = pytest.mark.django_db(transaction=True)


def _other_connection() -> psycopg.Connection:
    """A second session on the test database, as another web process would have."""
    s = connection.settings_dict
    return psycopg.connect(
        host=s["HOST"] or None,
        port=s["PORT"] or None,
        user=s["USER"],
        password=s["PASSWORD"] or None,
        dbname=s["NAME"],
    )


def _hold_the_clients_lock(other: psycopg.Connection, owner_id: int) -> None:
    """``other`` takes the client's webhook lock, as a registration in another process does."""
    other.execute(
        "SELECT pg_advisory_xact_lock(%s, %s)", [services._LOCK_SPACE, services._lock_key(owner_id)]
    )


def _one_waits_for_the_lock() -> bool:
    """Exactly one session is queued on an advisory lock (the thread under test)."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        return cursor.fetchone()[0] == 1


def test_a_read_while_a_registration_holds_the_lock_waits_and_sees_the_endpoint(customer, wait_for):
    other = _other_connection()
    try:
        # Another process registers: it holds the client's lock, its endpoint not yet visible.
        _hold_the_clients_lock(other, customer.pk)
        other.execute(
            "INSERT INTO webhooks_endpoint (id, owner_id, url, events, secret, previous_secrets, "
            "is_active, disabled_reason, deleting, created_at) VALUES (gen_random_uuid(), %s, "
            "'http://127.0.0.1:9/hooks', '[\"order.updated\"]', 'whsec_x', '[]', true, '', "
            "false, now())",
            [customer.pk],
        )
        seen: dict[str, bool] = {}

        def place_an_order() -> None:
            try:
                with transaction.atomic():
                    seen["subscribers"] = services.subscribers(customer.pk)
            finally:
                connections.close_all()

        reader = threading.Thread(target=place_an_order)
        reader.start()
        wait_for(_one_waits_for_the_lock, timeout=30, describe=lambda: seen)
        assert "subscribers" not in seen  # it waits for the registration
        other.commit()
        reader.join(timeout=30)
        assert seen == {"subscribers": True}
    finally:
        other.close()


def test_a_read_with_no_registration_under_way_answers_at_once(customer):
    with transaction.atomic():
        assert services.subscribers(customer.pk) is False
    register(api_client_for(customer), "http://127.0.0.1:9/hooks")
    with transaction.atomic():
        assert services.subscribers(customer.pk) is True


def test_two_registrations_at_the_limit_make_no_more_than_the_limit(customer, settings, wait_for):
    """The limit is counted under the client's lock: a registration that waited for another's
    lock counts that one's endpoint too (it counted before taking the lock, and both went in)."""
    settings.WEBHOOKS_ALLOW_PRIVATE = True
    client = api_client_for(customer)
    for _ in range(services.MAX_ENDPOINTS_PER_OWNER - 1):
        register(client, "http://127.0.0.1:9/hooks")
    other = _other_connection()
    try:
        # Another web process registers the last one: it holds the lock, its row not committed.
        _hold_the_clients_lock(other, customer.pk)
        other.execute(
            "INSERT INTO webhooks_endpoint (id, owner_id, url, events, secret, previous_secrets, "
            "is_active, disabled_reason, deleting, created_at) SELECT gen_random_uuid(), "
            "owner_id, url, events, secret, previous_secrets, is_active, disabled_reason, "
            "deleting, now() "
            "FROM webhooks_endpoint WHERE owner_id = %s LIMIT 1",
            [customer.pk],
        )
        outcome: dict[str, str] = {}

        def register_one_more() -> None:
            try:
                services.endpoint_create(
                    owner=customer, url="http://127.0.0.1:9/hooks", events=["order.confirmed"]
                )
                outcome["result"] = "created"
            except services.EndpointInvalid as exc:
                outcome["result"] = exc.code
            finally:
                connections.close_all()

        registrar = threading.Thread(target=register_one_more)
        registrar.start()
        wait_for(_one_waits_for_the_lock, timeout=30, describe=lambda: outcome)
        other.commit()
        registrar.join(timeout=30)
        assert outcome == {"result": "too_many_endpoints"}
        assert Endpoint.objects.filter(owner=customer).count() == services.MAX_ENDPOINTS_PER_OWNER
    finally:
        other.close()
