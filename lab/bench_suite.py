"""``make bench`` (``saga_bench --all``), the sweeper benchmark and the worker memory soak.

Every mode runs in a world of its own, so its figures are not disturbed by (and do not disturb)
a ``make run`` or a test session on the same machine: a scratch PostgreSQL database
(``sagarunner_bench_<pid>``, dropped at the end) and a Redis server of its own on a spare port
(so broker messages can be counted exactly: kombu publishes with ``LPUSH``).

``--all``
    For each workload (the engine's 5-step saga, a plain Celery ``chain`` of the same five
    writes, the order saga, and the order saga with 20-50 ms on every provider call), on fresh
    workers (one prefork process, concurrency 2): a warm-up, three saturation bursts (everything
    sent at once: the most sagas/s the stack finishes; ``--bursts``), of which the median one
    is reported, then several offered load levels as fractions of that saturation throughput.
    Prints the headline table and every level, writes ``bench-results/bench-<time>.json`` (and
    ``latest.json``) and draws the latency-against-offered-load plot
    (``bench-results/bench-latency.png``; ``--plot`` copies it elsewhere, e.g.
    ``docs/bench-latency.png``). Then measures the sweeper, as ``--sweep`` does.
``--sweep``
    Bulk-loads 1,000,000 sagas with ``COPY`` (mostly settled, 1,000 active and not yet due,
    100 overdue), ``ANALYZE``, then times one ``sweep()`` (several times, re-arming the 100
    overdue sagas in between) and prints ``EXPLAIN ANALYZE`` of its statements.
``--soak SECONDS``
    Runs the engine workload at a steady offered rate for that long and reports the resident
    memory (RSS) of the worker's processes at the start and at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from lab.stack import (
    REPO_ROOT,
    PgServer,
    Stack,
    default_database_url,
    spare_port,
    stack_env,
)
from lab.supervisor import children_of, rss_kib

INNER_ENV = "SAGARUNNER_BENCH_INNER"
DB_PREFIX = "sagarunner_bench_"
LATENCY_FAULTS = {
    op: {"latency_ms": [20, 50]}
    for op in (
        "inventory.reserve", "inventory.release", "inventory.commit",
        "payments.authorize", "payments.void", "payments.capture", "payments.refund",
        "shipping.arrange", "shipping.cancel",
    )
}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Outer process: re-run inside the bench's own database and broker
# ---------------------------------------------------------------------------------------------
def is_inside() -> bool:
    return os.environ.get(INNER_ENV) == str(os.getpid())


def reexec_inside(argv: list[str]) -> None:
    from django.conf import settings

    pid = os.getpid()
    server = PgServer.from_url(default_database_url())
    database = f"{DB_PREFIX}{pid}"
    run_dir = Path(settings.VAR_DIR) / "bench" / str(pid)
    redis_port = spare_port()
    env = stack_env(
        database_url=server.url(database),
        broker_url=f"redis://127.0.0.1:{redis_port}/0",
        queue=f"bench-{pid}",
        metrics_dir=run_dir / "metrics",
        extra={
            INNER_ENV: str(pid),
            "SAGARUNNER_BENCH_DB": database,
            "SAGARUNNER_BENCH_DIR": str(run_dir),
            "SAGARUNNER_BENCH_REDIS_PORT": str(redis_port),
            # saga_bench's own re-exec (one queue per run) is already satisfied.
            "SAGA_BENCH_QUEUE": f"bench-{pid}",
            # Worker logs at warning: an info line per task would cost the workers real time.
            "SAGA_BENCH_WORKER_LOGLEVEL": "warning",
        },
    )
    (run_dir / "metrics").mkdir(parents=True, exist_ok=True)
    os.execvpe(sys.executable, [sys.executable, str(REPO_ROOT / "manage.py"), *argv[1:]], env)


class World:
    """The inner run's database and Redis, created on entry and removed on exit."""

    def __init__(self, keep: bool = False) -> None:
        env = dict(os.environ)
        self.env = env
        self.database = env["SAGARUNNER_BENCH_DB"]
        self.run_dir = Path(env["SAGARUNNER_BENCH_DIR"])
        self.server = PgServer.from_url(env["DATABASE_URL"])
        self.stack = Stack(env=env, log_dir=self.run_dir, queue=env["CELERY_QUEUE"])
        self.keep = keep

    def __enter__(self) -> World:
        from django.core.management import call_command

        for name in self.server.drop_stale(DB_PREFIX):
            say(f"dropped {name}, left behind by a run that was killed")
        self.server.create_database(self.database)
        call_command("migrate", verbosity=0, interactive=False)
        self.stack.start_redis(int(self.env["SAGARUNNER_BENCH_REDIS_PORT"]))
        return self

    def __exit__(self, *exc: Any) -> None:
        from django.db import connections

        self.stack.close()
        connections.close_all()
        if self.keep:
            say(f"kept database {self.database} and logs in {self.run_dir}")
            return
        with contextlib.suppress(Exception):
            self.server.drop_database(self.database)
        if exc[0] is None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        else:
            say(f"logs kept in {self.run_dir}")


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# The machine, so a figure always says where it came from
# ---------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    from django.db import connection

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem_gib = round(kib / 1024 / 1024, 1)
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        pg = cursor.fetchone()[0]
    redis_version = ""
    with contextlib.suppress(Exception):
        redis_version = (
            subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
            .stdout.split("v=")[1]
            .split()[0]
        )
    import celery
    import django

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "loadavg_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "django": django.get_version(),
        "celery": celery.__version__,
        "postgresql": pg,
        "redis": redis_version,
        "kernel": platform.release(),
        "note": "database, broker, workers and load generator all on this one machine",
    }


