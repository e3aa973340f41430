"""Rate limits: per user on every route, per user on new orders (replays free), per address
for requests without valid credentials; 429 in the one error shape with Retry-After; counted
in Redis, so two web processes share one count.

Limits here are per day, so a run never straddles a window boundary in practice; each test
uses its own users and client addresses (the counters live in the session's Redis namespace).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid

import pytest
import requests
from django.db import connection
from structlog.testing import capture_logs

from accounts import throttling
from orders.models import IdempotencyRecord, Order
from tests.conftest import REPO_ROOT, database_url_for, wait_until

from .conftest import api_client_for, assert_error, order_body

PRODUCTS = "/api/v1/products/"
ORDERS = "/api/v1/orders/"


def assert_throttled(response) -> None:
    body = assert_error(response, 429, "throttled")
    assert body["fields"] == {}
    retry_after = int(response["Retry-After"])
    assert 1 <= retry_after <= 86400


@pytest.mark.django_db
def test_a_user_above_api_rate_limit_gets_429_with_retry_after(settings, django_user_model):
    settings.API_RATE_LIMIT = "3/day"
    api = api_client_for(django_user_model.objects.create_user("busy"))
    other = api_client_for(django_user_model.objects.create_user("calm"))
    for _ in range(3):
        assert api.get(PRODUCTS).status_code == 200
    assert_throttled(api.get(PRODUCTS))
    assert_throttled(api.get(ORDERS))  # every route, one budget
    assert other.get(PRODUCTS).status_code == 200  # per user


@pytest.mark.django_db
def test_order_limit_counts_new_orders_only_not_replays(settings, django_user_model, catalog):
    """Two orders allowed: a replay of the first is still answered (201, replayed); a third
    new order is 429 and leaves no order and no key behind, so it can be sent again later."""
    settings.API_RATE_LIMIT_ORDERS = "2/day"
    api = api_client_for(django_user_model.objects.create_user("shopper"))
    body = order_body([("lamp", 1)])
    first = api.post(ORDERS, body, format="json", headers={"Idempotency-Key": "k1"})
    assert first.status_code == 201
    assert (
        api.post(ORDERS, body, format="json", headers={"Idempotency-Key": "k2"}).status_code == 201
    )
    for _ in range(3):
        replay = api.post(ORDERS, body, format="json", headers={"Idempotency-Key": "k1"})
        assert replay.status_code == 201 and replay["Idempotent-Replayed"] == "true"
        assert replay.json()["id"] == first.json()["id"]

    assert_throttled(api.post(ORDERS, body, format="json", headers={"Idempotency-Key": "k3"}))
    assert_throttled(api.post(ORDERS, body, format="json"))
    assert Order.objects.filter(owner=api.user).count() == 2
    assert not IdempotencyRecord.objects.filter(key="k3").exists()
    assert api.get(ORDERS).status_code == 200  # reading is not limited by the order limit

    settings.API_RATE_LIMIT_ORDERS = "10/day"
    assert (
        api.post(ORDERS, body, format="json", headers={"Idempotency-Key": "k3"}).status_code == 201
    )


@pytest.mark.django_db
def test_requests_without_valid_credentials_are_limited_per_address(settings, django_user_model):
    """Wrong tokens and no credentials count against the address: past the limit a guesser gets
    429 instead of 401; another address is unaffected, and a valid token is not charged."""
    settings.API_RATE_LIMIT_ANON = "3/day"
    guesser = api_client_for(None)
    guesser.credentials(HTTP_AUTHORIZATION="Token 00000000000000000000000000000000")
    attacker, neighbour = "203.0.113.50", "203.0.113.51"
    assert_error(guesser.get(PRODUCTS, REMOTE_ADDR=attacker), 401)
    assert_error(guesser.get(PRODUCTS, REMOTE_ADDR=attacker), 401)
    assert_error(api_client_for(None).get(PRODUCTS, REMOTE_ADDR=attacker), 401)
    assert_throttled(guesser.get(PRODUCTS, REMOTE_ADDR=attacker))
    schema = api_client_for(None).get("/api/schema/?format=json", REMOTE_ADDR=attacker)
    assert schema.status_code == 429 and schema.json()["code"] == "throttled"
    assert int(schema["Retry-After"]) >= 1
    assert_error(guesser.get(PRODUCTS, REMOTE_ADDR=neighbour), 401)

    valid = api_client_for(django_user_model.objects.create_user("legit"))
    for _ in range(5):
        assert valid.get(PRODUCTS, REMOTE_ADDR=neighbour).status_code == 200


# ---------------------------------------------------------------------------------------------
# Two web processes, one Redis
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def two_web_processes(transactional_db, tmp_path):
    """Two gunicorn processes on the test database and this session's Redis namespace, with
    small limits; yields their base URLs."""
    env = {
        **os.environ,
        "DATABASE_URL": database_url_for(connection.settings_dict),
        "API_RATE_LIMIT": "4/day",
        "API_RATE_LIMIT_ORDERS": "2/day",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        "LOG_LEVEL": "WARNING",
    }
    env.pop("TEST_DATABASE_NAME", None)
    procs, urls = [], []
    try:
        for name in ("web-a", "web-b"):
            port = _free_port()
            log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "gunicorn",
                        "config.wsgi",
                        "--workers",
                        "1",
                        "--bind",
                        f"127.0.0.1:{port}",
                    ],
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(urls, procs, strict=True):
            wait_until(
                lambda url=url, proc=proc: proc.poll() is not None or _answers(url),
                timeout=90,
            )
            assert proc.poll() is None, (tmp_path / "web-a.log").read_text()
        yield urls
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


def _answers(url: str) -> bool:
    try:
        requests.get(f"{url}/healthz", timeout=2)
        return True
    except requests.RequestException:
        return False


def test_two_web_processes_share_one_count(two_web_processes, django_user_model, catalog):
    """Requests alternate between two gunicorn processes: together they allow the limit, not
    twice it, and both refuse afterwards; the order limit likewise."""
    a, b = two_web_processes
    user = django_user_model.objects.create_user(f"spread-{uuid.uuid4().hex[:6]}")
    headers = {"Authorization": f"Token {api_client_for(user).token}"}
    statuses = [
        requests.get(f"{url}{PRODUCTS}", headers=headers, timeout=30).status_code
        for url in (a, b, a, b)
    ]
    assert statuses == [200, 200, 200, 200]
    for url in (a, b):
        response = requests.get(f"{url}{PRODUCTS}", headers=headers, timeout=30)
        assert response.status_code == 429
        assert response.json()["code"] == "throttled"
        assert int(response.headers["Retry-After"]) >= 1

    buyer = django_user_model.objects.create_user(f"buyer-{uuid.uuid4().hex[:6]}")
    headers = {"Authorization": f"Token {api_client_for(buyer).token}"}
    body = order_body([("lamp", 1)])
    placed = [
        requests.post(f"{url}{ORDERS}", json=body, headers=headers, timeout=30).status_code
        for url in (a, b, a)
    ]
    assert placed == [201, 201, 429]
    assert Order.objects.filter(owner=buyer).count() == 2


# ---------------------------------------------------------------------------------------------
# A cache that does not answer
# ---------------------------------------------------------------------------------------------
@pytest.mark.django_db
def test_a_cache_that_does_not_answer_lets_requests_through_uncounted(
    settings, monkeypatch, django_user_model, catalog
):
    """Redis down (by default the cache is the broker's): requests are answered, not failed,
    uncounted for a span with one warning; once the span is over the cache is asked again and
    the limits hold as before."""
    monkeypatch.setattr(throttling, "_down_until", 0.0)
    monkeypatch.setattr(throttling, "DOWN_SECONDS", 3600.0)  # one span, however slow the run
    answering = settings.CACHES
    settings.CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",  # nothing listens on port 1
            "KEY_PREFIX": f"down-{uuid.uuid4().hex[:6]}",
        }
    }
    settings.API_RATE_LIMIT = "2/day"
    settings.API_RATE_LIMIT_ORDERS = "1/day"
    api = api_client_for(django_user_model.objects.create_user(f"down-{uuid.uuid4().hex[:6]}"))
    with capture_logs() as logs:
        assert [api.get(PRODUCTS).status_code for _ in range(3)] == [200, 200, 200]
        placed = [
            api.post(ORDERS, order_body([("lamp", 1)]), format="json").status_code for _ in range(2)
        ]
    assert placed == [201, 201]
    warnings = [line for line in logs if line["event"] == "api.rate_limit_unavailable"]
    assert len(warnings) == 1, logs
    assert "ConnectionError" in warnings[0]["error"]
    assert warnings[0]["uncounted_for_seconds"] == 3600.0

    settings.CACHES = answering
    monkeypatch.setattr(throttling, "_down_until", 0.0)  # the span is over
    assert [api.get(PRODUCTS).status_code for _ in range(2)] == [200, 200]
    assert_throttled(api.get(PRODUCTS))
