"""The engine benchmark: sagas/s and end-to-end latency against a plain Celery ``chain``.

Both workloads run on the same freshly started worker processes, against the same database and
broker, doing the same five small writes per saga; only the orchestration differs. Latency is
measured from database timestamps (created -> finished) so the load generator's own scheduling
does not distort it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from celery import chain
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Max, Min
from django.utils import timezone

from lab import bench_saga as bench
from lab.supervisor import Supervisor
from sagas.models import SETTLED_STATES, Saga
from sagas.public import saga_start

REPO_ROOT = Path(settings.BASE_DIR)


@dataclass
class Result:
    name: str
    sagas: int
    seconds: float
    sagas_per_s: float
    p50_ms: float
    p99_ms: float
    offered_per_s: float | None = None
    queries_per_step: float | None = None
    broker_messages_per_saga: float | None = None
    outcomes: dict[str, int] = field(default_factory=dict)

    @classmethod
    def measured(
        cls,
        name: str,
        n: int,
        latencies: list[float],
        seconds: float,
        *,
        rate: float | None,
        publishes: tuple[int | None, int | None],
        outcomes: dict[str, int],
        queries_per_step: float | None = None,
    ) -> Result:
        """A run's figures: its ``n`` sagas' latencies (ms; of those that finished), its span
        (s), and the broker's publish counts before and after it (``None`` where the broker
        does not tell)."""
        before, after = publishes
        return cls(
            name=name,
            sagas=n,
            seconds=seconds,
            sagas_per_s=n / seconds,
            p50_ms=percentile(latencies, 50),
            p99_ms=percentile(latencies, 99),
            offered_per_s=rate,
            queries_per_step=queries_per_step,
            broker_messages_per_saga=(
                None if before is None or after is None else (after - before) / n
            ),
            outcomes=outcomes,
        )

    def row(self) -> str:
        q = "-" if self.queries_per_step is None else f"{self.queries_per_step:.1f}"
        m = "-" if self.broker_messages_per_saga is None else f"{self.broker_messages_per_saga:.2f}"
        offered = "max" if not self.offered_per_s else f"{self.offered_per_s:.0f}/s"
        return (
            f"{self.name:<24} {offered:>8} {self.sagas:>6} {self.sagas_per_s:>9.1f} "
            f"{self.p50_ms:>8.1f} {self.p99_ms:>8.1f} {q:>8} {m:>8}"
        )


HEADER = (
    f"{'workload':<24} {'offered':>8} {'sagas':>6} {'sagas/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
    f"{'q/step':>8} {'msg/saga':>8}"
)


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------
class BenchWorkers:
    """``processes`` worker processes on the bench queue, started fresh and stopped after."""

    def __init__(
        self,
        *,
        processes: int = 1,
        concurrency: int = 2,
        pool: str = "prefork",
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.queue = settings.CELERY_TASK_DEFAULT_QUEUE
        log_dir = log_dir or Path(settings.VAR_DIR) / "bench"
        base_env = bench.worker_env({**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.supervisor = Supervisor(log_dir, base_env)
        self.procs = [
            self.supervisor.start(
                f"worker{i}",
                [
                    sys.executable, "-m", "celery", "-A", "config", "worker",
                    "--pool", pool, "--concurrency", str(concurrency),
                    "-Q", self.queue, "-n", f"bench{i}.{uuid.uuid4().hex[:6]}@%h",
                    "--without-heartbeat", "--without-gossip", "--without-mingle",
                    "-l", os.environ.get("SAGA_BENCH_WORKER_LOGLEVEL", "info"),
                ],
            )
            for i in range(processes)
        ]  # fmt: skip
        try:
            self._wait_ready()
        except BaseException:  # Ctrl-C or SIGTERM while they start: nobody else stops them
            self.stop()
            raise

    def _wait_ready(self, timeout: float = 60) -> None:
        from config.celery import app

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            replies = app.control.ping(timeout=0.5) or []
            names = {name for reply in replies for name in reply if name.startswith("bench")}
            if len(names) >= len(self.procs):
                return
            if any(not p.alive for p in self.procs):
                raise RuntimeError("a bench worker exited at start; see var/bench/worker*.log")
        raise RuntimeError("bench workers did not answer a ping in time")

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        """Warm shutdown of all of them at once; SIGKILL whatever is left after 15 s."""
        for p in self.procs:
            p.signal(signal.SIGTERM)
        self.supervisor.stop_all(timeout=15)


# ---------------------------------------------------------------------------------------------
# Broker message counting (Redis: LPUSH is how kombu publishes)
# ---------------------------------------------------------------------------------------------
def broker_publishes() -> int | None:
    url = settings.CELERY_BROKER_URL
    if not url.startswith("redis"):
        return None
    import redis

    client = redis.Redis.from_url(url)
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_lpush", {}).get("calls", 0))


# ---------------------------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------------------------
def _paced(n: int, rate: float | None, send: Callable[[int], None]) -> None:
    """Call ``send(i)`` n times, at ``rate`` per second (as fast as possible when None)."""
    started = time.monotonic()
    for i in range(n):
        if rate:
            due = started + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        send(i)


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_settled(ids: list[Any], timeout: float, what: str) -> None:
    """Wait until every saga in ``ids`` has settled, at about the cost of the chain's poll.

    The figures come from the rows' own timestamps, not from when a poll saw them, so the poll
    only has to notice the end, as cheaply as the chain's (one index range count): whatever it
    costs is taken from the workers being measured, on the same cores (see :class:`_Settled`).
    """
    _wait(_Settled(ids), timeout, what)


class _Settled:
    """The poll of :func:`wait_settled`: ``True`` once every saga of ``ids`` has settled.

    Sagas settle roughly oldest first, so a poll asks about one saga, the 100th oldest still
    pending (the youngest, once fewer are left), and only once that one has settled asks about
    all of the 100 oldest, forgetting those that settled. Asking about all of them at every poll
    (an ``IN`` list of 1,000-odd ids, 20 times a second) cost 12 ms of client and database CPU
    a poll; asking about the oldest 100 at every poll, 3 ms (0.28 ms of the database's time per
    order at 100 orders/s, measured on 2026-12-07); this way, one primary-key lookup most polls.
    """

    WINDOW = 100

    def __init__(self, ids: list[Any]) -> None:
        self.pending = list(ids)

    def __call__(self) -> bool:
        if not self.pending:
            return True
        probe = self.pending[min(len(self.pending), self.WINDOW) - 1]
        if not Saga.objects.filter(id=probe, state__in=SETTLED_STATES).exists():
            return False
        head = self.pending[: self.WINDOW]
        settled = set(
            Saga.objects.filter(id__in=head, state__in=SETTLED_STATES).values_list("id", flat=True)
        )
        self.pending = [saga_id for saga_id in self.pending if saga_id not in settled]
        return not self.pending


def saga_figures(ids: list[Any]) -> tuple[list[float], float, dict[str, int]]:
    """Latencies (created -> finished, ms), the span from the first start to the last finish
    (s) and the count of each end state, of the sagas ``ids``, from the rows' timestamps."""
    sagas = Saga.objects.filter(id__in=ids)
    rows = list(sagas.values_list("created_at", "finished_at", "state"))
    span = sagas.aggregate(a=Min("created_at"), b=Max("finished_at"))
    seconds = max((span["b"] - span["a"]).total_seconds(), 1e-9)
    latencies = [(f - c).total_seconds() * 1000 for c, f, _ in rows if f]
    outcomes: dict[str, int] = {}
    for *_, state in rows:
        outcomes[state] = outcomes.get(state, 0) + 1
    return latencies, seconds, outcomes


