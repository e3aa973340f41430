"""The chaos run (``make chaos``): orders over HTTP while workers die and the broker restarts.

The run starts a stack of its own (:mod:`lab.stack`): a fresh PostgreSQL database, its own
Redis server, two prefork workers, beat and gunicorn, every process with ``SAGA_FAULTS``
switching on every fault kind on every participant operation. In full mode a warm-up first
measures how many orders per second that stack finishes (:func:`_warm_up`), and the load is
offered at half of it (see :func:`deadline_for` for why, and for the run's deadline). Client
threads place orders over
HTTP (random items, payment methods and countries, including the declining cards and ``AQ``),
some of them twice with the same ``Idempotency-Key`` and body, and ask to cancel a few. A few
orders are above ``ORDER_FRAUD_REVIEW_ABOVE`` and wait for a fraud review: a reviewer thread (an
ops user) finds them through ``GET /sagas/?waiting_for=fraud_review`` and approves or rejects
each one through ``POST /sagas/{id}/signals/fraud_review/``, every decision sent twice with
the same key (the second is a replay) and a few sent before the saga reaches the wait. Meanwhile
a chaos thread SIGKILLs worker processes (a worker's main process or one of its pool children)
and starts them again, and stops and starts the Redis server.

Then it waits for every order to settle and checks what the README's Guarantees section promises:

* ``check_invariants --require-settled``: guarantees 1 to 4 over the database;
* guarantee 5 through the API: every response for a key carried one order id, a final replay
  of every key returns that id, and each user's order list holds exactly one order per key;
* the outcomes through the API: every order is ``confirmed``, ``cancelled`` or
  ``needs_attention``, and none that the docs say must fail (a declined card, a declined
  capture, ``AQ``, a rejected fraud review) is confirmed; every review decision was answered
  ``202`` and every rejected order is cancelled with ``fraud_rejected`` (or needs attention);
* ``POST /orders/`` answered ``201`` (or ``409`` for a duplicate still in flight) throughout,
  broker outages included.

It prints one summary and exits 1 on any violation. Logs of every process are kept under
``var/chaos/<pid>/`` when the run fails (or with ``--keep``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from decimal import Decimal
from io import StringIO
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from lab import chaos_webhooks, order_deploy
from lab.stack import (
    REPO_ROOT,
    BrokerProxy,
    PgServer,
    Stack,
    default_database_url,
    replace_host_port,
    spare_port,
    stack_env,
    wait_until,
)
from lab.supervisor import kill_pid
from orders.status import CANCELLATION_REASONS as CANCELLATION_REASONS_READ
from orders.status import OrderStatus

INNER_ENV = "SAGARUNNER_CHAOS_INNER"
DB_PREFIX = "sagarunner_chaos_"
OPERATIONS = (
    "inventory.reserve", "inventory.release", "inventory.commit",
    "payments.authorize", "payments.void", "payments.capture", "payments.refund",
    "shipping.arrange", "shipping.cancel",
)  # fmt: skip
#: Every fault kind on every operation, at rates a bad day at a provider might show.
FAULTS = {
    op: {"error": 0.1, "lost_response": 0.05, "crash": 0.01, "latency_ms": [0, 10]}
    for op in OPERATIONS
}
#: Short knobs so a crashed step is picked up again within seconds (lease = step timeout +
#: inline budget + 5 s; then the sweeper, every second, rings for it).
KNOBS = {
    "SAGA_BACKOFF_BASE": "0.1",
    "SAGA_BACKOFF_MAX": "2",
    "SAGA_STUCK_AFTER": "1",
    "SAGA_SWEEP_INTERVAL": "1",
    "SAGA_STEP_TIMEOUT": "3",
    "SAGA_INLINE_BUDGET": "0.5",
    # SAGA_DEADLINE: see deadline_for() (it covers the outage phase and its backlog's drain).
    # Provider breakers with short cool-downs, and the parked backlog released over two
    # seconds. min_calls 5, not the default 10: at the few orders per second the full run
    # offers on a busy machine (half its measured capacity), one saga's five attempts can all
    # fail on the outage before ten failures were seen, and it was cancelled for step_failed
    # (a smoke run at 1.1 orders/s, 2026-12-03). With 5 (= SAGA_MAX_ATTEMPTS) its own failures
    # open the breaker by its last attempt (five in a row, however far apart: the broker
    # outage often starts with the provider's, both due once the deploy gate lets the load
    # on, and spreads the retries), which then parks instead. A last attempt failing with no
    # call answered since the one before it (an outage only this saga has met, its earlier
    # attempts spent on ordinary faults or lost to a kill) is held back a cool-down at a time
    # until its failures in a row open the breaker; one after others' calls went through,
    # failing with the provider's most recent calls, parks for a cool-down, once
    # (providers.breaker.held_back). The injected faults (about
    # one call in six) give five failures in a row, or half of two busy seconds, only by a
    # rare fluke, and then the breaker is open for a cool-down, no more.
    "SAGA_PROVIDERS": json.dumps(
        {
            name: {"cooldown": 3, "release_spread": 2, "min_calls": 5}
            for name in ("inventory", "payments", "shipping")
        }
    ),
    # A review the reviewer missed escalates to a person (needs_attention) instead of waiting
    # the default day; the reviewer answers within seconds.
    "ORDER_FRAUD_REVIEW_TIMEOUT": "90",
}
# sku, name, price, stock (None: plenty). The rug is scarce, so out_of_stock happens under load.
CATALOG = [
    ("chaos-mug", "Mug", "8.50", None),
    ("chaos-poster", "Poster", "12.00", None),
    ("chaos-lamp", "Lamp", "19.90", None),
    ("chaos-chair", "Chair", "89.00", None),
    ("chaos-desk", "Desk", "249.00", None),
    ("chaos-rug", "Rug", "120.00", "scarce"),
    # Two of these are above ORDER_FRAUD_REVIEW_ABOVE (1000.00): the order waits for a review.
    ("chaos-safe", "Safe", "600.00", None),
]
#: Share of orders with two safes (a fraud review).
REVIEW_RATE = 0.08
REJECT_EVERY = 3
#: Share of large orders the reviewer decides before their saga reaches the review.
EARLY_RATE = 0.3
REVIEW_ABOVE = Decimal("1000.00")  # ORDER_FRAUD_REVIEW_ABOVE's default
PAYMENT_METHODS = {
    "pm_card_visa": 76,
    "pm_card_declined": 8,
    "pm_card_capture_declined": 8,
    "pm_card_refund_fails": 8,
}
COUNTRIES = {"GB": 30, "DE": 25, "FR": 20, "NL": 10, "SE": 9, "AQ": 6}
#: The full run offers this share of the orders per second the stack finished in its warm-up
#: (``--rate`` left out). Below 1, so that without the outage the stack keeps up and no order
#: waits long enough to pass its deadline; 0.5 leaves the stack as much spare capacity as
#: the offered load itself, which is what drains the outage's backlog (see deadline_for).
LOAD_SHARE = 0.5
#: ... and never more than this (the offered load of the full run before it was measured).
MAX_RATE = 20.0
#: Orders of the warm-up: placed at once, settled, timed (a mug, a good card, GB: no review).
WARMUP_ORDERS = 60
#: The warm-up's measure: orders per second until this share of them settled (the last few
#: wait out an injected crash's lease, which says nothing about throughput).
WARMUP_SHARE = 0.8
#: The chaos run's deadline never drops below this (the quick run's, and the run before the
#: outage phase had one).
MIN_DEADLINE = 120.0
#: Beyond the outage and its drain: a saga's own time, worker kills, broker restarts and the
#: rolling deploy, each of which stops part of the stack for seconds.
DEADLINE_MARGIN = 60.0
#: Outcomes a business rule forbids, whatever the faults did.
NEVER_CONFIRMED = {"pm_card_declined", "pm_card_capture_declined"}
#: What the API may answer, from the order app itself (one list of each).
SETTLED = set(OrderStatus.SETTLED)
CANCELLATION_REASONS = set(CANCELLATION_REASONS_READ)


@dataclass
class ChaosConfig:
    mode: str = "full"
    orders: int = 1000
    seed: int = 0
    kills: int = 12
    broker_restarts: int = 2
    clients: int = 8
    users: int = 4
    #: Offered orders per second; ``None`` (the full run's default): ``LOAD_SHARE`` of the
    #: stack's measured capacity (a warm-up before the load), at most ``MAX_RATE``.
    rate: float | None = None
    duplicate_rate: float = 0.15
    cancel_rate: float = 0.08
    settle_timeout: float = 300.0
    #: At 20% of the load, deploy the next order saga version beside the others (a rolling
    #: restart of every process; ``--no-switch-version`` leaves it out).
    version_switch: bool = True
    broker_url: str | None = None
    keep: bool = False
    json_path: str | None = None
    #: The outage phase: this fake provider is down for every worker for this long, from
    #: the moment this fraction of the load is placed (0 seconds: no outage phase).
    outage_provider: str = "payments"
    outage_seconds: float = 60.0
    outage_at: float = 0.4
    #: Off runs the same scenario with the provider breakers switched off, for comparison.
    breakers: bool = True

    @classmethod
    def quick(cls, **overrides: Any) -> ChaosConfig:
        base = cls(
            mode="quick",
            # Enough for every path (three kills, the deploy, both review answers, the outage's
            # parked orders) on either broker; each order more costs CPU that make test, which
            # runs this twice beside the rest of the suite on two cores, pays in wall time.
            orders=60,
            kills=3,
            broker_restarts=1,
            clients=4,
            users=2,
            rate=10.0,
            settle_timeout=120.0,
            outage_seconds=12.0,
        )
        for key, value in overrides.items():
            setattr(base, key, value)
        return base


# ---------------------------------------------------------------------------------------------
# Outer process: choose the run's database, ports and queue, then re-run inside that world
# ---------------------------------------------------------------------------------------------
def deadline_for(config: ChaosConfig) -> float:
    """The chaos run's ``SAGA_DEADLINE``: long enough for an order to ride out the outage phase.

    At ``LOAD_SHARE`` f of the stack's capacity c, an outage of T seconds parks the f*c*T
    orders that reach the provider meanwhile; once it is back, the stack drains them with
    the capacity the offered load leaves over, (1 - f) * c, in f*T/(1 - f) seconds, while new
    orders keep arriving. The last order parked then settles about T/(1 - f) seconds after the
    outage began (120 s for 60 s at half the capacity), whatever c is; ``DEADLINE_MARGIN``
    covers the saga's own time and the stack's other interruptions. A deadline shorter than
    that would cancel orders for the outage by design (guarantee 6 allows it, the run's target
    is none), and the deadline keeps running while a saga waits: it is the customer's.
    With ``--rate`` above the measured capacity the estimate does not hold, and the summary
    reports the orders that passed their deadline in the general backlog apart.
    """
    if config.outage_seconds <= 0:
        return MIN_DEADLINE
    drained = config.outage_seconds / (1 - LOAD_SHARE)
    return max(MIN_DEADLINE, drained + DEADLINE_MARGIN)


def reexec_inside(config: ChaosConfig, argv: list[str]) -> None:
    """Replace this process with the same command, pointed at the run's own database and broker.

    Django reads ``DATABASE_URL`` and ``CELERY_BROKER_URL`` once, at start; re-running with the
    run's environment makes this process, and every process it starts, see only the stack.
    The pid (and so the database name) stays the same across ``exec``.
    """
    from django.conf import settings

    pid = os.getpid()
    server = PgServer.from_url(default_database_url())
    database = f"{DB_PREFIX}{pid}"
    run_dir = Path(settings.VAR_DIR) / "chaos" / str(pid)
    extra = {
        **KNOBS,
        "SAGA_DEADLINE": f"{deadline_for(config):g}",
        "SAGA_FAULTS": json.dumps(FAULTS),
        INNER_ENV: str(pid),
        "SAGARUNNER_CHAOS_DB": database,
        "SAGARUNNER_CHAOS_DIR": str(run_dir),
        # The fake providers count their concurrent calls: the summary shows the peak.
        "SAGA_FAKE_PROVIDER_STATS": "1",
        # Each client's webhook receiver listens on 127.0.0.1 (lab.chaos_webhooks).
        "WEBHOOKS_ALLOW_PRIVATE": "1",
        # The next order saga version joins every process started once this file exists.
        "SAGA_DEFINITION_MODULES": "lab.bench_saga,lab.order_deploy",
        order_deploy.FLAG_ENV: str(run_dir / "order-next-deployed"),
    }
    if not config.breakers:
        extra["SAGA_PROVIDER_BREAKERS"] = "0"
    if config.broker_url:
        target = urlsplit(config.broker_url)
        default_port = 6379 if target.scheme.startswith("redis") else 5672
        proxy_port = spare_port()
        broker = replace_host_port(config.broker_url, "127.0.0.1", proxy_port)
        extra["SAGARUNNER_CHAOS_PROXY"] = (
            f"{proxy_port} {target.hostname or '127.0.0.1'} {target.port or default_port}"
        )
        extra["SAGARUNNER_CHAOS_BROKER_TARGET"] = config.broker_url
    else:
        redis_port = spare_port()
        broker = f"redis://127.0.0.1:{redis_port}/0"
        extra["SAGARUNNER_CHAOS_REDIS_PORT"] = str(redis_port)
    env = stack_env(
        database_url=server.url(database),
        broker_url=broker,
        queue=f"chaos-{pid}",
        metrics_dir=run_dir / "metrics",
        extra=extra,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics").mkdir(exist_ok=True)
    os.execvpe(sys.executable, [sys.executable, str(REPO_ROOT / "manage.py"), *argv[1:]], env)


def is_inside() -> bool:
    return os.environ.get(INNER_ENV) == str(os.getpid())


# ---------------------------------------------------------------------------------------------
# HTTP client (requests, one keep-alive session per thread)
# ---------------------------------------------------------------------------------------------
class Http:
    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.timeout = timeout
        self.session = requests.Session()
        self._used = False

    def request(
        self, method: str, path: str, token: str, body: Any = None, headers: dict | None = None
    ) -> tuple[int, dict[str, str], Any]:
        """One request; a connection the server closed while idle is retried once, fresh."""
        payload = None if body is None else json.dumps(body, sort_keys=True).encode()
        hdrs = {"Authorization": f"Token {token}", "Accept": "application/json"}
        if payload is not None:
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        for attempt in (1, 2):
            reused = self._used
            try:
                resp = self.session.request(
                    method, self.base + path, data=payload, headers=hdrs, timeout=self.timeout
                )
            except requests.ConnectionError:
                self.close()
                if reused and attempt == 1:
                    continue  # the keep-alive connection was closed under us; try a fresh one
                raise
            self._used = True
            raw = resp.content
            try:
                data = json.loads(raw) if raw else None
            except ValueError:
                data = raw[:300].decode(errors="replace")
            return resp.status_code, {k.lower(): v for k, v in resp.headers.items()}, data
        raise AssertionError("unreachable")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.session.close()
        self.session = requests.Session()
        self._used = False


# ---------------------------------------------------------------------------------------------
# The plan: every placement decided up front from the seed
# ---------------------------------------------------------------------------------------------
@dataclass
class Placement:
    key: str
    user: int
    body: dict
    duplicate: bool = False
    cancel_after: float | None = None  # seconds after the 201, if the client asks to cancel


def _weighted(rng: random.Random, weights: dict[str, int]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def make_plan(config: ChaosConfig) -> list[Placement]:
    rng = random.Random(config.seed)
    common = [sku for sku, _, _, stock in CATALOG if stock is None and sku != "chaos-safe"]
    slots: list[tuple[float, int, Placement]] = []
    for i in range(config.orders):
        skus = rng.sample(common, rng.randint(1, 3))
        if rng.random() < 0.08:
            skus.append("chaos-rug")
        items = [{"sku": sku, "quantity": rng.randint(1, 3)} for sku in skus]
        if rng.random() < REVIEW_RATE:
            items.append({"sku": "chaos-safe", "quantity": 2})
        body = {
            "items": items,
            "payment_method": _weighted(rng, PAYMENT_METHODS),
            "shipping_address": {
                "name": f"Chaos Customer {i}",
                "line1": f"{i} Entropy Lane",
                "city": "Faultham",
                "postal_code": f"CH{i % 1000:03d}",
                "country": _weighted(rng, COUNTRIES),
            },
        }
        cancel_after = rng.uniform(0.0, 1.0) if rng.random() < config.cancel_rate else None
        p = Placement(f"chaos-{config.seed}-{i}", i % config.users, body, False, cancel_after)
        slots.append((float(i), 0, p))
        if rng.random() < config.duplicate_rate:
            # Sometimes right behind the first (still in flight: 409, then a replay), sometimes
            # a while later (a client retrying after a timeout it thought it saw).
            later = i + rng.choice([0.1, 0.5, rng.uniform(1, 20)])
            slots.append((later, 1, Placement(p.key, p.user, p.body, True, None)))
    slots.sort(key=lambda s: (s[0], s[1]))
    return [p for _, _, p in slots]


# ---------------------------------------------------------------------------------------------
# Shared bookkeeping of a run
# ---------------------------------------------------------------------------------------------
@dataclass
class Record:
    ids: set[str] = field(default_factory=set)
    placements: int = 0
    replays: int = 0
    body: dict | None = None
    user: int = 0


@dataclass
class Tally:
    started: float = field(default_factory=time.monotonic)
    load_started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    records: dict[str, Record] = field(default_factory=lambda: defaultdict(Record))
    done: int = 0
    in_flight_409: int = 0
    unexpected: list[str] = field(default_factory=list)
    transport_errors: int = 0
    cancels: Counter = field(default_factory=Counter)
    events: list[str] = field(default_factory=list)
    kills: Counter = field(default_factory=Counter)
    broker_outages: list[float] = field(default_factory=list)
    load_finished: float | None = None
    #: The provider outage: when it began and ended (aware datetimes), and the provider's
    #: count of calls it got while down at the moment its breaker first opened.
    outage_began: Any = None
    outage_ended: Any = None
    outage_calls_at_open: int | None = None
    #: When the provider's breaker first closed after the provider came back (aware).
    breaker_closed_at: Any = None
    #: Set once the deploy of the next order saga version is done (the web reloaded).
    deployed: threading.Event = field(default_factory=threading.Event)

    def now(self) -> float:
        return time.monotonic() - self.started

    def log(self, message: str) -> None:
        line = f"[chaos {self.now():6.1f}s] {message}"
        with self.lock:
            self.events.append(line)
        print(line, flush=True)

    def odd(self, message: str) -> None:
        with self.lock:
            self.unexpected.append(f"{self.now():.1f}s {message}")
        self.log(f"UNEXPECTED {message}")


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------
#: With the version switch on, placements from this share of the plan on wait until the deploy
#: (at 20%) is done, so orders are always placed on the new version, however slow the machine.
DEPLOY_GATE = 0.6
#: ... but not for ever: a deploy that never finishes fails the run's version check instead.
DEPLOY_GATE_TIMEOUT = 180.0


class Clients:
    def __init__(self, config, port, tokens, plan, tally, load_deadline) -> None:
        self.config, self.port, self.tokens, self.tally = config, port, tokens, tally
        self.work: queue.Queue = queue.Queue()
        for n, p in enumerate(plan):
            self.work.put((n, p))
        self.total = len(plan)
        self.load_deadline = load_deadline
        self.rng = random.Random(config.seed + 1)
        self.gate = int(DEPLOY_GATE * len(plan)) if config.version_switch else None
        self.pacer: Pacer | None = None

    def run(self) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._client, name=f"client{i}", daemon=True)
            for i in range(self.config.clients)
        ]
        for t in threads:
            t.start()
        return threads

    def _client(self) -> None:
        http_ = Http(self.port)
        try:
            while True:
                try:
                    n, placement = self.work.get_nowait()
                except queue.Empty:
                    return
                gated = self.gate is not None and n >= self.gate
                if gated and not self.tally.deployed.wait(DEPLOY_GATE_TIMEOUT):
                    self.gate = None  # the version check reports it
                while True:
                    if self.pacer is not None:
                        self.pacer.wait_until_clear(self.load_deadline)
                    paused = self.pacer.paused() if self.pacer is not None else 0.0
                    due = self.tally.load_started + paused + n / self.config.rate
                    delay = due - time.monotonic()
                    if delay <= 0:
                        break
                    time.sleep(min(delay, 0.5))  # a hold may begin meanwhile
                self._place(http_, placement)
                with self.tally.lock:
                    self.tally.done += 1
        finally:
            http_.close()

    def _place(self, http_: Http, p: Placement) -> None:
        token = self.tokens[p.user]
        path = "/api/v1/orders/"
        while True:
            if time.monotonic() > self.load_deadline:
                self.tally.odd(f"POST {path} key {p.key}: gave up at the load deadline")
                return
            try:
                status, headers, data = http_.request(
                    "POST", path, token, p.body, {"Idempotency-Key": p.key}
                )
            except requests.RequestException as exc:
                with self.tally.lock:
                    self.tally.transport_errors += 1
                self.tally.odd(f"POST {path} key {p.key}: {type(exc).__name__}: {exc}")
                time.sleep(0.5)
                continue  # same key, same body: safe to send again
            if status == 201 and isinstance(data, dict) and data.get("id"):
                replayed = headers.get("idempotent-replayed") == "true"
                with self.tally.lock:
                    rec = self.tally.records[p.key]
                    rec.ids.add(data["id"])
                    rec.body, rec.user = p.body, p.user
                    rec.placements += 1
                    rec.replays += int(replayed)
                if p.cancel_after is not None and not replayed:
                    time.sleep(p.cancel_after)
                    self._cancel(http_, token, data["id"])
                return
            if status == 409:
                with self.tally.lock:
                    self.tally.in_flight_409 += 1
                time.sleep(0.1)
                continue  # the first request with this key is still running
            self.tally.odd(f"POST {path} key {p.key}: {status} {str(data)[:300]}")
            if status >= 500:
                time.sleep(0.5)
                continue
            return  # a 4xx for a valid body is a bug; do not hammer it

    def _cancel(self, http_: Http, token: str, order_id: str) -> None:
        path = f"/api/v1/orders/{order_id}/cancel/"
        for _ in range(20):
            try:
                status, _, data = http_.request("POST", path, token)
            except requests.RequestException as exc:
                with self.tally.lock:
                    self.tally.transport_errors += 1
                self.tally.odd(f"POST {path}: {type(exc).__name__}: {exc}")
                time.sleep(0.5)
                continue
            with self.tally.lock:
                self.tally.cancels[status] += 1
            if status not in (202, 409):
                self.tally.odd(f"POST {path}: {status} {str(data)[:300]}")
            if status < 500:
                return
            time.sleep(0.5)


#: The full run's clients hold placements back while the oldest order that is running and
#: never waited for a provider (nor waits for a review) is older than this share of the
#: deadline. The warm-up measures the machine once, and on a shared machine its other load
#: moves three- or four-fold within minutes: offered more than it then finishes, the stack
#: builds a backlog whose orders pass their deadline in the queue, which measures the machine,
#: not the product. Orders that waited for a provider are left out, so the outage's own
#: backlog never holds the load back: it drains beside new orders, as it would in a shop.
PACE_HOLD_SHARE = 0.25


class Pacer:
    """Holds the clients back while the stack is behind (see :data:`PACE_HOLD_SHARE`)."""

    def __init__(self, hold_after: float, tally: Tally) -> None:
        self.hold_after, self.tally = hold_after, tally
        self.clear = threading.Event()
        self.clear.set()
        self.lock = threading.Lock()
        self.total = 0.0
        self.holds = 0
        self.since: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pacer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self._set(False)

    def paused(self) -> float:
        """Seconds the clients were held back so far (the plan's clock moves on by as much)."""
        with self.lock:
            return self.total + (time.monotonic() - self.since if self.since else 0.0)

    def wait_until_clear(self, deadline: float) -> None:
        while not self.clear.wait(0.5) and time.monotonic() < deadline:
            pass

    def _set(self, hold: bool) -> None:
        with self.lock:
            if hold and self.since is None:
                self.since = time.monotonic()
                self.holds += 1
                self.clear.clear()
            elif not hold and self.since is not None:
                self.total += time.monotonic() - self.since
                self.since = None
                self.clear.set()

    def _run(self) -> None:
        from django.db import connection
        from django.db.models import Min
        from django.utils import timezone

        from sagas.models import Saga, SagaEvent

        try:
            while not self.stop.wait(1.0):
                waited = SagaEvent.objects.filter(kind="parked").values("saga_id")
                oldest = (
                    Saga.objects.filter(
                        saga_type="order", state="running", parked_on="", waiting_since=None
                    )
                    .exclude(id__in=waited)
                    .aggregate(oldest=Min("created_at"))["oldest"]
                )
                age = 0.0 if oldest is None else (timezone.now() - oldest).total_seconds()
                hold = age > self.hold_after
                if hold != (self.since is not None):
                    self.tally.log(
                        f"pacer: {'holding placements back' if hold else 'placing again'} "
                        f"(oldest running order {age:.0f}s old)"
                    )
                self._set(hold)
        finally:
            connection.close()


class Reviewer:
    """An ops user deciding fraud reviews over HTTP while the load runs, as an analyst would.

    It polls the sagas waiting for ``fraud_review`` and decides each from the seed; some large
    orders it decides early, before their saga reaches the wait (the signal is kept). Every
    decision is sent twice with the same key: the second must be a ``202`` replay.
    """

    def __init__(self, config, port: int, token: str, tally: Tally) -> None:
        self.port, self.token, self.tally = port, token, tally
        self.rng = random.Random(config.seed + 3)
        self.decided: dict[str, bool] = {}  # order id -> approved, once a decision was taken
        self.seen: set[str] = set()  # large sagas already considered for an early decision
        self.answers: Counter = Counter()
        self.early = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="reviewer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self) -> None:
        self.stop.set()
        self.thread.join(30)

    def _run(self) -> None:
        http_ = Http(self.port)
        try:
            while not self.stop.is_set():
                try:
                    for saga in self._sagas(http_, "waiting_for=fraud_review"):
                        self._decide(http_, saga, early=False)
                    for saga in self._sagas(http_, "state=running&type=order"):
                        big = Decimal(saga["data"].get("amount", "0")) > REVIEW_ABOVE
                        if big and not saga["waiting_for"] and saga["id"] not in self.seen:
                            self.seen.add(saga["id"])
                            if self.rng.random() < EARLY_RATE:
                                self._decide(http_, saga, early=True)
                except requests.RequestException as exc:
                    self.tally.odd(f"reviewer: {type(exc).__name__}: {exc}")
                self.stop.wait(0.3)
        finally:
            http_.close()

    def _sagas(self, http_: Http, query: str) -> list[dict]:
        try:
            status, _, data = http_.request(
                "GET", f"/api/v1/sagas/?page_size=100&{query}", self.token
            )
        except (OSError, requests.RequestException):
            return []
        return data.get("results", []) if status == 200 and isinstance(data, dict) else []

    def _decide(self, http_: Http, saga: dict, *, early: bool) -> None:
        order_id = saga["correlation_id"]
        if order_id in self.decided:
            return
        # Every REJECT_EVERY-th decision rejects, so even a quick run takes both paths.
        approved = len(self.decided) % REJECT_EVERY != REJECT_EVERY - 1
        path = f"/api/v1/sagas/{saga['id']}/signals/fraud_review/"
        headers = {"Idempotency-Key": f"review-{saga['id']}"}
        first = None
        for send in range(2):
            status, answer_headers, data = _retrying(
                http_, "POST", path, self.token, {"payload": {"approved": approved}}, headers
            )
            self.answers[status] += 1
            if send == 0:
                first = status
                if status == 409:
                    return  # the saga moved on meanwhile (cancelled, declined): nothing to decide
                if status != 202:
                    self.tally.odd(f"POST {path}: {status} {str(data)[:300]}")
                    return
                self.decided[order_id] = approved
                self.early += int(early)
            elif status != 202 or answer_headers.get("idempotent-replayed") != "true":
                self.tally.odd(f"POST {path} again (first {first}): {status} {answer_headers}")


# ---------------------------------------------------------------------------------------------
# Chaos: SIGKILL worker processes, stop and start the broker
# ---------------------------------------------------------------------------------------------
class Chaos:
    #: Two saga workers and one for webhook deliveries (its own queue, as in production).
    SLOTS = ("w1", "w2", "hooks")

    def __init__(self, config, stack: Stack, proxy: BrokerProxy | None, tally, progress) -> None:
        self.config, self.stack, self.proxy, self.tally = config, stack, proxy, tally
        self.progress = progress  # () -> fraction of the load done, 1.0 once it finished
        self.rng = random.Random(config.seed + 2)
        self.workers = {slot: stack.start_worker(slot) for slot in self.SLOTS}
        self.restarts: dict[str, float] = {}
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.own_pool_kills = 0
        #: Main processes this run killed on purpose; any other exit is a failure.
        self.planned_exits: set[int] = set()
        #: One line per process that exited without being killed here (see :meth:`watch`).
        self.unplanned_exits: list[str] = []
        self._reported: set[int] = set()

    def schedule(self) -> list[tuple[float, str]]:
        events = [(self.rng.uniform(0.05, 0.95), "kill") for _ in range(self.config.kills)]
        if self.config.version_switch:
            events.append((0.2, "deploy"))  # well before the provider outage (40%)
        r = self.config.broker_restarts
        events += [
            (min(0.95, max(0.05, (i + 1) / (r + 1) + self.rng.uniform(-0.1, 0.1))), "broker")
            for i in range(r)
        ]
        if self.config.outage_seconds > 0:
            events.append((self.config.outage_at, "outage"))
        return sorted(events)

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="chaos", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            events = self.schedule()
            last = 0.0
            while events or self.restarts:
                self._restart_due()
                if events:
                    frac, kind = events[0]
                    progress = self.progress()
                    finished = progress >= 1.0
                    if (not finished and progress >= frac) or (
                        finished and time.monotonic() - last > 1.5
                    ):
                        events.pop(0)
                        last = time.monotonic()
                        {
                            "kill": self._kill,
                            "broker": self._broker,
                            "outage": self._provider_outage,
                            "deploy": self._deploy,
                        }[kind]()
                time.sleep(0.05)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
            self.tally.log(f"chaos thread failed: {exc!r}")

    def watch(self) -> None:
        """Record every process of the stack that died without this run killing it.

        A worker main process, beat or web exiting on its own is the product going down, even
        if this harness starts a worker again afterwards: counted as a failure and printed
        with the exit status and the last error line of its log.
        """
        for proc in self.stack.procs:
            if proc.name == "redis" or proc.popen is None or proc.alive:
                continue
            pid = proc.pid
            if pid in self.planned_exits or pid in self._reported:
                continue
            self._reported.add(pid)
            status = proc.popen.returncode
            why = next(
                (
                    line.strip()[:300]
                    for line in reversed(proc.log_tail(20000).splitlines())
                    if "Unrecoverable" in line or "CRITICAL" in line or "critical" in line
                ),
                "no error line in its log",
            )
            line = (
                f"{proc.name} (pid {pid}) exited with status {status}: {why} (log {proc.log_path})"
            )
            self.unplanned_exits.append(line)
            self.tally.log(f"UNPLANNED EXIT: {line}")
            slot = next((s for s, w in self.workers.items() if w is proc), None)
            if slot is not None and slot not in self.restarts:
                self.restarts[slot] = time.monotonic()  # keep the run going; it already failed

    def _restart_due(self) -> None:
        self.watch()
        for slot, due in list(self.restarts.items()):
            if time.monotonic() >= due:
                del self.restarts[slot]
                self.workers[slot] = self.stack.start_worker(slot)
                self.tally.log(f"started {self.workers[slot].name} (pid {self.workers[slot].pid})")

    def _kill(self) -> None:
        # Prefer a worker that has been up a moment (it is likely busy); wait for one if needed.
        deadline = time.monotonic() + 10
        while True:
            ready = [
                s
                for s, w in self.workers.items()
                if s not in self.restarts and w.alive and time.monotonic() - w.started_at > 2
            ]
            if ready or time.monotonic() > deadline:
                break
            self._restart_due()
            time.sleep(0.1)
        if not ready:
            ready = [s for s in self.workers if s not in self.restarts] or list(self.workers)
        slot = self.rng.choice(ready)
        worker = self.workers[slot]
        children = worker.children()
        where = f"load {self.progress():.0%} done"
        if children and self.rng.random() < 0.55:
            pid = self.rng.choice(children)
            kill_pid(pid, signal.SIGKILL)
            self.tally.kills["pool child"] += 1
            self.own_pool_kills += 1
            self.tally.log(f"SIGKILL pool child {pid} of {worker.name} ({where})")
        else:
            self.planned_exits.add(worker.pid)
            worker.signal(signal.SIGKILL)
            self.tally.kills["worker main"] += 1
            self.tally.log(f"SIGKILL worker main {worker.pid} ({worker.name}; {where})")
            self.restarts[slot] = time.monotonic() + self.rng.uniform(0.5, 3.0)

    def _provider_outage(self) -> None:
        """Take the provider down for every worker; a watcher notes when its breaker opens."""
        from providers import outage

        provider, seconds = self.config.outage_provider, self.config.outage_seconds
        row = outage.start(provider, seconds)
        self.tally.outage_began, self.tally.outage_ended = row.down_since, row.down_until
        self.tally.log(
            f"provider outage: {provider} down for {seconds:g}s "
            f"(breakers {'on' if self.config.breakers else 'off'}; load {self.progress():.0%} done)"
        )
        threading.Thread(target=self._watch_breaker, name="outage", daemon=True).start()

    def _watch_breaker(self) -> None:
        from django.db import connection
        from django.utils import timezone

        from providers.models import Breaker, FakeProviderStatus

        provider = self.config.outage_provider
        try:
            while timezone.now() < self.tally.outage_ended:
                if Breaker.objects.filter(provider=provider).exclude(state="closed").exists():
                    self.tally.outage_calls_at_open = FakeProviderStatus.objects.get(
                        provider=provider
                    ).calls_while_down
                    self.tally.log(
                        f"provider outage: {provider} breaker open after "
                        f"{self.tally.outage_calls_at_open} calls to it while down"
                    )
                    break
                time.sleep(0.05)
            while timezone.now() < self.tally.outage_ended:
                time.sleep(0.2)
            self.tally.log(f"provider outage: {provider} back up")
            if not self.config.breakers or self.tally.outage_calls_at_open is None:
                return
            # Until its breaker closes, the sagas parked on it are held back by the outage.
            give_up = time.monotonic() + 600
            while time.monotonic() < give_up:
                if Breaker.objects.filter(provider=provider, state="closed").exists():
                    self.tally.breaker_closed_at = timezone.now()
                    waited = (
                        self.tally.breaker_closed_at - self.tally.outage_ended
                    ).total_seconds()
                    self.tally.log(
                        f"provider outage: {provider} breaker closed {waited:.1f}s later"
                    )
                    break
                time.sleep(0.1)
        finally:
            connection.close()

    def _deploy(self) -> None:
        """The next order saga version goes live beside the others, the way a rolling deploy
        does it: workers first (each told to shut down warm, finishing what it holds, while
        its successor, knowing the new version, starts at once; the deploy goes on once they
        answer), then beat, then the web (gunicorn's graceful reload), which from then on
        starts new orders on it."""
        Path(os.environ[order_deploy.FLAG_ENV]).touch()
        version = order_deploy.order_saga_next.version
        began = time.monotonic()
        self.tally.log(f"deploy: order v{version} (load {self.progress():.0%} done)")
        started = []
        for slot in list(self.workers):
            if slot in self.restarts:
                continue  # killed a moment ago: it comes back on the new code anyway
            old = self.workers[slot]
            self.planned_exits.add(old.pid)
            old.signal(signal.SIGTERM)
            self.workers[slot] = self.stack.start_worker(slot)
            started.append(self.workers[slot])
            self.tally.log(
                f"deploy: {old.name} shutting down warm, {self.workers[slot].name} started"
            )
        self.stack.wait_workers_ready(started)
        for proc in [p for p in self.stack.procs if p.name == "beat" and p.alive]:
            # The new beat starts at once; the old one gets its warm shutdown (a sweep sent by
            # both meanwhile is harmless: two sweeps split the work) and is killed if it hangs.
            self.planned_exits.add(proc.pid)
            proc.signal(signal.SIGTERM)
            threading.Thread(target=proc.stop, name="old-beat", daemon=True).start()
            self.stack.start_beat()
        for proc in [p for p in self.stack.procs if p.name == "web" and p.alive]:
            before = set(proc.children())
            proc.signal(signal.SIGHUP)
            # Reloaded once none of the old gunicorn workers is left and the new ones answer.
            wait_until(
                lambda p=proc, b=before: (
                    len(now := set(p.children())) > 0
                    and not now & b
                    and _healthy(self.stack.web_port)
                ),
                120,
                "gunicorn to reload its workers",
            )
        self.tally.deployed.set()
        self.tally.log(
            f"deploy: workers and beat restarted, web reloaded in {time.monotonic() - began:.1f}s;"
            f" new orders start on v{version} (load {self.progress():.0%} done)"
        )

    def _broker(self) -> None:
        outage = self.rng.uniform(2.0, 5.0) if self.config.mode == "full" else 2.5
        n = len(self.tally.broker_outages) + 1
        if self.proxy is not None:
            self.tally.log(f"broker outage {n}: cutting every broker connection for {outage:.1f}s")
            self.proxy.outage(outage)
        else:
            sig = signal.SIGKILL if n % 2 else signal.SIGTERM
            self.tally.log(f"broker restart {n}: {signal.Signals(sig).name} redis-server")
            self.stack.stop_redis(sig)
            deadline = time.monotonic() + outage
            while time.monotonic() < deadline:
                self._restart_due()
                time.sleep(0.05)
            self.stack.start_redis()
        self.tally.broker_outages.append(outage)
        self.tally.log(f"broker back after {outage:.1f}s")

    def join(self) -> None:
        while self.thread is not None and self.thread.is_alive():
            self.thread.join(0.5)
        if self.error is not None:
            raise self.error

    def ensure_all_up(self) -> None:
        self.watch()
        for slot, worker in self.workers.items():
            if not worker.alive:
                self.workers[slot] = self.stack.start_worker(slot)
                self.tally.log(f"started {self.workers[slot].name} (was down)")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
@dataclass
class Summary:
    mode: str
    seed: int
    broker: str
    orders: int = 0
    placements: int = 0
    duplicate_placements: int = 0
    replayed: int = 0
    in_flight_409: int = 0
    cancel_requests: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, int] = field(default_factory=dict)
    cancellation_reasons: dict[str, int] = field(default_factory=dict)
    reviews: dict[str, int] = field(default_factory=dict)
    kills: int = 0
    kills_by_target: dict[str, int] = field(default_factory=dict)
    injected_crashes: int = 0
    broker_restarts: int = 0
    #: Order sagas per definition version (the deployed one from halfway on).
    versions: dict[int, int] = field(default_factory=dict)
    broker_outage_seconds: list[float] = field(default_factory=list)
    unexpected_responses: list[str] = field(default_factory=list)
    webhook_deliveries: int = 0
    webhook_events: int = 0
    #: Processes (worker main, beat, web) that exited without the run killing them.
    unplanned_exits: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    load_seconds: float = 0.0
    settle_seconds: float | None = None
    total_seconds: float = 0.0
    outage: dict[str, Any] = field(default_factory=dict)
    #: Orders per second the stack finished in the warm-up (``None``: ``--rate`` was given).
    capacity: float | None = None
    rate: float = 0.0
    deadline: float = 0.0
    #: The pacer's holds: how many, seconds in all, and the age that held the load back.
    held_back: tuple[int, float, float] | None = None

    @property
    def ok(self) -> bool:
        return not self.violations and not self.unexpected_responses and not self.unplanned_exits

    def render(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.cancellation_reasons.items()))
        outcomes = ", ".join(
            f"{k} {self.outcomes.get(k, 0)}"
            + (f" ({reasons})" if k == "cancelled" and reasons else "")
            for k in ("confirmed", "cancelled", "needs_attention")
        )
        others = {k: v for k, v in self.outcomes.items() if k not in SETTLED}
        if others:
            outcomes += ", NOT SETTLED: " + ", ".join(f"{k} {v}" for k, v in others.items())
        cancels = ", ".join(f"{v}x {k}" for k, v in sorted(self.cancel_requests.items()))
        by_target = ", ".join(f"{v} {k}" for k, v in sorted(self.kills_by_target.items()))
        outages = ", ".join(f"{s:.1f}s" for s in self.broker_outage_seconds)
        versions = ", ".join(f"v{v} {n}" for v, n in sorted(self.versions.items()))
        settle = "did not settle" if self.settle_seconds is None else f"{self.settle_seconds:.1f}s"
        lines = [
            f"chaos summary ({self.mode} mode, seed {self.seed}, broker {self.broker})",
            f"  orders:           {self.orders} (one per Idempotency-Key), {self.placements} "
            f"placements: {self.duplicate_placements} duplicates, {self.replayed} answered as "
            f"replays, {self.in_flight_409} x 409 in flight",
            f"  offered load:     {self.rate:g} orders/s"
            + (
                ""
                if self.capacity is None
                else f" ({LOAD_SHARE:g} x {self.capacity:.1f} orders/s finished in the warm-up)"
            )
            + f"; SAGA_DEADLINE {self.deadline:g}s"
            + (
                ""
                if self.held_back is None
                else f"; placements held back {self.held_back[0]} times, "
                f"{self.held_back[1]:.0f}s in all (an order running over "
                f"{self.held_back[2]:g}s)"
            ),
            f"  cancel requests:  {cancels or 'none'}",
            f"  outcomes:         {outcomes}",
            "  fraud reviews:    "
            + (", ".join(f"{k} {v}" for k, v in self.reviews.items()) or "none"),
            f"  kills:            {self.kills} SIGKILL ({by_target or 'none'}); plus about "
            f"{self.injected_crashes} injected crashes (SAGA_FAULTS crash)",
            f"  broker restarts:  {self.broker_restarts} (down {outages or '-'})",
            *self._outage_lines(),
            f"  order versions:   {versions or '-'}",
            f"  unexpected HTTP:  {len(self.unexpected_responses)}",
            f"  webhooks:         {self.webhook_deliveries} signed deliveries of "
            f"{self.webhook_events} events",
            f"  unplanned exits:  {len(self.unplanned_exits)}",
            f"  time to settle:   {settle} after the last placement (load {self.load_seconds:.1f}s,"
            f" whole run {self.total_seconds:.1f}s)",
            f"  violations:       {len(self.violations)}",
        ]
        for v in self.violations[:50]:
            lines.append(f"    {v}")
        if len(self.violations) > 50:
            lines.append(f"    ... and {len(self.violations) - 50} more")
        for u in self.unexpected_responses[:20]:
            lines.append(f"    unexpected: {u}")
        for e in self.unplanned_exits:
            lines.append(f"    unplanned exit: {e}")
        lines.append("chaos: PASS" if self.ok else "chaos: FAIL")
        return "\n".join(lines)

    def _outage_lines(self) -> list[str]:
        o = self.outage
        if not o:
            return ["  provider outage:  none"]
        settled = o.get("backlog_settled_seconds")
        return [
            f"  provider outage:  {o['provider']} down {o['seconds']:g}s, breakers "
            f"{'on' if o['breakers'] else 'off'}: {o['calls_while_down']} calls made to it while "
            f"down ({'-' if o.get('calls_at_open') is None else o['calls_at_open']} before its "
            "breaker opened); "
            f"{o['waiting_orders']} orders were waiting for it",
            f"                    orders cancelled because of the outage: {o['cancelled']} "
            f"(step_failed {o['step_failed']}, timed_out {o['timed_out']}; after it, "
            f"{o.get('step_failed_on_other_faults', 0)} failed on other injected faults); "
            "backlog settled "
            + ("never" if settled is None else f"{settled:.1f}s")
            + f" after recovery; peak {o['peak_in_flight']} calls in flight at the provider",
            f"                    timed out in the general backlog: {o['timed_out_in_backlog']} "
            f"of the orders that waited for it (deadline passed after its breaker closed); "
            f"sent to a person (an undo failed on the outage): {o.get('needs_attention', 0)}; "
            f"timed_out of all orders: {o['timed_out_all_orders']}; "
            f"{o['parks']} parks (a saga told to wait)",
            f"                    backlog ({o['backlog_orders']} orders started before recovery "
            f"and still going then): half settled {_secs(o.get('backlog_settled_p50'))}, "
            f"nine in ten {_secs(o.get('backlog_settled_p90'))} after recovery; the last: "
            f"{o.get('backlog_last') or '-'}",
        ]


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def run(config: ChaosConfig, out=sys.stdout) -> Summary:
    """The inner run: everything happens here, and everything started here is stopped here."""
    from django.db import connections

    started = time.monotonic()
    env = dict(os.environ)
    database = env["SAGARUNNER_CHAOS_DB"]
    run_dir = Path(env["SAGARUNNER_CHAOS_DIR"])
    server = PgServer.from_url(env["DATABASE_URL"])
    broker_label = env.get("SAGARUNNER_CHAOS_BROKER_TARGET") or "own redis-server"
    summary = Summary(mode=config.mode, seed=config.seed, broker=_redact(broker_label))
    stack = Stack(env=env, log_dir=run_dir, queue=env["CELERY_QUEUE"])
    proxy: BrokerProxy | None = None
    tally = Tally()
    failed = True
    try:
        for name in server.drop_stale(DB_PREFIX):
            tally.log(f"dropped {name}, left behind by a run that was killed")
        tally.log(f"database {database}; logs in {run_dir}")
        server.create_database(database)
        Path(env[order_deploy.FLAG_ENV]).unlink(missing_ok=True)  # a pid's earlier run left it
        _migrate()
        tokens = _seed(config)
        reviewer_token = _seed_reviewer()

        if "SAGARUNNER_CHAOS_PROXY" in env:
            port, host, target_port = env["SAGARUNNER_CHAOS_PROXY"].split()
            proxy = BrokerProxy(host, int(target_port), port=int(port))
        else:
            stack.start_redis(int(env["SAGARUNNER_CHAOS_REDIS_PORT"]))
        chaos = Chaos(config, stack, proxy, tally, progress=lambda: 0.0)
        stack.start_beat()
        web = stack.start_web()
        stack.wait_workers_ready(chaos.workers.values())
        wait_until(lambda: _healthy(stack.web_port), 60, "GET /healthz to answer 200")
        tally.log(
            f"stack up: web {stack.base_url} (pid {web.pid}), workers "
            + ", ".join(f"{w.name} pid {w.pid}" for w in chaos.workers.values())
            + f", beat, broker {_redact(env['CELERY_BROKER_URL'])}"
        )
        summary.deadline = float(env["SAGA_DEADLINE"])
        if config.rate is None:
            summary.capacity = _warm_up(config, stack.web_port, _seed_warmup_user(), tally)
            config.rate = round(min(MAX_RATE, max(0.5, LOAD_SHARE * summary.capacity)), 1)
        summary.rate = config.rate
        tally.log(
            f"placing {config.orders} orders at {config.rate:g}/s from {config.clients} clients"
            + ("" if summary.capacity is None else f" ({LOAD_SHARE:g} of the measured capacity)")
            + f"; SAGA_DEADLINE {summary.deadline:g}s"
        )

        hooks = chaos_webhooks.start()
        registrar = Http(stack.web_port)
        chaos_webhooks.register(hooks, lambda *a: _retrying(registrar, *a), tokens)
        registrar.close()
        tally.log(f"webhooks: an endpoint per client on {hooks.url(0).rsplit('/', 1)[0]}/")

        plan = make_plan(config)
        reviewer = Reviewer(config, stack.web_port, reviewer_token, tally)
        reviewer.start()
        tally.load_started = time.monotonic()
        load_budget = max(60.0, 4 * len(plan) / config.rate)
        if config.version_switch:
            load_budget += DEPLOY_GATE_TIMEOUT  # the later placements may wait for the deploy
        pacer = None
        if summary.capacity is not None:  # the rate follows the machine: so does the load
            pacer = Pacer(PACE_HOLD_SHARE * summary.deadline, tally)
            load_budget += config.settle_timeout  # the holds stretch the load
        clients = Clients(
            config, stack.web_port, tokens, plan, tally, time.monotonic() + load_budget
        )
        clients.pacer = pacer
        if pacer is not None:
            pacer.start()
        chaos.progress = lambda: 1.0 if tally.load_finished else tally.done / max(1, len(plan))
        chaos.start()
        threads = clients.run()
        for t in threads:
            while t.is_alive():
                t.join(0.5)
        tally.load_finished = time.monotonic() - tally.load_started
        if pacer is not None:
            pacer.join()
            summary.held_back = (pacer.holds, pacer.total, pacer.hold_after)
        tally.log(f"load done: {tally.done} placements in {tally.load_finished:.1f}s")
        chaos.join()
        chaos.ensure_all_up()

        settle_seconds = _settle(config, tally)
        reviewer.join()
        summary.settle_seconds = settle_seconds
        summary.reviews = {
            "approved": sum(reviewer.decided.values()),
            "rejected": sum(not a for a in reviewer.decided.values()),
            "sent early": reviewer.early,
            **{f"answered {k}": v for k, v in sorted(reviewer.answers.items())},
        }
        summary.violations += _check_reviews(tally, reviewer)
        summary.load_seconds = tally.load_finished
        summary.violations += _check_invariants(tally)
        summary.violations += _check_api(config, stack.web_port, tokens, tally, summary)
        summary.violations += _check_outage(config, tally, summary)
        summary.violations += _check_webhooks(hooks, tally, summary)
        summary.orders = len(tally.records)
        summary.versions = _order_versions()
        deployed = order_deploy.order_saga_next.version
        if config.version_switch and not summary.versions.get(deployed):
            summary.violations.append(f"the deploy halfway started no order saga on v{deployed}")
        summary.placements = sum(r.placements for r in tally.records.values())
        summary.duplicate_placements = sum(1 for p in plan if p.duplicate)
        summary.replayed = sum(r.replays for r in tally.records.values())
        summary.in_flight_409 = tally.in_flight_409
        summary.cancel_requests = {
            ("accepted (202)" if k == 202 else "refused (409)" if k == 409 else str(k)): v
            for k, v in tally.cancels.items()
        }
        summary.kills = sum(tally.kills.values())
        summary.kills_by_target = dict(tally.kills)
        summary.injected_crashes = max(0, _pool_deaths(run_dir) - chaos.own_pool_kills)
        summary.broker_restarts = len(tally.broker_outages)
        summary.broker_outage_seconds = list(tally.broker_outages)
        summary.unexpected_responses = list(tally.unexpected)
        chaos.watch()
        summary.unplanned_exits = list(chaos.unplanned_exits)
        failed = not summary.ok
    except KeyboardInterrupt:
        summary.violations.append("interrupted")
        print("chaos: interrupted; stopping everything", file=out, flush=True)
        raise
    finally:
        summary.total_seconds = time.monotonic() - started
        stack.close()
        if proxy is not None:
            proxy.close()
            _delete_broker_queue(env.get("SAGARUNNER_CHAOS_BROKER_TARGET"), env["CELERY_QUEUE"])
        connections.close_all()
        if config.keep:
            print(f"chaos: kept database {database} and logs in {run_dir}", file=out)
        else:
            with contextlib.suppress(Exception):
                server.drop_database(database)
            if failed:
                print(f"chaos: logs kept in {run_dir}", file=out)
            else:
                shutil.rmtree(run_dir, ignore_errors=True)
    print(summary.render(), file=out, flush=True)
    if config.json_path:
        Path(config.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(config.json_path).write_text(json.dumps(asdict(summary), indent=2))
    return summary


def _order_versions() -> dict[int, int]:
    """Order sagas per definition version they ran on."""
    from django.db.models import Count

    from sagas.models import Saga

    rows = (
        Saga.objects.filter(saga_type="order")
        .values_list("definition_version")
        .annotate(n=Count("*"))
        .order_by()
    )
    return dict(rows)


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]+@", r"//\1:***@", url)


