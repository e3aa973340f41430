"""An order placed over HTTP while the broker's Redis is down gets its ``201`` and settles once
the broker is back.

The broker is only a doorbell, and by default the API's rate limits count in the same Redis:
the web process here runs as deployed with nothing but ``CELERY_BROKER_URL`` set (the cache
follows it), pointing where nothing listens. Before, the rate limit's count raised on every
request and the client got a ``500`` instead of its order.
"""

from __future__ import annotations

import os
import uuid

import pytest
import requests
from django.db import connection

from orders.models import Order
from sagas.sweeper import sweep
from tests.conftest import database_url_for

from .conftest import api_client_for, gunicorn_web, order_body

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_order_placed_while_redis_is_down_gets_its_201_and_settles_later(
    tmp_path, wait_for, celery_worker, django_user_model, catalog
):
    env = {
        **os.environ,
        "DATABASE_URL": database_url_for(connection.settings_dict),
        "CELERY_BROKER_URL": "redis://127.0.0.1:1/0",  # nothing listens on port 1
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "LOG_FORMAT": "json",
    }
    for name in ("CACHE_URL", "SAGA_PUMP_REDIS_URL", "TEST_DATABASE_NAME"):
        env.pop(name, None)  # the cache and the pump slots follow the broker, as by default
    with gunicorn_web(env, tmp_path) as web_url:
        buyer = django_user_model.objects.create_user(f"buyer-{uuid.uuid4().hex[:6]}")
        headers = {
            "Authorization": f"Token {api_client_for(buyer).token}",
            "Idempotency-Key": f"redis-down-{uuid.uuid4().hex}",
        }
        url = f"{web_url}/api/v1/orders/"
        response = requests.post(url, json=order_body([("lamp", 2)]), headers=headers, timeout=60)
        assert response.status_code == 201, (response.status_code, response.text[:2000])
        order_id = response.json()["id"]
        # A client's retry of the same request replays it: one order, as ever.
        again = requests.post(url, json=order_body([("lamp", 2)]), headers=headers, timeout=60)
        assert (again.status_code, again.json()["id"]) == (201, order_id)
        assert again.headers.get("Idempotent-Replayed") == "true"
    log = (tmp_path / "web.log").read_text()
    assert "api.rate_limit_unavailable" in log
    assert "saga.doorbell_failed" in log
    assert Order.objects.filter(owner=buyer).count() == 1

    def confirmed() -> bool:
        sweep()  # this process's broker answers: the sweeper rings for the overdue saga
        return Order.objects.get(pk=order_id).status == "confirmed"

    wait_for(confirmed, timeout=60, describe=lambda: Order.objects.get(pk=order_id).status)
