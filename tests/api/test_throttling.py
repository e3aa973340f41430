"""Rate limits: per user on every route, per user on new orders (replays free), per address
for requests without valid credentials; 429 in the one error shape with Retry-After; counted
in Redis, so two web processes share one count, or, with any other cache, in the database.

Limits here are per day (one per hour), so a run never straddles a window boundary in
practice; each test uses its own users and client addresses (the counters live in the
session's Redis namespace, or in the test database).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import requests
from django.db import connection
from django_celery_beat.models import PeriodicTask
from structlog.testing import capture_logs

from accounts import throttling
from accounts.apps import PURGE_RATE_LIMITS_TASK_NAME
from accounts.models import RateLimitCount
from accounts.tasks import purge_rate_limit_counts
from audit.models import AuditEntry
from config.api_errors import unrouted_detail
from orders.models import IdempotencyRecord, Order
from tests.conftest import REPO_ROOT, database_url_for, wait_until
from tests.embedded import run_on_embedded_sqlite

from .conftest import api_client_for, assert_error, order_body

PRODUCTS = "/api/v1/products/"
ORDERS = "/api/v1/orders/"
SAGAS = "/api/v1/sagas/"


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
def test_requests_a_route_refuses_count_against_the_user(settings, django_user_model):
    """DRF checks permissions before throttles: a user sending requests a route refuses with
    403 (here the staff-only saga list and an ops action) was not counted, and could send them
    without end, each one still looking up its token. They count like any other request, and
    past the limit the answer is 429, there and everywhere else."""
    settings.API_RATE_LIMIT = "3/day"
    api = api_client_for(django_user_model.objects.create_user("nosy"))
    assert_error(api.get(SAGAS), 403)
    assert_error(api.get(SAGAS), 403)
    assert_error(api.post(f"{SAGAS}{uuid.uuid4()}/retry/", {}, format="json"), 403)
    assert_throttled(api.get(SAGAS))
    assert_throttled(api.get(PRODUCTS))


@pytest.mark.django_db
def test_a_user_signed_in_with_a_session_is_limited_too(settings, django_user_model):
    """The browsable API after a console login (a session, no token): the same per-user limit,
    shared with the user's token."""
    settings.API_RATE_LIMIT = "3/day"
    user = django_user_model.objects.create_user("browser", is_staff=True)
    session = api_client_for(None)
    session.force_login(user)
    assert [session.get(PRODUCTS).status_code for _ in range(2)] == [200, 200]
    assert api_client_for(user).get(SAGAS).status_code == 200
    assert_throttled(session.get(PRODUCTS))


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


@pytest.mark.django_db
def test_a_scanner_of_unrouted_paths_is_limited_per_address(settings):
    """No route matches /api/does-not-exist/, so no DRF view ran and nothing was charged: a
    scanner could request made-up paths without end. They count against the address like any
    request without credentials: under the limit the JSON 404 as before, past it the 429,
    there and on real routes; another address is unaffected."""
    settings.API_RATE_LIMIT_ANON = "3/day"
    scanner, neighbour = "203.0.113.70", "203.0.113.71"
    anonymous = api_client_for(None)
    for path in ("/api/does-not-exist/", "/api/v1/orders", "/api/v1/.env"):
        body = assert_error(anonymous.get(path, REMOTE_ADDR=scanner), 404, "not_found")
        assert body["detail"] == unrouted_detail(path)
    assert_throttled(anonymous.get("/api/does-not-exist/", REMOTE_ADDR=scanner))
    assert_throttled(anonymous.post("/api/v1/nothing/", {}, format="json", REMOTE_ADDR=scanner))
    assert_throttled(anonymous.get(PRODUCTS, REMOTE_ADDR=scanner))
    assert_error(anonymous.get("/api/does-not-exist/", REMOTE_ADDR=neighbour), 404, "not_found")