def _migrate() -> None:
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def _seed(config: ChaosConfig) -> list[str]:
    """The catalog and one API token per client user."""
    from decimal import Decimal

    from django.core.management import call_command

    from inventory.models import Product

    scarce = max(5, config.orders // 40)
    for sku, name, price, stock in CATALOG:
        Product.objects.create(
            sku=sku,
            name=name,
            price=Decimal(price),
            currency="EUR",
            stock_on_hand=scarce if stock == "scarce" else 1_000_000,
        )
    tokens = []
    for i in range(config.users):
        buf = StringIO()
        call_command("issue_token", f"chaos-client-{i}", stdout=buf)
        tokens.append(buf.getvalue().strip())
    return tokens


def _seed_warmup_user() -> str:
    """The warm-up's own client: its orders stay out of the per-client checks."""
    from django.core.management import call_command

    buf = StringIO()
    call_command("issue_token", "chaos-warmup", stdout=buf)
    return buf.getvalue().strip()


def _warm_up(config: ChaosConfig, port: int, token: str, tally: Tally) -> float:
    """Orders per second the faulted stack finishes now, before the load and the chaos.

    ``WARMUP_ORDERS`` plain orders are placed at once by the client threads, and the rate is
    taken when ``WARMUP_SHARE`` of them have settled (the stragglers wait out an injected
    crash's lease). The number is the machine's as it is during the run, other work on it
    included, which a fixed rate cannot know: on a busy 2-core machine it is a few orders
    per second, on a quiet one many more.
    """
    from orders.models import Order
    from sagas.models import ACTIVE_STATES

    def body(i: int) -> dict:
        return {
            "items": [{"sku": "chaos-mug", "quantity": 1}],
            "payment_method": "pm_card_visa",
            "shipping_address": {
                "name": f"Warm-up {i}",
                "line1": f"{i} Baseline Road",
                "city": "Faultham",
                "postal_code": "WU001",
                "country": "GB",
            },
        }

    work: queue.Queue[int] = queue.Queue()
    for i in range(WARMUP_ORDERS):
        work.put(i)

    def client() -> None:
        http_ = Http(port)
        try:
            while True:
                try:
                    i = work.get_nowait()
                except queue.Empty:
                    return
                key = f"chaos-warmup-{config.seed}-{i}"
                status, _, data = _retrying(
                    http_, "POST", "/api/v1/orders/", token, body(i), {"Idempotency-Key": key}
                )
                if status != 201:
                    tally.odd(f"warm-up POST key {key}: {status} {str(data)[:300]}")
        finally:
            http_.close()

    active = [str(s) for s in ACTIVE_STATES]
    target = math.ceil(WARMUP_SHARE * WARMUP_ORDERS)
    began = time.monotonic()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(config.clients)]
    for t in threads:
        t.start()
    settled = 0
    while time.monotonic() - began < 300:
        settled = (
            Order.objects.filter(owner__username="chaos-warmup")
            .exclude(saga__state__in=active)
            .count()
        )
        if settled >= target:
            break
        time.sleep(0.1)
    took = time.monotonic() - began
    for t in threads:
        t.join(30)
    capacity = settled / took
    tally.log(
        f"warm-up: {settled} of {WARMUP_ORDERS} orders settled in {took:.1f}s: "
        f"{capacity:.1f} orders/s"
    )
    return capacity


