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


def test_a_read_while_a_registration_holds_the_lock_waits_and_sees_the_endpoint(customer, wait_for):
    endpoint = register(api_client_for(customer), "http://127.0.0.1:9/hooks")
    Endpoint.objects.filter(pk=endpoint["id"]).update(is_active=False)
    other = _other_connection()
    try:
        # Another process registers: it holds the client's lock, its endpoint not yet visible.
        other.execute(
            "SELECT pg_advisory_xact_lock(%s, %s)",
            [services._LOCK_SPACE, services._lock_key(customer.pk)],
        )
        other.execute(
            "UPDATE webhooks_endpoint SET is_active = true WHERE id = %s", [endpoint["id"]]
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
        wait_for(
            lambda: (
                connection.cursor()
                .execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                )
                .fetchone()[0]
                == 1
            ),
            timeout=30,
            describe=lambda: seen,
        )
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