@pytest.mark.django_db
def test_unrouted_paths_count_against_the_user_and_wrong_tokens_against_the_address(
    settings, django_user_model
):
    """A user's requests to paths no route matches share the user's one budget with the real
    routes; a wrong token sent to such a path is charged to its address, as on a real route,
    and is still told the path does not exist (not 401) while under the limit."""
    settings.API_RATE_LIMIT = "3/day"
    settings.API_RATE_LIMIT_ANON = "2/day"
    api = api_client_for(django_user_model.objects.create_user("lost"))
    assert api.get(PRODUCTS).status_code == 200
    assert_error(api.get("/api/v1/product/"), 404, "not_found")
    assert_error(api.delete("/api/v2/orders/"), 404, "not_found")
    assert_throttled(api.get("/api/v1/product/"))
    assert_throttled(api.get(PRODUCTS))

    guesser = api_client_for(None)
    guesser.credentials(HTTP_AUTHORIZATION="Token 00000000000000000000000000000000")
    address = "203.0.113.80"
    assert_error(guesser.get("/api/v1/secret/", REMOTE_ADDR=address), 404, "not_found")
    assert_error(guesser.get(PRODUCTS, REMOTE_ADDR=address), 401)
    assert_throttled(guesser.get("/api/v1/secret/", REMOTE_ADDR=address))


@pytest.mark.django_db
def test_an_ipv6_client_is_limited_by_its_64_not_by_each_address(settings, django_user_model):
    """An IPv6 client holds a whole /64 and may send from any of its addresses: they share one
    anonymous budget; the next /64 has its own. An IPv4-mapped address counts as the IPv4
    one. The audit log still records the exact address a request came from."""
    settings.API_RATE_LIMIT_ANON = "3/day"
    anonymous = api_client_for(None)
    for address in ("2001:db8:5:7::1", "2001:db8:5:7:a::2", "2001:DB8:5:7:ffff:1:2:3"):
        assert_error(anonymous.get(PRODUCTS, REMOTE_ADDR=address), 401)
    assert_throttled(anonymous.get(PRODUCTS, REMOTE_ADDR="2001:db8:5:7:dead:beef::9"))
    assert_error(anonymous.get(PRODUCTS, REMOTE_ADDR="2001:db8:5:8::1"), 401)  # the next /64

    for _ in range(3):
        assert_error(anonymous.get(PRODUCTS, REMOTE_ADDR="::ffff:203.0.113.60"), 401)
    assert_throttled(anonymous.get(PRODUCTS, REMOTE_ADDR="203.0.113.60"))
    assert_error(anonymous.get(PRODUCTS, REMOTE_ADDR="203.0.113.61"), 401)  # IPv4: per address

    owner = api_client_for(django_user_model.objects.create_user("six"))
    assert owner.delete("/api/v1/auth/token/", REMOTE_ADDR="2001:db8:5:7::42").status_code == 204
    assert AuditEntry.objects.get(action="token.revoked").ip == "2001:db8:5:7::42"


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


# ---------------------------------------------------------------------------------------------
# Without Redis: counted in the database
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def db_cache(settings) -> dict:
    """The cache of CACHE_URL=db:// (the default with a RabbitMQ broker); yields its entry."""
    cache = {
        "BACKEND": "django.core.cache.backends.db.DatabaseCache",
        "LOCATION": settings.DB_CACHE_TABLE,
        "KEY_PREFIX": f"db-{uuid.uuid4().hex[:6]}",
    }
    settings.CACHES = {"default": cache}
    return cache


@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_are_each_counted_without_redis(settings, django_user_model, db_cache):
    """CACHE_URL=db://: eight threads, each on a database connection of its own, send 25
    requests each for one user at once. Exactly the limit are answered and every other one is
    refused: not one count is lost (the database cache's incr, a read then a write, lost them,
    and let more through)."""
    settings.API_RATE_LIMIT = "60/day"
    user = django_user_model.objects.create_user(f"racer-{uuid.uuid4().hex[:6]}")
    token = api_client_for(user).token
    barrier = threading.Barrier(8)
    statuses: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        api = api_client_for(None)
        api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        try:
            barrier.wait(timeout=30)
            got = [api.get(PRODUCTS).status_code for _ in range(25)]
            with lock:
                statuses.extend(got)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert len(statuses) == 200
    assert (statuses.count(200), statuses.count(429)) == (60, 140)
    assert RateLimitCount.objects.get(counter=f"user:{user.pk}:86400").hits == 200