def _seed_reviewer() -> str:
    """An ops staff user (the fraud analyst: ``--staff`` puts it in the ops group), its token."""
    from django.core.management import call_command

    buf = StringIO()
    call_command("issue_token", "chaos-reviewer", "--staff", stdout=buf)
    return buf.getvalue().strip()


def _check_reviews(tally: Tally, reviewer: Reviewer) -> list[str]:
    """A rejected order is never confirmed; one that got to its review is ``fraud_rejected``."""
    from orders.models import Order
    from sagas.models import SagaEvent

    violations: list[str] = []
    for order_id, approved in sorted(reviewer.decided.items()):
        if approved:
            continue
        order = Order.objects.select_related("saga").get(pk=order_id)
        reviewed = SagaEvent.objects.filter(
            saga_id=order.saga_id, kind="step_failed", step="fraud_review"
        ).exists()
        where = f"order {order_id} ({order.status}, {order.cancellation_reason})"
        if order.status == "confirmed":
            violations.append(f"[business] {where}: confirmed after a rejected fraud review")
        elif reviewed and order.cancellation_reason != "fraud_rejected":
            violations.append(f"[business] {where}: rejected at its review, not fraud_rejected")
    tally.log(f"fraud reviews: {len(reviewer.decided)} decided, answers {dict(reviewer.answers)}")
    return violations