# ---------------------------------------------------------------------------------------------
# Queries per step of the order saga (statements on the engine's tables, and all of them)
# ---------------------------------------------------------------------------------------------
def order_queries_per_step() -> tuple[float, float]:
    """(engine statements per step, all statements per step) of one happy order saga."""
    from django.db import connection, transaction
    from django.test.utils import CaptureQueriesContext

    from lab.order_bench import _bench_catalog
    from orders.models import Order
    from orders.services import order_create
    from sagas.definition import definition_of
    from sagas.models import Saga
    from sagas.runner import advance
    from sagas.timing import step_timeout

    _bench_catalog()
    from django.contrib.auth import get_user_model

    user, _ = get_user_model().objects.get_or_create(username="bench-client")
    with transaction.atomic():
        order = order_create(
            owner=user,
            items=[{"sku": "BENCH-1", "quantity": 1}],
            payment_method="pm_card_visa",
            shipping_address={
                "name": "Bench",
                "line1": "1 Loop Road",
                "city": "Utrecht",
                "postal_code": "3511AA",
                "country": "NL",
            },
        )
        # Take the saga away from the doorbell that rings on commit (it names version 0) and
        # from the pumps (they claim only sagas with a due time): this run is in-process.
        Saga.objects.filter(pk=order.saga_id).update(version=10_000, next_attempt_at=None)
    captured: list[dict] = []
    version, timeout = 10_000, None
    for _ in range(5):
        with CaptureQueriesContext(connection) as ctx:
            advance(order.saga_id, version, timeout)
        captured += ctx.captured_queries
        saga = Saga.objects.get(pk=order.saga_id)
        if saga.state != "running":
            break
        # A step with a longer timeout than this task's handed the saga back to a task of its
        # own (the carrier's booking): answer that ring here too, as a worker would.
        version = saga.version
        timeout = step_timeout(definition_of(saga).step(saga.current_step))
    assert Order.objects.get(pk=order.pk).saga.state == "succeeded"
    control = ("COMMIT", "BEGIN", "ROLLBACK", "SAVEPOINT", "RELEASE")
    statements = [q["sql"] for q in captured if not q["sql"].startswith(control)]
    engine = [s for s in statements if '"sagas_saga' in s]
    return len(engine) / 5, len(statements) / 5


# ---------------------------------------------------------------------------------------------
# --all: every workload at saturation and at several offered loads
# ---------------------------------------------------------------------------------------------
#: Threads in the provider-bound worker setup: steps that wait on HTTP need concurrency, not
#: cores (a thread waiting on a socket costs no CPU).
PROVIDER_THREADS = 32
_LATENCY_ENV = {"SAGA_FAULTS": json.dumps(LATENCY_FAULTS)}
WORKLOADS = [
    # key, label, saturation sagas, worker env, pool (None: --pool/--concurrency as given)
    ("engine", "engine 5-step saga", 1000, {}, None),
    ("engine_tx", "engine 5-step, transactional", 1000, {}, None),
    ("chain", "plain celery chain", 1000, {}, None),
    # The order saga's own baseline: the same five participant calls as a plain chain.
    ("order_chain", "order celery chain", 600, {}, None),
    ("order", "order saga", 600, {}, None),
    ("order_threads", "order saga, threads x32", 600, {}, ("threads", PROVIDER_THREADS)),
    (
        "order_latency",
        "order +20-50ms, threads x32",
        600,
        _LATENCY_ENV,
        ("threads", PROVIDER_THREADS),
    ),
]


def _runner(key: str):
    from lab import engine_bench as benchmark
    from lab.order_bench import run_order_chain, run_orders

    return {
        "engine": lambda n, rate: benchmark.run_engine(n, rate=rate),
        "engine_tx": lambda n, rate: benchmark.run_engine(n, rate=rate, saga_type="bench5tx"),
        "chain": lambda n, rate: benchmark.run_chain(n, rate=rate),
        "order_chain": lambda n, rate: run_order_chain(n, rate=rate),
        "order": lambda n, rate: run_orders(n, rate=rate),
        "order_threads": lambda n, rate: run_orders(n, rate=rate),
        "order_latency": lambda n, rate: run_orders(n, rate=rate, latency=True),
    }[key]