@pytest.mark.django_db
def test_an_hourly_count_outlives_the_cache_default_timeout(settings, django_user_model, db_cache):
    """CACHE_URL=db:// and 3/hour: five minutes and a second later (for the cache: every
    entry's expiry moves 301 s earlier) the user has still one request left, not three. The
    database cache's incr wrote the count back with its default timeout of 300 s, so an hourly
    or daily count started again every five minutes. The count is the window's row, kept until
    the window's end."""
    settings.API_RATE_LIMIT = "3/hour"
    user = django_user_model.objects.create_user(f"hourly-{uuid.uuid4().hex[:6]}")
    api = api_client_for(user)
    window_end = datetime.fromtimestamp((int(time.time()) // 3600 + 1) * 3600, tz=UTC)
    assert [api.get(PRODUCTS).status_code for _ in range(2)] == [200, 200]

    table = connection.ops.quote_name(settings.DB_CACHE_TABLE)
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {table} SET expires = expires - interval '301 seconds'")
    assert api.get(PRODUCTS).status_code == 200
    assert_throttled(api.get(PRODUCTS))

    count = RateLimitCount.objects.get(counter=f"user:{user.pk}:3600")
    assert (count.window_end, count.hits) == (window_end, 4)


@pytest.mark.django_db
def test_counts_survive_a_full_database_cache(settings, db_cache):
    """CACHE_URL=db:// whose cache is full (MAX_ENTRIES, small here, 300 by default): the
    cache culls entries to make room, and a client's count was among them, so its limit
    started again. Ten other addresses asking once do not lift an address's limit."""
    db_cache["OPTIONS"] = {"MAX_ENTRIES": 5, "CULL_FREQUENCY": 0}  # full: emptied
    settings.CACHES = {"default": db_cache}
    settings.API_RATE_LIMIT_ANON = "2/day"
    anonymous = api_client_for(None)
    client = "198.51.100.7"
    for _ in range(2):
        assert_error(anonymous.get(PRODUCTS, REMOTE_ADDR=client), 401)
    for host in range(10):
        assert_error(anonymous.get(PRODUCTS, REMOTE_ADDR=f"203.0.113.{100 + host}"), 401)
    assert_throttled(anonymous.get(PRODUCTS, REMOTE_ADDR=client))


@pytest.mark.django_db
def test_the_purge_deletes_the_counts_of_ended_windows_only():
    """The periodic purge deletes a count whose window ended more than a minute ago and keeps
    those of open windows (and of one that has just ended, for a host whose clock is behind);
    it is scheduled in django-celery-beat."""
    now = datetime.now(tz=UTC).replace(microsecond=0)
    ends = {
        "ended-an-hour-ago": now - timedelta(hours=1),
        "ended-just-now": now - timedelta(seconds=5),
        "open": now + timedelta(seconds=30),
        "open-all-day": now + timedelta(hours=20),
    }
    RateLimitCount.objects.bulk_create(
        RateLimitCount(counter=name, window_end=end, hits=3) for name, end in ends.items()
    )
    assert purge_rate_limit_counts() == 1
    kept = RateLimitCount.objects.values_list("counter", flat=True)
    assert sorted(kept) == ["ended-just-now", "open", "open-all-day"]

    task = PeriodicTask.objects.get(name=PURGE_RATE_LIMITS_TASK_NAME)
    assert task.task == "accounts.purge_rate_limit_counts"
    assert task.enabled


SQLITE_COUNT = """
import json, threading
import django
django.setup()
from django.db import connection
from accounts.models import RateLimitCount
from accounts.throttling import count_in_database, purge_ended_windows

barrier = threading.Barrier(8)
numbers, lock = [], threading.Lock()

def worker():
    try:
        barrier.wait(timeout=30)
        got = [count_in_database("user:1:60", window_end=4102444800) for _ in range(25)]
        with lock:
            numbers.extend(got)
    finally:
        connection.close()

threads = [threading.Thread(target=worker) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join(timeout=120)
count_in_database("user:1:60", window_end=946684800)  # a window long over
print(json.dumps({
    "numbers": sorted(numbers),
    "purged": purge_ended_windows(),
    "rows": list(RateLimitCount.objects.values_list("counter", "hits")),
}))
"""


def test_counts_on_the_embedded_sqlite_database(tmp_path):
    """``make run`` without services (SQLite, CACHE_URL=file://...): the same one statement
    counts there (SQLite 3.35 or later). Eight threads count 25 requests each in one window:
    each gets its own number, 1 to 200; the purge deletes an ended window's row."""
    outcome = run_on_embedded_sqlite(
        tmp_path, SQLITE_COUNT, CACHE_URL=f"file://{tmp_path / 'cache'}"
    )
    assert outcome == {
        "numbers": list(range(1, 201)),
        "purged": 1,
        "rows": [["user:1:60", 200]],
    }