def _healthy(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def _settle(config: ChaosConfig, tally: Tally) -> float | None:
    """Wait for every order's saga to leave running/compensating; seconds it took, or None."""
    from django.db.models import Count

    from orders.models import Order
    from sagas.models import ACTIVE_STATES

    active = [str(s) for s in ACTIVE_STATES]
    begin = time.monotonic()
    last_print = 0.0
    while True:
        counts = dict(
            Order.objects.filter(saga__state__in=active)
            .values_list("saga__state")
            .annotate(n=Count("id"))
            .order_by()
        )
        in_flight = sum(counts.values())
        if not in_flight:
            waited = time.monotonic() - begin
            tally.log(f"every order settled, {waited:.1f}s after the last placement")
            return waited
        if time.monotonic() - last_print > 10:
            last_print = time.monotonic()
            tally.log(f"settling: {in_flight} orders in flight {counts}")
        if time.monotonic() - begin > config.settle_timeout:
            tally.log(f"{in_flight} orders did not settle within {config.settle_timeout:.0f}s")
            _describe_stuck(tally, active)
            return None
        time.sleep(0.5)


def _describe_stuck(tally: Tally, active: list[str]) -> None:
    from sagas.models import Saga

    for row in Saga.objects.filter(saga_type="order", state__in=active).values(
        "id", "state", "current_step", "attempt", "version", "next_attempt_at", "lease_until",
        "last_error",
    )[:10]:  # fmt: skip
        tally.log(f"  stuck: {row}")


def _check_outage(config: ChaosConfig, tally: Tally, summary: Summary) -> list[str]:
    """Guarantee 6: the outage delayed orders, never cancelled them; the provider got canaries.

    An order is cancelled *because of the outage* if it met the outage (an outage error in its
    timeline, or a park) and its saga compensated for ``timed_out``, or for ``step_failed``
    with the outage's error on the attempt that used up the step's last try (one that failed
    afterwards on the run's other injected faults is counted apart). Guarantee 6 allows a
    passed deadline; a ``step_failed`` is a violation.
    With the breakers off the numbers are reported, not judged: that run is the comparison.
    """
    from django.db.models import Max, Q
    from django.db.models.functions import Coalesce

    from providers.models import FakeProviderStatus
    from sagas.metrics import render_metrics
    from sagas.models import Saga, SagaEvent

    if tally.outage_began is None:
        return []
    provider = config.outage_provider
    began, ended = tally.outage_began, tally.outage_ended
    status = FakeProviderStatus.objects.get(provider=provider)
    met = SagaEvent.objects.filter(
        Q(detail__contains=f"provider {provider} is down (outage)")
        | Q(kind="parked", detail__startswith=f"provider {provider}:")
    ).values("saga_id")
    hit = Saga.objects.filter(saga_type="order", id__in=met)
    # Cancelled *because of* the outage: the attempt that used up the step's last try failed
    # on the outage itself. An order that waited out the outage and then spent its attempts on
    # the run's other injected faults is counted apart (faults_after), not against the breaker.
    failed = hit.filter(state="compensated", failure_code="step_failed")
    step_failed = (
        SagaEvent.objects.filter(
            saga_id__in=failed.values("id"),
            kind="step_failed",
            detail__contains=f"provider {provider} is down (outage)",
        )
        .values("saga_id")
        .distinct()
        .count()
    )
    faults_after = failed.count() - step_failed
    # Not cancelled, but left for a person: an undo (a void) that spent its attempts on the
    # outage and escalated. The customer's order is stuck all the same: reported beside them.
    escalated = (
        SagaEvent.objects.filter(
            saga_id__in=hit.filter(state="needs_manual").values("id"),
            kind="needs_manual",
            detail__contains=f"provider {provider} is down (outage)",
        )
        .values("saga_id")
        .distinct()
        .count()
    )
    # A passed deadline is the outage's when it passed while the provider held the order back:
    # down, or its breaker not yet closed again (and the release spread after that). One that
    # passed later, in the queue behind the general backlog, is the stack's capacity, not the
    # outage: both are reported, apart.
    released = tally.breaker_closed_at or ended
    if tally.breaker_closed_at is not None:
        from providers.config import provider_config

        released += timedelta(seconds=provider_config(provider).release_spread)
    late = hit.filter(state="compensated", failure_code="timed_out")
    timed_out = late.filter(deadline_at__lte=released).count()
    timed_out_after = late.count() - timed_out
    timed_out_all = Saga.objects.filter(
        saga_type="order", state="compensated", failure_code="timed_out"
    ).count()
    # The backlog: orders started before the provider came back and still going then. A saga
    # that needs a person has no finished_at: its last update is when it stopped.
    settled_at = Coalesce("finished_at", "updated_at")
    backlog = (
        Saga.objects.filter(saga_type="order", created_at__lt=ended)
        .annotate(settled_at=settled_at)
        .filter(settled_at__gt=ended)
    )
    last = backlog.aggregate(last=Max("settled_at"))["last"]
    unsettled = backlog.filter(state__in=["running", "compensating"]).exists()
    # How the backlog drained: when half and nine in ten of it had settled, and what the last
    # one was (a long tail of one undo retrying is not a slow release).
    drained = sorted(
        (at - ended).total_seconds() for at in backlog.values_list("settled_at", flat=True)
    )
    tail = (
        backlog.order_by("-settled_at")
        .values_list("state", "failure_code", "current_step", "created_at")
        .first()
    )
    summary.outage = {
        "provider": provider,
        "seconds": config.outage_seconds,
        "breakers": config.breakers,
        "calls_while_down": status.calls_while_down,
        "calls_at_open": tally.outage_calls_at_open,
        "waiting_orders": hit.count(),
        "cancelled": step_failed + timed_out,
        "step_failed": step_failed,
        "step_failed_on_other_faults": faults_after,
        "timed_out": timed_out,
        "needs_attention": escalated,
        "timed_out_in_backlog": timed_out_after,
        "timed_out_all_orders": timed_out_all,
        "held_back_until": released.isoformat(),
        "parks": 0,
        "backlog_orders": backlog.count(),
        "backlog_settled_p50": drained[len(drained) // 2] if drained else None,
        "backlog_settled_p90": drained[int(len(drained) * 0.9)] if drained else None,
        "backlog_last": None
        if tail is None
        else f"{tail[0]} {tail[1] or '-'} at {tail[2]}, started "
        f"{(tail[3] - began).total_seconds():.0f}s after the outage began",
        "backlog_settled_seconds": None
        if unsettled or last is None
        else max(0.0, (last - ended).total_seconds()),
        "peak_in_flight": status.peak_in_flight,
        "down_from": began.isoformat(),
    }
    body = render_metrics()[0].decode()
    canaries = _metric_sum(body, "provider_canaries_total", provider)
    rounds = _metric_sum(body, "provider_breaker_transitions_total", provider, to="half_open")
    summary.outage["canaries"], summary.outage["probe_rounds"] = int(canaries), int(rounds)
    # Every time a saga came to the provider and was told to wait (each a task run).
    summary.outage["parks"] = int(_metric_sum(body, "provider_parked_total", provider))
    tally.log(f"provider outage: {summary.outage}")  # with the counts the summary prints
    if not config.breakers:
        return []
    violations = []
    if step_failed:
        violations.append(
            f"guarantee 6: {step_failed} orders cancelled (step_failed) by the {provider} outage"
        )
    if tally.outage_calls_at_open is None:
        # Too few calls reached it to judge (a backlog elsewhere, a short outage): nothing
        # was held back, and nothing had to be.
        tally.log(f"provider outage: {provider} breaker did not open (too few calls to judge)")
    else:
        from providers.config import provider_config

        limit = provider_config(provider).max_in_flight
        after_open = status.calls_while_down - tally.outage_calls_at_open
        # After opening: canaries, plus at most the calls already under way as it opened.
        if after_open > canaries + limit:
            violations.append(
                f"guarantee 6: {after_open} calls to {provider} after its breaker opened, more "
                f"than its {int(canaries)} canaries plus {limit} in flight"
            )
    return violations


def _metric_sum(body: str, name: str, provider: str, **labels: str) -> float:
    total = 0.0
    wanted = {"provider": provider, **labels}
    for line in body.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in wanted.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _check_invariants(tally: Tally) -> list[str]:
    """``check_invariants --require-settled``, as an operator would run it."""
    from django.core.management import call_command
    from django.core.management.base import CommandError

    buf = StringIO()
    try:
        call_command("check_invariants", require_settled=True, stdout=buf)
    except CommandError as exc:
        tally.log(f"check_invariants: {exc}")
    output = buf.getvalue().strip().splitlines()
    for line in output[-1:]:
        tally.log(line)
    return [f"check_invariants: {line}" for line in output if line.startswith("[")]


def _check_api(config, port: int, tokens: list[str], tally: Tally, summary: Summary) -> list[str]:
    """Guarantee 5 and the outcomes, as a client sees them through the API."""
    violations: list[str] = []
    records = dict(tally.records)
    http_ = Http(port)
    try:
        # -- 5. one order per key: every answer for a key named one order, and a replay now
        #       still names it
        keys_of_user: Counter = Counter()
        for key, rec in sorted(records.items()):
            keys_of_user[rec.user] += 1
            if len(rec.ids) != 1:
                violations.append(
                    f"[idempotency] key {key}: answers named orders {sorted(rec.ids)}"
                )
                continue
            (order_id,) = rec.ids
            status, headers, data = _retrying(
                http_,
                "POST",
                "/api/v1/orders/",
                tokens[rec.user],
                rec.body,
                {"Idempotency-Key": key},
            )
            if status != 201 or headers.get("idempotent-replayed") != "true":
                violations.append(f"[idempotency] key {key}: replay answered {status} {headers}")
            elif data.get("id") != order_id:
                violations.append(
                    f"[idempotency] key {key}: replay named order {data.get('id')}, "
                    f"the first answers {order_id}"
                )
        for user, token in enumerate(tokens):
            status, _, data = _retrying(http_, "GET", "/api/v1/orders/?page_size=1", token)
            listed = data.get("count") if status == 200 and isinstance(data, dict) else None
            if listed != keys_of_user[user]:
                violations.append(
                    f"[idempotency] user chaos-client-{user}: the API lists {listed} orders for "
                    f"{keys_of_user[user]} idempotency keys"
                )
        # -- outcomes: every order settled, and no business rule broken by the faults
        outcomes: Counter = Counter()
        reasons: Counter = Counter()
        for _key, rec in sorted(records.items()):
            if len(rec.ids) != 1:
                continue
            (order_id,) = rec.ids
            status, _, data = _retrying(
                http_, "GET", f"/api/v1/orders/{order_id}/", tokens[rec.user]
            )
            if status != 200:
                violations.append(f"[api] GET order {order_id}: {status} {str(data)[:200]}")
                continue
            outcome = data.get("status")
            outcomes[outcome] += 1
            where = f"order {order_id} ({outcome})"
            if outcome not in SETTLED:
                violations.append(f"[settled] {where}: not settled (step {data.get('step')})")
            if outcome == "cancelled":
                reason = data.get("cancellation_reason")
                reasons[reason] += 1
                if reason not in CANCELLATION_REASONS:
                    violations.append(f"[api] {where}: cancellation_reason {reason!r}")
            if outcome == "confirmed":
                pm = rec.body["payment_method"]
                country = rec.body["shipping_address"]["country"]
                if pm in NEVER_CONFIRMED:
                    violations.append(f"[business] {where}: confirmed with {pm}")
                if country == "AQ":
                    violations.append(f"[business] {where}: confirmed, shipping to AQ")
                payment = data.get("payment") or {}
                if payment.get("captured") != data.get("total"):
                    violations.append(
                        f"[money] {where}: API shows captured {payment.get('captured')} of "
                        f"total {data.get('total')}"
                    )
        summary.outcomes = dict(outcomes)
        summary.cancellation_reasons = dict(reasons)
        tally.log(
            f"API: {len(records)} keys replayed, {sum(outcomes.values())} orders read: "
            + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
        )
    finally:
        http_.close()
    return violations


def _check_webhooks(hooks, tally: Tally, summary: Summary) -> list[str]:
    """Guarantee 7: every committed event (every settled order's final one among them)
    reached its client, signed, in order, and no event that was not committed arrived."""
    from orders.models import Order
    from orders.selectors import order_state
    from webhooks.models import Event

    owners = {f"chaos-client-{i}": i for i in range(len(hooks.secrets))}
    finals = {}
    for order in Order.objects.select_related("saga", "owner"):
        status = order_state(order.saga).status
        if status in SETTLED and order.owner.username in owners:
            finals[str(order.id)] = (owners[order.owner.username], status)
    # Every event the outbox holds for a chaos client (each subscribed to every type).
    committed = {
        str(event_id): owners[username]
        for event_id, username in Event.objects.filter(owner__username__in=owners).values_list(
            "id", "owner__username"
        )
    }
    violations = chaos_webhooks.check(hooks, finals, wait=120.0, committed=committed)
    received, distinct = chaos_webhooks.stats(hooks)
    summary.webhook_deliveries = received
    summary.webhook_events = distinct
    tally.log(
        f"webhooks: {received} deliveries of {distinct} events ({len(committed)} committed); "
        f"final events of {len(finals)} settled orders checked, {len(violations)} problems"
    )
    hooks.close()
    return violations


def _retrying(http_: Http, method, path, token, body=None, headers=None, attempts=5):
    for attempt in range(attempts):
        try:
            return http_.request(method, path, token, body, headers)
        except requests.RequestException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)
    raise AssertionError("unreachable")


_POOL_DEATH = re.compile(r"exited with 'signal 9 \(SIGKILL\)'")


def _pool_deaths(run_dir: Path) -> int:
    """Pool processes that died of SIGKILL, as the workers logged them (ours and injected)."""
    n = 0
    for log in run_dir.glob("worker-*.log"):
        with contextlib.suppress(OSError):
            n += len(_POOL_DEATH.findall(log.read_text(errors="replace")))
    return n


def _delete_broker_queue(broker_url: str | None, queue_name: str) -> None:
    """The run's queue on a shared broker goes away with the run."""
    if not broker_url:
        return
    from kombu import Connection

    with contextlib.suppress(Exception), Connection(broker_url, connect_timeout=5) as conn:
        channel = conn.default_channel
        channel.queue_delete(queue_name)
        with contextlib.suppress(Exception):
            channel.exchange_delete(queue_name)