def run_engine(
    n: int, *, rate: float | None = None, timeout: float = 600, saga_type: str = "bench5"
) -> Result:
    """N sagas of the 5-step bench type, each started in its own transaction.

    ``saga_type="bench5tx"``: the same saga with transactional steps (each write commits with
    its step's record).
    """
    bench.ensure_table()
    run = f"engine-{uuid.uuid4().hex[:8]}"
    ids: list[Any] = []
    before = broker_publishes()

    def send(i: int) -> None:
        with transaction.atomic():
            ids.append(saga_start(saga_type=saga_type, data={"run": run, "n": i}).id)

    _paced(n, rate, send)
    wait_settled(ids, timeout, "engine sagas to finish")
    after = broker_publishes()
    latencies, seconds, outcomes = saga_figures(ids)
    return Result.measured(
        "engine 5-step saga" + (" (transactional)" if saga_type == "bench5tx" else ""),
        n,
        latencies,
        seconds,
        rate=rate,
        publishes=(before, after),
        outcomes=outcomes,
        queries_per_step=engine_queries_per_step(saga_type),
    )


def run_chain(n: int, *, rate: float | None = None, timeout: float = 600) -> Result:
    """The baseline: N plain Celery chains of five tasks doing the same writes."""
    bench.ensure_table()
    run = f"chain-{uuid.uuid4().hex[:8]}"
    sent_at: dict[int, float] = {}
    before = broker_publishes()

    def send(i: int) -> None:
        sent_at[i] = time.time()
        chain(*(bench.chain_step.si(run, i, s) for s in range(1, 6))).apply_async()

    first = timezone.now()
    _paced(n, rate, send)

    def done() -> int:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT count(*) FROM {bench.TABLE} WHERE run = %s AND step = 5", [run])
            return cursor.fetchone()[0]

    _wait(lambda: done() >= n, timeout, "chains to finish")
    after = broker_publishes()
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT n, at FROM {bench.TABLE} WHERE run = %s AND step = 5", [run])
        finished = dict(cursor.fetchall())
    latencies = [(finished[i].timestamp() - sent_at[i]) * 1000 for i in range(n)]
    seconds = (max(finished.values()) - first).total_seconds()
    return Result.measured(
        "plain celery chain",
        n,
        latencies,
        seconds,
        rate=rate,
        publishes=(before, after),
        outcomes={"succeeded": n},
        queries_per_step=1.0,
    )


def engine_queries_per_step(saga_type: str = "bench5") -> float:
    """Engine statements per step on the happy path, counted in-process on the same code."""
    from django.test.utils import CaptureQueriesContext

    from sagas.runner import advance

    bench.ensure_table()
    with transaction.atomic():
        saga = saga_start(saga_type=saga_type, data={"run": f"q-{uuid.uuid4().hex[:8]}", "n": 0})
        # Take the saga away from the doorbell that rings on commit (it names version 0) and
        # from the pumps (they claim only sagas with a due time); this run is in-process.
        Saga.objects.filter(pk=saga.pk).update(version=10_000, next_attempt_at=None)
    # The saga's transition lines would land among the benchmark's results: not wanted there.
    engine_log = logging.getLogger("sagas.engine")
    level = engine_log.level
    engine_log.setLevel(logging.WARNING)
    try:
        with CaptureQueriesContext(connection) as ctx:
            advance(saga.id, 10_000)
    finally:
        engine_log.setLevel(level)
    control = ("COMMIT", "BEGIN", "ROLLBACK", "SAVEPOINT", "RELEASE")
    engine = [
        q for q in ctx.captured_queries
        if not q["sql"].startswith(control) and bench.TABLE not in q["sql"]
    ]  # fmt: skip
    return len(engine) / 5


def as_dict(result: Result) -> dict[str, Any]:
    return asdict(result)
