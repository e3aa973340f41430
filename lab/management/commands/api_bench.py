"""``python manage.py api_bench``: the REST API under load, against gunicorn.

What it does, all on the loopback interface and within bounded counts and time:

1. Creates a scratch database next to the configured one (``<name>_api_bench_<pid>``),
   migrates it, and seeds a catalog and one user (with a token) per client.
2. Starts gunicorn (sync workers) on a free port against that database, with the broker set to
   ``memory://`` so the sagas' doorbells go nowhere: this measures the API, not the saga engine
   (``saga_bench`` does that), and no worker of a running ``make run`` picks anything up.
   gunicorn serves :mod:`lab.bench_wsgi`, which adds an ``X-DB-Queries`` header with the
   number of SQL statements each request ran.
3. Drives ``POST /api/v1/orders/`` (each with its own ``Idempotency-Key``, 1 to 3 items) and
   then ``GET /api/v1/orders/{id}/`` over the orders created, from ``--clients`` threads with
   keep-alive connections, and prints requests/s, p50/p99 latency and SQL queries per request
   (min/mean/max) for each, plus ``GET /api/v1/orders/`` (a page of 20).
4. Stops gunicorn and drops the scratch database (``--keep-db`` keeps it).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import requests
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from lab.stack import spare_port
from lab.supervisor import Process

CATALOG = [(f"BENCH-{i:02d}", f"Bench item {i}", f"{5 + i}.50") for i in range(20)]
ADDRESS = {
    "name": "Bench Client",
    "line1": "1 Loopback Lane",
    "city": "Localhost",
    "postal_code": "127001",
    "country": "GB",
}


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    queries: list[int] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    def record(self, status: int, latency: float, queries: int | None) -> None:
        self.latencies.append(latency)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if queries is not None:
            self.queries.append(queries)

    def summary(self) -> dict:
        lat = sorted(self.latencies)
        n = len(lat)

        def pct(p: float) -> float:
            return lat[min(n - 1, int(round(p * (n - 1))))] * 1000 if n else 0.0

        return {
            "phase": self.name,
            "requests": n,
            "seconds": round(self.seconds, 2),
            "rps": round(n / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(pct(0.50), 2),
            "p99_ms": round(pct(0.99), 2),
            "queries_min": min(self.queries) if self.queries else None,
            "queries_mean": round(statistics.fmean(self.queries), 2) if self.queries else None,
            "queries_max": max(self.queries) if self.queries else None,
            "statuses": dict(sorted(self.statuses.items())),
        }


class Command(BaseCommand):
    help = "Load-test POST /orders/ and GET /orders/{id}/ on gunicorn (loopback, scratch DB)."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
        parser.add_argument("--workers", type=int, default=4, help="gunicorn worker processes")
        parser.add_argument("--requests", type=int, default=2000, help="requests per phase")
        parser.add_argument("--max-seconds", type=float, default=60.0, help="cap per phase")
        parser.add_argument("--warmup", type=int, default=100, help="unmeasured requests first")
        parser.add_argument("--keep-db", action="store_true", help="keep the scratch database")
        parser.add_argument("--json", type=Path, default=None, help="also write results here")

    # -----------------------------------------------------------------------------------------
    def handle(self, *args, **opts) -> None:
        if opts["clients"] < 1 or opts["workers"] < 1 or opts["requests"] < 1:
            raise CommandError("--clients, --workers and --requests must be at least 1")
        db = settings.DATABASES["default"]
        if db["ENGINE"] != "django.db.backends.postgresql":
            raise CommandError("api_bench needs PostgreSQL (DATABASE_URL=postgres://...).")
        scratch = f"{db['NAME']}_api_bench_{os.getpid()}"[:63]
        self.stdout.write(f"api_bench: scratch database {scratch}")
        self._create_database(scratch)
        server = None
        try:
            tokens = self._prepare(scratch, opts["clients"])
            port = spare_port()
            server = self._start_gunicorn(scratch, port, opts["workers"])
            results = self._run(port, tokens, opts)
        finally:
            if server is not None:
                server.stop(timeout=15)
            connections["default"].close()
            if not opts["keep_db"]:
                self._drop_database(scratch)
        self._report(results, opts)

    # -- the scratch database ------------------------------------------------------------------
    def _admin_connection(self):
        import psycopg

        db = settings.DATABASES["default"]
        return psycopg.connect(
            dbname="postgres",
            user=db.get("USER") or None,
            password=db.get("PASSWORD") or None,
            host=db.get("HOST") or None,
            port=db.get("PORT") or None,
            autocommit=True,
            connect_timeout=5,
        )

    def _create_database(self, name: str) -> None:
        with self._admin_connection() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')

    def _drop_database(self, name: str) -> None:
        with self._admin_connection() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def _prepare(self, scratch: str, clients: int) -> list[str]:
        """Migrate the scratch database and seed it, from this process (switched over to it)."""
        connections["default"].close()
        settings.DATABASES["default"]["NAME"] = scratch
        connections["default"].settings_dict["NAME"] = scratch
        call_command("migrate", verbosity=0, interactive=False)

        from django.contrib.auth import get_user_model
        from knox.models import AuthToken

        from inventory.models import Product

        Product.objects.bulk_create(
            Product(sku=sku, name=name, price=price, stock_on_hand=1_000_000)
            for sku, name, price in CATALOG
        )
        tokens = []
        for i in range(clients):
            user = get_user_model().objects.create_user(f"bench-client-{i}")
            tokens.append(AuthToken.objects.create(user=user)[1])
        connections["default"].close()
        return tokens

    # -- gunicorn ------------------------------------------------------------------------------
    def _database_url(self, name: str) -> str:
        db = settings.DATABASES["default"]
        user = quote(db.get("USER") or "", safe="")
        password = quote(db.get("PASSWORD") or "", safe="")
        auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
        host = db.get("HOST") or "127.0.0.1"
        port = f":{db['PORT']}" if db.get("PORT") else ""
        return f"postgres://{auth}{host}{port}/{quote(name, safe='')}"

    def _start_gunicorn(self, scratch: str, port: int, workers: int) -> Process:
        metrics_dir = tempfile.mkdtemp(prefix="api-bench-metrics-")
        env = {
            **os.environ,
            "DATABASE_URL": self._database_url(scratch),
            "CELERY_BROKER_URL": "memory://",
            "DEBUG": "0",
            "HTTPS_ONLY": "0",  # plain http on loopback
            # A load generator, not a client to protect against: no rate limits.
            "API_RATE_LIMIT": "",
            "API_RATE_LIMIT_ORDERS": "",
            "API_RATE_LIMIT_ANON": "",
            "SECRET_KEY": uuid.uuid4().hex + uuid.uuid4().hex,
            "ALLOWED_HOSTS": "127.0.0.1",
            "LOG_LEVEL": "WARNING",
            "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("TEST_DATABASE_NAME", None)
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "lab.bench_wsgi:application",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            str(workers),
            "--worker-class",
            "sync",
            "--log-level",
            "warning",
            "--timeout",
            "60",
        ]
        self.stdout.write(f"api_bench: gunicorn with {workers} sync workers on 127.0.0.1:{port}")
        log_path = Path(metrics_dir) / "gunicorn.log"
        proc = Process("gunicorn", command, env=env, log_path=log_path).start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not proc.alive:
                raise CommandError(
                    f"gunicorn exited with {proc.returncode} at start:\n{proc.log_tail()}"
                )
            try:
                if requests.get(f"{_base(port)}/api/schema/?format=json", timeout=2).ok:
                    return proc
            except requests.RequestException:
                pass
            time.sleep(0.2)
        proc.stop(timeout=15)
        raise CommandError(f"gunicorn did not answer within 30 s:\n{proc.log_tail()}")

    # -- load ----------------------------------------------------------------------------------
    def _run(self, port: int, tokens: list[str], opts: dict) -> list[dict]:
        clients = opts["clients"]
        order_ids: list[list[str]] = [[] for _ in tokens]

        def post(i: int, http: requests.Session, rng: random.Random) -> tuple:
            skus = rng.sample([sku for sku, _, _ in CATALOG], rng.randint(1, 3))
            body = {
                "items": [{"sku": sku, "quantity": rng.randint(1, 5)} for sku in skus],
                "payment_method": "pm_card_visa",
                "shipping_address": ADDRESS,
            }
            status, payload, queries = _request(
                http,
                port,
                "POST",
                "/api/v1/orders/",
                tokens[i],
                body=json.dumps(body).encode(),
                extra={"Idempotency-Key": uuid.uuid4().hex},
            )
            if status == 201:
                order_ids[i].append(json.loads(payload)["id"])
            return status, queries

        def get(i: int, http: requests.Session, rng: random.Random) -> tuple:
            if not order_ids[i]:  # this client placed nothing yet (tiny --requests)
                post(i, http, rng)
            status, _, queries = _request(
                http, port, "GET", f"/api/v1/orders/{rng.choice(order_ids[i])}/", tokens[i]
            )
            return status, queries

        def list_page(i: int, http: requests.Session, rng: random.Random) -> tuple:
            status, _, queries = _request(
                http, port, "GET", "/api/v1/orders/?page_size=20", tokens[i]
            )
            return status, queries

        results = []
        for name, action in (
            ("POST /orders/", post),
            ("GET /orders/{id}/", get),
            ("GET /orders/ (20/page)", list_page),
        ):
            _drive(port, clients, action, min(opts["warmup"], opts["requests"]), 30.0)
            phase = _drive(port, clients, action, opts["requests"], opts["max_seconds"], name)
            results.append(phase.summary())
            self.stdout.write(f"  {name}: done ({phase.summary()['requests']} requests)")
        return results

    # -- output --------------------------------------------------------------------------------
    def _report(self, results: list[dict], opts: dict) -> None:
        self.stdout.write(
            f"\napi_bench: {opts['clients']} clients, {opts['workers']} gunicorn sync workers, "
            f"loopback, CPU count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} "
            "(client threads share the machine with the server)"
        )
        header = (
            f"{'request':<24} {'n':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'SQL/req min/mean/max':>22}  statuses"
        )
        self.stdout.write(header)
        for r in results:
            q = f"{r['queries_min']}/{r['queries_mean']}/{r['queries_max']}"
            self.stdout.write(
                f"{r['phase']:<24} {r['requests']:>6} {r['rps']:>8.1f} {r['p50_ms']:>8.2f} "
                f"{r['p99_ms']:>8.2f} {q:>22}  {r['statuses']}"
            )
        if opts["json"]:
            opts["json"].write_text(json.dumps(results, indent=2))
            self.stdout.write(f"written to {opts['json']}")
        bad = {r["phase"]: r["statuses"] for r in results if set(r["statuses"]) - {200, 201}}
        if bad:
            raise CommandError(f"unexpected statuses: {bad}")


# ---------------------------------------------------------------------------------------------
def _base(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def _request(
    http: requests.Session, port: int, method, path, token, body=None, extra=None
) -> tuple[int, bytes, int | None]:
    """One request on the client's keep-alive session; status, body and the query count."""
    headers = {"Authorization": f"Token {token}", "Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    headers.update(extra or {})
    response = http.request(method, _base(port) + path, data=body, headers=headers, timeout=30)
    queries = response.headers.get("X-DB-Queries")
    return response.status_code, response.content, int(queries) if queries is not None else None


def _drive(port, clients, action, total, max_seconds, name="warmup") -> Phase:
    """``total`` requests shared by ``clients`` threads (or fewer if ``max_seconds`` passes)."""
    phase = Phase(name)
    lock = threading.Lock()
    remaining = [total]
    deadline = time.monotonic() + max_seconds
    errors: list[BaseException] = []

    def client(i: int) -> None:
        rng = random.Random(i)
        http = requests.Session()
        try:
            while time.monotonic() < deadline:
                with lock:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                started = time.perf_counter()
                status, queries = action(i, http, rng)
                elapsed = time.perf_counter() - started
                with lock:
                    phase.record(status, elapsed, queries)
        except BaseException as exc:  # noqa: BLE001 - reported after the phase
            errors.append(exc)
        finally:
            http.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(max_seconds + 60)
    phase.seconds = time.perf_counter() - started
    if errors:
        raise CommandError(f"{name}: client error {errors[0]!r}")
    return phase