def run_all(opts: dict[str, Any]) -> int:
    from lab import engine_bench as benchmark

    levels = [float(x) for x in opts["levels"].split(",")]
    level_seconds = opts["level_seconds"]
    only = set(opts["workloads"].split(",")) if opts["workloads"] else None
    out_dir = Path(opts["out_dir"] or REPO_ROOT / "bench-results")
    opts = {**opts, "bursts": 1 if opts["quick"] else max(1, opts.get("bursts") or 1)}
    report: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "params": {
            "levels": levels,
            "level_seconds": level_seconds,
            "worker": f"{opts['processes']} prefork process(es) x {opts['concurrency']}",
            "provider_bound_worker": f"1 process, threads pool x {PROVIDER_THREADS}",
            "quick": bool(opts["quick"]),
            "saturation_bursts": opts["bursts"],
            "vacuum_before_each_workload": not opts.get("no_vacuum"),
        },
        "workloads": {},
    }
    with World(keep=opts["keep"]) as world:
        report["machine"] = machine()
        say(
            f"machine: {report['machine']['cores']} cores ({report['machine']['cpu']}), "
            f"load average {report['machine']['loadavg_at_start'][0]:.2f}; database "
            f"{world.database}, own redis-server on port {world.stack.redis_port}"
        )
        # The in-process query counts below run the engine here: its info lines are not output.
        logging.getLogger("sagas").setLevel(logging.WARNING)
        for key, label, saturation_n, env, pool in WORKLOADS:
            if only and key not in only:
                continue
            if opts["quick"]:
                saturation_n = max(50, saturation_n // 5)
            report["workloads"][key] = _run_workload(
                key, label, saturation_n, env, levels, level_seconds, opts, world, pool
            )
        report["queries"] = {
            "engine_per_step": benchmark.engine_queries_per_step(),
            "engine_tx_per_step": benchmark.engine_queries_per_step("bench5tx"),
        }
        with contextlib.suppress(Exception):
            eng, total = order_queries_per_step()
            report["queries"]["order_engine_per_step"] = eng
            report["queries"]["order_total_per_step"] = total
        if not opts["skip_sweep"]:
            report["sweep"] = measure_sweep(
                total=opts["sweep_sagas"], overdue=100, repeats=opts["sweep_repeats"]
            )
        report["machine"]["loadavg_at_end"] = list(os.getloadavg())
    report["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    print_report(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"bench-{stamp}.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    shutil.copyfile(path, out_dir / "latest.json")
    png = out_dir / "bench-latency.png"
    plot(report, png)
    print(f"results: {path} (and {out_dir / 'latest.json'}); plot: {png}")
    if opts["plot"]:
        Path(opts["plot"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, opts["plot"])
        print(f"plot copied to {opts['plot']}")
    return 0


def _run_workload(
    key, label, saturation_n, env, levels, level_seconds, opts, world, pool=None
) -> dict:
    from lab import engine_bench as benchmark

    run = _runner(key)
    pool_name, concurrency = pool or ("prefork", opts["concurrency"])
    processes = 1 if pool else opts["processes"]
    vacuum = None if opts.get("no_vacuum") else vacuum_database()
    if vacuum is not None:
        say(f"{label}: VACUUM (ANALYZE) of the bench database first ({vacuum:.1f} s)")
    say(f"{label}: starting fresh workers ({processes} x {pool_name} x {concurrency})")
    sessions_at_start = _db_sessions()
    workers = benchmark.BenchWorkers(
        processes=processes,
        concurrency=concurrency,
        pool=pool_name,
        env=env,
        log_dir=world.run_dir / key,
    )
    total = 0
    try:
        warmup = max(20, saturation_n // 10)
        run(warmup, None)  # warm-up: imports, connections, caches
        broker = (
            world.stack.redis.popen.pid if world.stack.redis and world.stack.redis.popen else None
        )
        bursts = []
        for _ in range(opts["bursts"]):
            before = _usage(workers.pids(), broker)
            burst = run(saturation_n, None)
            bursts.append((burst, _cost(before, _usage(workers.pids(), broker), burst.sagas)))
            total += saturation_n
        sat, cost = median_burst(bursts)
        total += warmup
        each = ", ".join(f"{b.sagas_per_s:.1f}" for b, _ in bursts)
        say(
            f"{label}: saturation {sat.sagas_per_s:.1f} sagas/s "
            + (f"(median of {len(bursts)} bursts: {each}; " if len(bursts) > 1 else "(")
            + f"{sat.sagas} sent at once; p50 {sat.p50_ms:.0f} ms, p99 {sat.p99_ms:.0f} ms); "
            f"per saga: worker {cost['worker_cpu_ms_per_saga']:.1f} ms CPU, PostgreSQL "
            f"{cost['pg_cpu_ms_per_saga']:.1f} ms CPU, load generator "
            f"{cost['client_cpu_ms_per_saga']:.1f} ms CPU, Redis "
            f"{cost['broker_cpu_ms_per_saga']:.1f} ms CPU; "
            f"{cost['sessions_opened']} sessions opened"
        )
        results = []
        for fraction in levels:
            rate = max(0.5, fraction * sat.sagas_per_s)
            n = int(min(max(rate * level_seconds, 30), 5000))
            r = run(n, rate)
            total += n
            say(
                f"{label}: offered {rate:.1f}/s ({fraction:.0%}): achieved "
                f"{r.sagas_per_s:.1f}/s, p50 {r.p50_ms:.0f} ms, p99 {r.p99_ms:.0f} ms"
            )
            results.append({**asdict(r), "fraction": fraction})
    finally:
        workers.stop()
    opened = _db_sessions() - sessions_at_start
    return {
        "label": label,
        "worker": f"{processes} x {pool_name} x {concurrency}",
        "saturation": {**asdict(sat), **cost},
        # Every burst, the median's included: its spread says how far one burst can be trusted.
        "bursts": [{**asdict(b), **c} for b, c in bursts],
        "levels": results,
        # Every session opened on the bench database from the workers' start to their stop
        # (warm-up, saturation, levels; the load generator's own connection is already open).
        "sessions_opened": opened,
        "sagas_total": total,
        "sessions_per_1000_sagas": round(1000 * opened / max(total, 1), 2),
        "vacuum_seconds": vacuum,
    }


def vacuum_database() -> float:
    """``VACUUM (ANALYZE)`` every table of the bench database that holds rows; the seconds.

    Each workload starts without the dead rows of those before it, as a production database
    kept by autovacuum would (their live rows stay, as they would there). Without this, where
    autovacuum is off (as on the machines this project's CI runs on) the order saga, which
    shares the engine's tables with the engine workloads before it, ran on some 130,000 dead
    saga rows and 70,000 dead step rows they left, while the plain chains write tables of
    their own. Run between workloads, with no worker up, so it is never part of a measurement.

    Never a table no row was ever written to, as autovacuum would not touch one: a first try
    vacuumed the fresh database too, and the engine, the first workload, fell burst by burst
    to 126 sagas/s at 8.9 ms of PostgreSQL CPU per saga (about 400 at 1.6 ms without). Most
    likely because a table vacuumed empty has statistics that say "no pages" instead of "never
    vacuumed", the planner prefers a sequential scan of it, and the workers' prepared
    statements keep that plan while the table grows.
    """
    from django.db import connection

    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(relname) "
            "FROM pg_stat_user_tables WHERE pg_relation_size(relid) > 0 ORDER BY 1"
        )
        tables = [row[0] for row in cursor.fetchall()]
        if tables:
            cursor.execute(f"VACUUM (ANALYZE) {', '.join(tables)}")
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------
# Where the time goes: CPU of the worker and of PostgreSQL, sessions (from /proc and pg_stat)
# ---------------------------------------------------------------------------------------------
def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process (psutil reads ``/proc/<pid>/stat``)."""
    import psutil

    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def _db_sessions() -> int:
    """Sessions ever opened on this database (``pg_stat_database.sessions``, PostgreSQL 14+).

    Backends report their counters at most once a second; a short pause lets the last ones in.
    """
    from django.db import connection

    time.sleep(1.2)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute("SELECT sessions FROM pg_stat_database WHERE datname = current_database()")
        return int(cursor.fetchone()[0])


def _usage(worker_pids: list[int], broker_pid: int | None = None) -> dict[str, Any]:
    """CPU seconds so far of every worker process (main and pool), of every PostgreSQL backend
    on the bench database (the workers' and the load generator's), of the load generator (this
    process: it starts the sagas, or places the orders, while the workers run, on the same
    cores) and of the run's own Redis server; and sessions."""
    from django.db import connection

    workers = {p: _cpu_seconds(p) for m in worker_pids for p in [m, *children_of(m)]}
    with connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
        backends = {pid: _cpu_seconds(pid) for (pid,) in cursor.fetchall()}
    broker = {} if broker_pid is None else {broker_pid: _cpu_seconds(broker_pid)}
    return {
        "worker": workers,
        "pg": backends,
        "client": {os.getpid(): _cpu_seconds(os.getpid())},
        "broker": broker,
        "sessions": _db_sessions(),
    }


def _cost(before: dict, after: dict, sagas: int) -> dict[str, Any]:
    """Per saga: CPU milliseconds of the workers and of PostgreSQL between two samples.

    A backend that appeared in between counts in full; one that ended in between (only when
    connections are not reused) is missed, so PostgreSQL's figure is then a lower bound.
    """

    def spent(kind: str) -> float:
        total = 0.0
        for pid, cpu in after[kind].items():
            if cpu is not None:
                total += cpu - (before[kind].get(pid) or 0.0)
        return total

    opened = after["sessions"] - before["sessions"]
    return {
        "worker_cpu_ms_per_saga": round(1000 * spent("worker") / sagas, 2),
        "pg_cpu_ms_per_saga": round(1000 * spent("pg") / sagas, 2),
        "client_cpu_ms_per_saga": round(1000 * spent("client") / sagas, 2),
        "broker_cpu_ms_per_saga": round(1000 * spent("broker") / sagas, 2),
        "sessions_opened": opened,
        "pg_backends_ended": len(set(before["pg"]) - set(after["pg"])),
    }


def median_burst(bursts: list[tuple[Any, dict]]) -> tuple[Any, dict]:
    """The burst whose sagas/s is the median (the lower middle one of an even number), with
    its own latencies and CPU costs, so a row of the table is one burst that really ran.

    A single burst on a shared 2-core machine can be 10-20% off its neighbours (another
    process, the host stealing a core, the first run after boot); the median of three is not
    moved by one such burst, whichever way it went, and unlike the best of three it flatters
    no workload.
    """
    ranked = sorted(bursts, key=lambda b: b[0].sagas_per_s)
    return ranked[(len(ranked) - 1) // 2]


def ratio_range(top: dict, bottom: dict) -> tuple[float, float] | None:
    """The lowest and highest ratio any burst of ``top`` against any of ``bottom`` gives."""
    tops = [burst["sagas_per_s"] for burst in top.get("bursts") or []]
    bottoms = [burst["sagas_per_s"] for burst in bottom.get("bursts") or []]
    if not tops or not bottoms or (len(tops) < 2 and len(bottoms) < 2):
        return None
    return min(tops) / max(bottoms), max(tops) / min(bottoms)


def _at_half(w: dict) -> dict | None:
    levels = w["levels"]
    if not levels:
        return None
    return min(levels, key=lambda r: abs(r["fraction"] - 0.5))


def print_report(report: dict) -> None:
    ws = report["workloads"]
    q = report.get("queries", {})
    engine_q = {
        "engine": q.get("engine_per_step"),
        "engine_tx": q.get("engine_tx_per_step"),
        "chain": 0.0,
        "order_chain": 0.0,
        "order": q.get("order_engine_per_step"),
        "order_threads": q.get("order_engine_per_step"),
        "order_latency": q.get("order_engine_per_step"),
    }
    chain = ws.get("chain", {}).get("saturation")
    print()
    print(
        f"{'workload':<30} {'sagas/s':>8} {'x chain':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'@ load':>8} {'eng q/step':>10} {'msg/saga':>9} {'wrk ms':>7} {'pg ms':>6} "
        f"{'gen ms':>6} {'rds ms':>6} {'sess/1k':>7}"
    )
    for key, w in ws.items():
        sat = w["saturation"]
        half = _at_half(w)
        ratio = f"{sat['sagas_per_s'] / chain['sagas_per_s']:.2f}x" if chain else "-"
        eq = engine_q.get(key)
        msgs = sat.get("broker_messages_per_saga")
        wrk, pg = sat.get("worker_cpu_ms_per_saga"), sat.get("pg_cpu_ms_per_saga")
        gen, rds = sat.get("client_cpu_ms_per_saga"), sat.get("broker_cpu_ms_per_saga")
        per_k = w.get("sessions_per_1000_sagas")
        print(
            f"{w['label']:<30} {sat['sagas_per_s']:>8.1f} {ratio:>8} "
            f"{(half or sat)['p50_ms']:>7.1f} {(half or sat)['p99_ms']:>7.1f} "
            f"{(half['offered_per_s'] if half else 0):>6.1f}/s "
            f"{'-' if eq is None else f'{eq:.1f}':>10} {'-' if msgs is None else f'{msgs:.2f}':>9}"
            f" {'-' if wrk is None else f'{wrk:.1f}':>7} {'-' if pg is None else f'{pg:.1f}':>6}"
            f" {'-' if gen is None else f'{gen:.1f}':>6} {'-' if rds is None else f'{rds:.1f}':>6}"
            f" {'-' if per_k is None else f'{per_k:.1f}':>7}"
        )
    print(
        "sagas/s: saturation throughput (all sent at once); p50/p99: saga latency (created -> "
        "finished) at the offered load nearest half of saturation; eng q/step: SQL statements "
        "the orchestration itself runs per step; msg/saga: broker messages published per saga; "
        "wrk ms / pg ms / gen ms / rds ms: CPU milliseconds per saga at saturation of the "
        "worker processes, of the PostgreSQL backends on the bench database, of the load "
        "generator (starting sagas or placing orders beside the workers) and of the run's Redis "
        "(/proc); sess/1k: PostgreSQL sessions opened per 1,000 sagas, from the workers' start "
        "to their stop; each workload on fresh workers, "
        + (
            "after a VACUUM (ANALYZE) of the bench database"
            if report.get("params", {}).get("vacuum_before_each_workload")
            else "with no VACUUM between workloads"
        )
    )
    spread = [w for w in ws.values() if len(w.get("bursts") or []) > 1]
    if spread:
        print(
            "saturation bursts (sagas/s; the table shows the median one): "
            + "; ".join(
                f"{w['label']} " + ", ".join(f"{b['sagas_per_s']:.1f}" for b in w["bursts"])
                for w in spread
            )
        )
    if "order_total_per_step" in q:
        print(f"order saga: {q['order_total_per_step']:.1f} statements per step in all")
    print()
    print(f"{'workload':<26} {'offered':>9} {'achieved':>9} {'p50 ms':>8} {'p99 ms':>8} {'n':>6}")
    for w in ws.values():
        for r in w["levels"]:
            print(
                f"{w['label']:<26} {r['offered_per_s']:>7.1f}/s {r['sagas_per_s']:>7.1f}/s "
                f"{r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['sagas']:>6}"
            )
    print()
    ratios = [
        ("engine", "chain"),
        ("engine_tx", "chain"),
        ("order", "chain"),
        ("order", "order_chain"),
        ("order_latency", "order_threads"),
    ]
    for top, bottom in ratios:
        if top in ws and bottom in ws:
            a, b = ws[top]["saturation"], ws[bottom]["saturation"]
            spread = ratio_range(ws[top], ws[bottom])
            print(
                f"ratio {ws[top]['label']} / {ws[bottom]['label']}: "
                f"{a['sagas_per_s'] / b['sagas_per_s']:.2f}x sagas/s"
                + (f" (any burst against any: {spread[0]:.2f}x-{spread[1]:.2f}x)" if spread else "")
            )
    sweep = report.get("sweep")
    if sweep:
        print(
            f"sweep: {sweep['total_sagas']:,} sagas, {sweep['overdue']} overdue: one sweep() "
            f"took {sweep['median_ms']:.1f} ms median (min {sweep['min_ms']:.1f}, max "
            f"{sweep['max_ms']:.1f}) over {len(sweep['runs_ms'])} runs, each ringing "
            f"{sweep['redispatched']} sagas; {sweep['sql_median_ms']:.1f} ms of it in SQL"
        )
    m = report["machine"]
    print(
        f"machine: {m['cores']} cores, {m['cpu']}, {m['memory_gib']} GiB; PostgreSQL "
        f"{m['postgresql']}, Redis {m['redis']}; load average {m['loadavg_at_start'][0]:.2f} at "
        f"start, {m.get('loadavg_at_end', [0])[0]:.2f} at end; everything on this one machine"
    )


def plot(report: dict, path: Path) -> None:
    """p50 and p99 latency against offered load, one panel for the engine vs the chain, one
    for the order saga."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ws = report["workloads"]
    panels = [
        ("Engine 5-step saga vs plain Celery chain", ["engine", "engine_tx", "chain"]),
        ("Order saga (fake providers)", ["order_chain", "order", "order_threads", "order_latency"]),
    ]
    panels = [(t, [k for k in keys if k in ws]) for t, keys in panels]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    colors = {
        "engine": "C0",
        "engine_tx": "C4",
        "chain": "C3",
        "order": "C2",
        "order_threads": "C5",
        "order_latency": "C1",
        "order_chain": "C7",
    }
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            w = ws[key]
            xs = [r["offered_per_s"] for r in w["levels"]]
            ax.plot(xs, [r["p50_ms"] for r in w["levels"]], "o-", color=colors[key],
                    label=f"{w['label']} p50")  # fmt: skip
            ax.plot(xs, [r["p99_ms"] for r in w["levels"]], "s--", color=colors[key],
                    label=f"{w['label']} p99")  # fmt: skip
            ax.axvline(w["saturation"]["sagas_per_s"], color=colors[key], alpha=0.25, lw=4)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("offered load (sagas/s); shaded: saturation throughput")
        ax.set_ylabel("saga latency, created -> finished (ms)")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m = report["machine"]
    fig.suptitle(
        f"sagarunner on {m['cores']} cores ({m['cpu'][:40]}), PostgreSQL {m['postgresql']}, "
        f"Redis {m['redis']}: database, broker, 1 worker (prefork x2) and load on one machine",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# --sweep: one sweep among 1,000,000 sagas
# ---------------------------------------------------------------------------------------------
def _copy_sagas(total: int, overdue: int, not_due: int) -> None:
    """COPY ``total`` saga rows: ``overdue`` overdue active ones, ``not_due`` active and not
    due yet (a step in flight or a backoff), the rest settled over the last 30 days."""
    import random

    from django.db import connection

    from sagas.models import Saga

    rng = random.Random(1)
    now = datetime.now(UTC)
    fields = list(Saga._meta.concrete_fields)
    columns = [f.column for f in fields]
    settled = [("succeeded", 90), ("compensated", 8), ("resolved", 1.5), ("needs_manual", 0.5)]
    states, weights = zip(*settled, strict=True)
    steps = ["reserve_inventory", "authorize_payment", "arrange_shipment", "capture_payment"]

    def row(i: int) -> list[Any]:
        created = now - timedelta(seconds=rng.uniform(60, 30 * 86400))
        if i < overdue:
            state, nxt, lease = "running", now - timedelta(hours=1), None
            deadline, finished = now + timedelta(minutes=10), None
        elif i < overdue + not_due:
            state = "running" if i % 4 else "compensating"
            # Waiting out a backoff, or a step in flight: not due within the run.
            nxt = now + timedelta(seconds=rng.uniform(600, 3600))
            lease = now + timedelta(hours=1) if i % 2 else None
            deadline, finished = now + timedelta(minutes=10), None
        else:
            state = rng.choices(states, weights)[0]
            nxt = lease = None
            deadline, finished = created + timedelta(minutes=10), created + timedelta(seconds=2)
        values = {
            "id": uuid.UUID(int=rng.getrandbits(128), version=4),
            "saga_type": "order",
            "state": state,
            "current_step": rng.choice(steps),
            "step_index": 1,
            "version": 12,
            "attempt": 0,
            "next_attempt_at": nxt,
            "lease_until": lease,
            "deadline_at": deadline,
            "cancel_reason": "",
            "failure_code": "payment_declined" if state == "compensated" else "",
            "failed_step": "authorize_payment" if state == "compensated" else "",
            "last_error": "",
            "escalated_from": "",
            "data": json.dumps({"order_id": str(uuid.UUID(int=rng.getrandbits(128), version=4))}),
            "results": "{}",
            "correlation_id": "",
            "created_at": created,
            "updated_at": finished or created,
            "finished_at": finished,
        }
        out = []
        for f in fields:
            if f.name in values:
                out.append(values[f.name])
            elif f.has_default():
                default = f.get_default()
                out.append(json.dumps(default) if f.get_internal_type() == "JSONField" else default)
            else:
                out.append(None)
        return out

    with connection.cursor() as cursor:
        raw = cursor.cursor  # psycopg 3 cursor: COPY ... FROM STDIN
        table = connection.ops.quote_name(Saga._meta.db_table)
        cols = ", ".join(connection.ops.quote_name(c) for c in columns)
        with raw.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
            for i in range(total):
                copy.write_row(row(i))
        cursor.execute(f"ANALYZE {table}")


def measure_sweep(*, total: int = 1_000_000, overdue: int = 100, repeats: int = 5) -> dict:
    from django.conf import settings
    from django.db import connection, transaction
    from django.test.utils import CaptureQueriesContext

    from sagas.models import Saga
    from sagas.sweeper import sweep

    not_due = 1000
    say(f"sweep: loading {total:,} sagas with COPY ({overdue} overdue, {not_due} not yet due)")
    started = time.monotonic()
    before = Saga.objects.count()
    _copy_sagas(total, overdue, not_due)
    load_seconds = time.monotonic() - started
    say(f"sweep: loaded in {load_seconds:.0f}s; timing sweep() {repeats} times")
    overdue_ids = list(
        Saga.objects.filter(
            state="running",
            next_attempt_at__lt=datetime.now(UTC) - timedelta(minutes=30),
        ).values_list("id", flat=True)
    )

    def rearm() -> None:
        Saga.objects.filter(id__in=overdue_ids).update(
            next_attempt_at=datetime.now(UTC) - timedelta(hours=1),
            **({"sweeps": 0} if any(f.name == "sweeps" for f in Saga._meta.fields) else {}),
        )

    runs_ms: list[float] = []
    sql_ms: list[float] = []
    redispatched = 0
    captured: list[dict] = []
    for i in range(repeats + 1):
        rearm()
        with CaptureQueriesContext(connection) as ctx:
            t0 = time.perf_counter()
            result = sweep()
            elapsed = (time.perf_counter() - t0) * 1000
        if i == 0:
            continue  # the first run warms caches and the connection; not counted
        runs_ms.append(elapsed)
        sql_ms.append(sum(float(q["time"]) for q in ctx.captured_queries) * 1000)
        redispatched = result["redispatched"]
        captured = ctx.captured_queries
    # EXPLAIN ANALYZE of every statement of the last sweep, rolled back.
    rearm()
    plans = []
    control = ("COMMIT", "BEGIN", "ROLLBACK", "SAVEPOINT", "RELEASE")
    for q in captured:
        sql = q["sql"]
        if sql.startswith(control):
            continue
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")
                plan = "\n".join(r[0] for r in cursor.fetchall())
                transaction.set_rollback(True)
        except Exception as exc:  # noqa: BLE001 - report, do not fail the benchmark
            plan = f"(could not explain: {exc})"
        plans.append({"sql": sql, "time_ms": float(q["time"]) * 1000, "plan": plan})
    out = {
        "total_sagas": total + before,
        "overdue": overdue,
        "active_not_due": not_due,
        "load_seconds": round(load_seconds, 1),
        "runs_ms": [round(x, 2) for x in runs_ms],
        "min_ms": min(runs_ms),
        "median_ms": statistics.median(runs_ms),
        "max_ms": max(runs_ms),
        # Time in SQL statements (as Django measured them); the rest is mostly the doorbells.
        "sql_median_ms": statistics.median(sql_ms),
        "redispatched": redispatched,
        "sweep_batch": settings.SAGA_SWEEP_BATCH,
        "statements": plans,
    }
    for p in plans:
        plan = "\n".join(line[:200] for line in p["plan"].splitlines())
        print(f"\n-- {p['time_ms']:.2f} ms: {p['sql'][:300]}\n{plan}")
    return out


def run_sweep_only(opts: dict[str, Any]) -> int:
    with World(keep=opts["keep"]):
        result = measure_sweep(
            total=opts["sweep_sagas"], overdue=100, repeats=opts["sweep_repeats"]
        )
    print(
        f"\nsweep: {result['total_sagas']:,} sagas, {result['overdue']} overdue: one sweep() took "
        f"{result['median_ms']:.1f} ms median (min {result['min_ms']:.1f}, max "
        f"{result['max_ms']:.1f}) over {len(result['runs_ms'])} runs, each ringing "
        f"{result['redispatched']}; {result['sql_median_ms']:.1f} ms of it in SQL; load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    if opts["json"]:
        Path(opts["json"]).parent.mkdir(parents=True, exist_ok=True)
        Path(opts["json"]).write_text(json.dumps(result, indent=2, default=str))
    return 0


# ---------------------------------------------------------------------------------------------
# --soak: worker memory over a long run
# ---------------------------------------------------------------------------------------------
def run_soak(opts: dict[str, Any]) -> int:
    from django.db import transaction

    from lab import bench_saga as bench
    from lab import engine_bench as benchmark
    from sagas.models import SETTLED_STATES, Saga
    from sagas.public import saga_start

    seconds = opts["soak"]
    rate = opts["rate"] or 40.0
    with World(keep=opts["keep"]) as world:
        bench.ensure_table()
        workers = benchmark.BenchWorkers(
            processes=1, concurrency=opts["concurrency"], log_dir=world.run_dir / "soak"
        )
        try:
            main_pid = workers.pids()[0]
            benchmark.run_engine(200)  # warm-up, then the start sample
            samples: list[dict] = []

            def sample(t: float) -> dict:
                kids = children_of(main_pid)
                s = {
                    "t": round(t, 1),
                    "main_kib": rss_kib(main_pid),
                    "children_kib": {pid: rss_kib(pid) for pid in kids},
                }
                samples.append(s)
                return s

            say(f"soak: {seconds:.0f}s of the engine workload at {rate:g} sagas/s")
            first = sample(0.0)
            run_id = f"soak-{uuid.uuid4().hex[:8]}"
            started = time.monotonic()
            next_sample = 30.0
            n = 0
            while time.monotonic() - started < seconds:
                due = started + n / rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(min(delay, 0.5))
                    continue
                with transaction.atomic():
                    saga_start(saga_type="bench5", data={"run": run_id, "n": n})
                n += 1
                if time.monotonic() - started >= next_sample:
                    s = sample(time.monotonic() - started)
                    say(f"soak: t={s['t']:.0f}s main {s['main_kib']} KiB, pool {s['children_kib']}")
                    next_sample += 30.0
            deadline = time.monotonic() + 120
            while Saga.objects.exclude(state__in=SETTLED_STATES).exists():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            last = sample(time.monotonic() - started)
        finally:
            workers.stop()
    succeeded = n
    report = {
        "seconds": seconds,
        "offered_per_s": rate,
        "sagas": succeeded,
        "start": first,
        "end": last,
        "samples": samples,
        "loadavg": list(os.getloadavg()),
    }

    def total(s: dict) -> int:
        return (s["main_kib"] or 0) + sum(v or 0 for v in s["children_kib"].values())

    same = set(first["children_kib"]) == set(last["children_kib"])
    print(
        f"\nsoak: {succeeded} sagas over {seconds:.0f}s at {rate:g}/s. Worker RSS at start: main "
        f"{first['main_kib']} KiB, pool {list(first['children_kib'].values())} KiB (total "
        f"{total(first)} KiB); at end: main {last['main_kib']} KiB, pool "
        f"{list(last['children_kib'].values())} KiB (total {total(last)} KiB); "
        f"pool pids {'unchanged' if same else 'replaced'}"
    )
    if opts["json"]:
        Path(opts["json"]).parent.mkdir(parents=True, exist_ok=True)
        Path(opts["json"]).write_text(json.dumps(report, indent=2, default=str))
    return 0


def main(opts: dict[str, Any], argv: list[str]) -> int:
    if not is_inside():
        reexec_inside(argv)
    if opts["soak"]:
        return run_soak(opts)
    if opts["sweep"] and not opts["all"]:
        return run_sweep_only(opts)
    return run_all(opts)
