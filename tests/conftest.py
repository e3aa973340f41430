"""The test harness: pytest-django on PostgreSQL, real Celery workers, polling with deadlines.

At import this module sets safe defaults in ``os.environ`` *before* Django settings load (the
pytest ini deliberately does not name ``DJANGO_SETTINGS_MODULE``, so pytest-django leaves
settings alone until this file has run). Anything already set in the environment wins, except
the per-session isolation values (queue name, metrics directory, test database name).

Fixtures and helpers (see the README's "`make test`" section):

``celery_worker`` (session)
    A real ``celery -A config worker`` subprocess (prefork, concurrency 2; or as
    ``SAGA_TEST_WORKER_POOL=threads:32`` says, which ``make test`` uses for a second run of the
    saga tests: the provider-bound worker setup) on the pytest test
    database, the dedicated Redis db 15 and a queue unique to this session. Started on first
    use, answers a ping before the fixture returns, stopped before the test database is
    dropped. Tests that need it use ``transactional_db``: the worker only sees committed rows.
    Do not kill it; use ``worker_factory`` for workers you want to hurt.
``worker_factory(env=None, *, name="extra", concurrency=2, exclusive=False, pool="prefork")``
    Starts another worker on the same queue with extra environment (e.g. ``SAGA_FAULTS``) and
    returns a :class:`WorkerHandle` (``.pid``, ``.child_pids()``, ``.kill()``, ``.stop()``,
    ``.alive``, ``.log_text()``). ``exclusive=True`` makes the session worker (if running)
    stop consuming the queue until the test ends, and waits until it runs nothing it took
    before, so only the new worker runs tasks. Every
    worker it started is killed at the end of the test.
``wait_for(predicate, timeout=30, interval=0.05, describe=None)``
    Polls ``predicate`` until it returns something truthy (and returns that) or fails the test
    on the deadline (``timeout`` times ``TEST_WAIT_SCALE``, default 3), showing what
    ``describe()`` returned last.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from lab.stack import PgServer
from lab.supervisor import Process, pid_alive

# `make test` starts the threads-pool and RabbitMQ passes in the background, where the shell
# makes them ignore SIGINT (and Python keeps an ignored SIGINT ignored). Take it back, so Ctrl-C
# stops those passes too, through the teardown that stops their workers and drops their database.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"
SESSION_ID = uuid.uuid4().hex[:10]
HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]

# ---------------------------------------------------------------------------------------------
# Environment defaults, before Django settings load
# ---------------------------------------------------------------------------------------------
_DEFAULTS = {
    "DJANGO_SETTINGS_MODULE": "config.settings",
    "SECRET_KEY": "test-only-secret-key-never-used-outside-the-test-suite",
    "SAGA_BACKOFF_BASE": "0.05",
    "SAGA_BACKOFF_MAX": "0.5",
    "SAGA_STUCK_AFTER": "0.5",
    "SAGA_SWEEP_INTERVAL": "0.5",
    # Tests read /metrics right after what they count (tests/api/test_metrics_health.py checks
    # that a render is reused when this is set).
    "METRICS_REUSE_SECONDS": "0",
    "SAGA_STEP_TIMEOUT": "3",
    "SAGA_INLINE_BUDGET": "0.5",
    "SAGA_DEADLINE": "60",
    # A dedicated Redis database, so tests never touch a developer's `make run` queue.
    "CELERY_BROKER_URL": "redis://127.0.0.1:6379/15",
    "LOG_FORMAT": "console",
    # The test client and live servers speak plain http (production defaults to HTTPS only).
    "HTTPS_ONLY": "0",
    # The suite must not trip the rate limits; the throttling tests set their own.
    "API_RATE_LIMIT": "1000000/min",
    "API_RATE_LIMIT_ORDERS": "1000000/min",
    "API_RATE_LIMIT_ANON": "1000000/min",
    # Saga types scripted by the engine tests, known to every worker the tests start.
    "SAGA_DEFINITION_MODULES": "tests.sagas.sagatypes",
    # Webhook receivers in tests listen on 127.0.0.1 over plain http; retries come quickly.
    "WEBHOOKS_ALLOW_PRIVATE": "1",
    "WEBHOOKS_BACKOFF_BASE": "0.2",
    "WEBHOOKS_BACKOFF_MAX": "1",
    "WEBHOOKS_CONNECT_TIMEOUT": "1",
    "WEBHOOKS_TIMEOUT": "2",
    "WEBHOOKS_TASK_BUDGET": "2",
    "WEBHOOKS_SWEEP_AFTER": "1",
}
# What the environment held before this module touched it: an xdist controller hands exactly
# this to its workers (see pytest_configure), so each computes its own per-session values.
_PER_SESSION_KEYS = ("CELERY_QUEUE", "CACHE_KEY_PREFIX", "PROMETHEUS_MULTIPROC_DIR")
_ENV_BEFORE = {
    key: os.environ.get(key) for key in (*_DEFAULTS, *_PER_SESSION_KEYS, "TEST_DATABASE_NAME")
}
for _key, _value in _DEFAULTS.items():
    os.environ.setdefault(_key, _value)

# Per-session isolation: several sessions (developers, CI, helpers) may run at once against the
# same PostgreSQL and Redis.
os.environ["CELERY_QUEUE"] = f"test-{SESSION_ID}"
# Rate-limit counters are keyed by user id, and every session's test database counts from 1.
os.environ["CACHE_KEY_PREFIX"] = f"test-{SESSION_ID}"
_PROM_DIR = tempfile.mkdtemp(prefix="sagarunner-test-metrics-")
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _PROM_DIR
atexit.register(shutil.rmtree, _PROM_DIR, ignore_errors=True)
# The test database carries this host and pid so concurrent sessions never share (and destroy)
# one, and databases left behind by a killed session can be recognised and dropped.
_TEST_DB_PREFIX = "test_sagarunner_"
# pytest-django appends "_gw<n>" for each pytest-xdist worker (the pid is the worker's own).
_TEST_DB_RE = re.compile(rf"^{_TEST_DB_PREFIX}{HOST_TAG}_p(\d+)(?:_gw\d+)?$")
os.environ.setdefault("TEST_DATABASE_NAME", f"{_TEST_DB_PREFIX}{HOST_TAG}_p{os.getpid()}")

import django  # noqa: E402

django.setup()

from django.conf import settings as _settings  # noqa: E402
from django.contrib.auth.hashers import PBKDF2PasswordHasher  # noqa: E402
from django.db.models.signals import post_migrate  # noqa: E402


class FewIterationsPBKDF2PasswordHasher(PBKDF2PasswordHasher):
    """Django's default hasher at 1,000 iterations instead of 1,000,000 (0.4 s of CPU per
    hash here), for the passwords the test process sets and checks: logins, lockouts and
    ``seed_demo`` hash dozens of them. Same algorithm and format, and a hash carries its
    iteration count, so the servers and workers the tests start (production settings) verify
    these hashes as they are; no test is about the hasher's cost."""

    iterations = 1_000


_settings.PASSWORD_HASHERS = [
    "tests.conftest.FewIterationsPBKDF2PasswordHasher",
    *_settings.PASSWORD_HASHERS,
]


def _restore_ops_group(sender, **_kwargs) -> None:
    """Recreate the "ops" group after a transactional test's flush.

    The group comes from a data migration (sagas 0002); ``flush`` (run after every
    ``transactional_db`` test) empties the table and only replays ``post_migrate``, so without
    this the group would vanish for every test that runs after a worker test.
    """
    if sender.label != "sagas":
        return
    from django.contrib.auth.models import Group, Permission

    group, _ = Group.objects.get_or_create(name="ops")
    perm = Permission.objects.filter(
        content_type__app_label="sagas", codename="operate_saga"
    ).first()
    if perm is not None:
        group.permissions.add(perm)


post_migrate.connect(_restore_ops_group, dispatch_uid="tests.restore_ops_group")


# Rows only migrations write (content types and the permissions named after them; no test
# adds any): left in place by the flush, so its post_migrate does not write them all again.
_FLUSH_KEEPS = ("django_content_type", "auth_permission")


def _install_delete_flush() -> None:
    """Empty the tables after a ``transactional_db`` test with DELETE, not TRUNCATE.

    Django flushes every table after each transactional test with one TRUNCATE, which on
    PostgreSQL replaces every table's and index's files: about a second for these ~45 nearly
    empty tables (more on a busy machine), against tens of milliseconds for DELETE; and then
    its post_migrate wrote every content type and permission again (~150 queries). With a
    couple of hundred worker tests that was minutes of every run. The end state is the same:
    empty tables but for ``_FLUSH_KEEPS`` (sequences are reset by neither unless a test asks,
    and then, as for ``available_apps``, Django's TRUNCATE is kept). The tables are first
    locked as TRUNCATE locks them (ACCESS EXCLUSIVE), so a worker still finishing a task waits
    for the flush instead of writing between the DELETEs; every foreign key is DEFERRABLE
    INITIALLY DEFERRED, so the order of the DELETEs does not matter.
    """
    from django.db import OperationalError
    from django.db.backends.postgresql.operations import DatabaseOperations

    truncate = DatabaseOperations.sql_flush

    def sql_flush(self, style, tables, *, reset_sequences=False, allow_cascade=False):
        if not tables or reset_sequences or allow_cascade:
            return truncate(
                self, style, tables, reset_sequences=reset_sequences, allow_cascade=allow_cascade
            )
        names = [self.quote_name(table) for table in tables if table not in _FLUSH_KEEPS]
        return [f"LOCK TABLE {', '.join(names)} IN ACCESS EXCLUSIVE MODE;"] + [
            f"DELETE FROM {name};" for name in names
        ]

    execute = DatabaseOperations.execute_sql_flush

    def execute_sql_flush(self, sql_list):
        # A worker still finishing the test's last task can hold a lock on one table and want
        # another that the flush already locked: PostgreSQL ends one of the two (a deadlock).
        # When that is the flush, its transaction has rolled back and the worker goes on;
        # locking again simply waits for it (CI once saw a test's teardown fail this way and the
        # next test find the previous test's rows).
        for attempt in range(1, 6):
            try:
                return execute(self, sql_list)
            except OperationalError as exc:
                if getattr(exc.__cause__, "sqlstate", None) != "40P01" or attempt == 5:
                    raise

    DatabaseOperations.sql_flush = sql_flush
    DatabaseOperations.execute_sql_flush = execute_sql_flush


_install_delete_flush()


def _is_xdist_controller(config: pytest.Config) -> bool:
    """True in the process that hands tests to pytest-xdist workers (it runs none itself)."""
    return getattr(config.option, "dist", "no") != "no" and not hasattr(config, "workerinput")


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, give the workers the environment pytest was started with.

    Workers inherit the controller's environment. Left as this module set it, a worker would
    find ``DJANGO_SETTINGS_MODULE`` already set, so pytest-django would load the settings
    before this module runs there, with the controller's queue, cache key prefix and metrics
    directory: every worker would send its tasks to one queue that no session worker consumes,
    and share rate-limit counters. Restored, each worker sets its own, as a lone session does.
    Runs before the controller starts its workers (``pytest_sessionstart``).
    """
    if not _is_xdist_controller(config):
        return
    for key, value in _ENV_BEFORE.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# ---------------------------------------------------------------------------------------------
# Polling with a deadline
# ---------------------------------------------------------------------------------------------
# Every wait's deadline is this many times what the test names. The names are sized for a
# quiet machine; `make test` runs several sessions at once, often on a small shared CI machine,
# where a wait that normally takes 2 s can take 20. A deadline is there to end a hang, never to
# judge speed (tests make no timing assertions), and polling returns as soon as the condition
# holds, so a passing test takes no longer for it; only a failing one takes longer to say so.
WAIT_SCALE = float(os.environ.get("TEST_WAIT_SCALE", "3"))


def purge_queue() -> int:
    """Drop every message waiting on this session's queue; returns how many there were."""
    from config.celery import app

    with app.connection_for_write() as conn:
        return conn.default_channel.queue_purge(app.conf.task_default_queue) or 0


def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 30,
    interval: float = 0.05,
    describe: Callable[[], Any] | None = None,
) -> Any:
    """Poll ``predicate`` until truthy (return its value) or fail on the deadline
    (``timeout`` times ``TEST_WAIT_SCALE``, default 3).

    On timeout the failure shows the last value of ``describe()`` (or of the predicate), so a
    red test says what the database looked like instead of just "timed out".
    """
    timeout = timeout * max(WAIT_SCALE, 1.0)
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            seen = describe() if describe is not None else value
            pytest.fail(f"condition not met within {timeout}s; last seen: {seen!r}", pytrace=False)
        time.sleep(interval)


@pytest.fixture(autouse=True)
def _rate_limits_counted() -> None:
    """Each test starts with the rate limits counted: a cache that did not answer in an earlier
    test (a Redis stall, a test's dead cache) leaves them off for a few seconds otherwise."""
    from accounts import throttling

    throttling._down_until = 0.0


@pytest.fixture
def wait_for() -> Callable[..., Any]:
    """``wait_for(predicate, timeout=30, interval=0.05, describe=None)``: see :func:`wait_until`."""
    return wait_until


# ---------------------------------------------------------------------------------------------
# Test database: unique per session, stale ones from killed sessions dropped
# ---------------------------------------------------------------------------------------------
def _drop_stale_test_databases(conn: Any) -> None:
    names = [row[0] for row in conn.execute("SELECT datname FROM pg_database")]
    for name in names:
        match = _TEST_DB_RE.match(name)
        if match and not pid_alive(int(match.group(1))):
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# A migrated database that test databases are copied from (CREATE DATABASE ... TEMPLATE), named
# after the migrations it holds. make test creates five test databases at once (three xdist
# processes, the threads and RabbitMQ passes); migrating each from nothing cost ~2 s of CPU
# apiece, and Django's own migrate then finds everything applied (~0.2 s).
_TEMPLATE_PREFIX = "test_sagarunner_template_"
#: A template no session has used for this long (another checkout's migrations) is dropped.
_TEMPLATE_UNUSED_FOR = 3600
#: One lock for building, stamping and dropping templates, across sessions and checkouts.
_TEMPLATE_LOCK = 0x5A6A_7E57


def _migrations_fingerprint() -> str:
    """Every migration Django would apply: its app, name and text (the installed apps' too)."""
    from django.db.migrations.loader import MigrationLoader

    loader = MigrationLoader(None, ignore_no_migrations=True)
    digest = hashlib.sha1()
    for key, migration in sorted(loader.disk_migrations.items()):
        digest.update(repr(key).encode())
        digest.update(Path(sys.modules[migration.__module__].__file__ or "").read_bytes())
    return digest.hexdigest()[:12]


def _template_database(conn: Any, server: PgServer) -> str:
    """The name of the template for the current migrations, built first if it does not exist.

    Also stamps it as used now (its comment) and drops templates unused for an hour, so a
    machine keeps one per set of migrations in use, not one per change ever tested.
    """
    name = f"{_TEMPLATE_PREFIX}{_migrations_fingerprint()}"
    now = int(time.time())
    conn.execute("SELECT pg_advisory_lock(%s)", [_TEMPLATE_LOCK])
    try:
        rows = conn.execute(
            "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database"
            " WHERE datname LIKE %s",
            [_TEMPLATE_PREFIX + "%"],
        ).fetchall()
        if name not in {row[0] for row in rows}:
            building = f"{name}_building"
            server.create_database(building)
            done = subprocess.run(
                [sys.executable, "manage.py", "migrate", "--no-input", "-v0"],
                cwd=REPO_ROOT,
                env={**os.environ, "DATABASE_URL": server.url(building)},
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                pytest.exit(f"migrating the template database failed:\n{done.stderr[-4000:]}", 3)
            conn.execute(f'ALTER DATABASE "{building}" RENAME TO "{name}"')
        conn.execute(f"COMMENT ON DATABASE \"{name}\" IS '{now}'")
        for other, used in rows:
            if other != name and (
                not (used or "").isdigit() or now - int(used) > _TEMPLATE_UNUSED_FOR
            ):
                conn.execute(f'DROP DATABASE IF EXISTS "{other}" WITH (FORCE)')
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", [_TEMPLATE_LOCK])
    return name


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix: None) -> None:
    """pytest-django hook point, run once before the test database is created: drop the
    databases of sessions that were killed, and copy the test database from a migrated
    template instead of migrating it from nothing."""
    import psycopg
    from django.conf import settings

    db = settings.DATABASES["default"]
    if db["ENGINE"] != "django.db.backends.postgresql":
        return
    server = PgServer.from_url(database_url_for(db))
    try:
        conn = server.admin()
    except psycopg.Error:
        return  # Django reports an unreachable database itself, with its own message.
    with conn:
        _drop_stale_test_databases(conn)
        db.setdefault("TEST", {})["TEMPLATE"] = _template_database(conn, server)


# ---------------------------------------------------------------------------------------------
# Real Celery workers
# ---------------------------------------------------------------------------------------------
def database_url_for(settings_dict: dict) -> str:
    """A ``DATABASE_URL`` for the database Django is connected to (the test database)."""
    engine = settings_dict["ENGINE"]
    if engine == "django.db.backends.sqlite3":
        return f"sqlite:///{settings_dict['NAME']}"
    user = quote(settings_dict.get("USER") or "", safe="")
    password = quote(settings_dict.get("PASSWORD") or "", safe="")
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    host = settings_dict.get("HOST") or "127.0.0.1"
    port = f":{settings_dict['PORT']}" if settings_dict.get("PORT") else ""
    return f"postgres://{auth}{host}{port}/{quote(settings_dict['NAME'], safe='')}"


def _broker_reachable(url: str, timeout: float = 2.0) -> bool:
    parts = urlsplit(url)
    if parts.scheme not in {"redis", "rediss", "amqp", "pyamqp"}:
        return True
    default_port = 6379 if parts.scheme.startswith("redis") else 5672
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), timeout=timeout
        ):
            return True
    except OSError:
        return False


class WorkerHandle:
    """One ``celery -A config worker`` subprocess in its own process group."""

    def __init__(self, name: str, env: dict[str, str], concurrency: int, pool: str) -> None:
        self.name = name
        self.nodename = f"{name}.{SESSION_ID}@{socket.gethostname()}"
        self.queue = env["CELERY_QUEUE"]
        ARTIFACTS_DIR.joinpath("workers").mkdir(parents=True, exist_ok=True)
        self.log_path = (
            ARTIFACTS_DIR / "workers" / f"{name}-{SESSION_ID}-{uuid.uuid4().hex[:6]}.log"
        )
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "config",
            "worker",
            "--pool",
            pool,
            "--concurrency",
            str(concurrency),
            "-Q",
            f"{self.queue},{self.queue}-webhooks",  # settings.WEBHOOKS_QUEUE
            "-n",
            self.nodename,
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
            "-l",
            "info",
        ]
        # Its own process group, so kill() reaches the pool children too.
        self.process = Process(name, command, env=env, log_path=self.log_path).start()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.alive

    def child_pids(self) -> list[int]:
        """The pool processes (and anything they started)."""
        return self.process.children()

    def log_text(self) -> str:
        return self.process.log_text()

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until the worker answers a ping; fail with its log if it dies or stays mute."""
        from config.celery import app

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive:
                pytest.fail(
                    f"worker {self.nodename} exited with {self.process.returncode} before it was "
                    f"ready; log {self.log_path}:\n{self.log_text()[-4000:]}",
                    pytrace=False,
                )
            if app.control.ping(destination=[self.nodename], timeout=0.5):
                return
        self.kill()
        pytest.fail(
            f"worker {self.nodename} did not answer a ping within {timeout}s; log "
            f"{self.log_path}:\n{self.log_text()[-4000:]}",
            pytrace=False,
        )

    def kill(self) -> None:
        """SIGKILL the whole process group (main process and pool children) at once."""
        self.process.kill()

    def stop(self, timeout: float = 15) -> None:
        """Warm shutdown (SIGTERM); SIGKILL the group (orphaned pool children too) after it."""
        self.process.stop(timeout)

    def pause_consuming(self) -> None:
        """Stop taking messages, and return only once the worker says it consumes none of its
        queues: a busy worker can answer the cancel after its reply timed out, and a message
        sent in between would still reach it."""
        from config.celery import app

        queues = {self.queue, f"{self.queue}-webhooks"}
        for queue in sorted(queues):
            app.control.cancel_consumer(queue, destination=[self.nodename], reply=True)

        def consuming() -> set[str] | None:
            inspect = app.control.inspect(destination=[self.nodename], timeout=1.0)
            active = inspect.active_queues() or {}
            if self.nodename not in active:
                return None  # no answer yet
            return {q["name"] for q in active[self.nodename]} & queues

        wait_until(
            lambda: consuming() == set(),
            timeout=20,
            describe=lambda: f"{self.nodename} still consumes {consuming()}",
        )

    def wait_idle(self, timeout: float = 60) -> None:
        """Return once the paused worker runs no task and holds none waiting for a pool slot:
        it still finishes what it had taken, and a pump among those claims any due saga of the
        session's database, or rings for one. Countdown doorbells it holds are not waited for:
        they never carry a pump slot, so each claims only its own saga.

        Reserved is asked before active: paused, a task only moves from the one to the other,
        so one that left the reserved list before the first answer is in the second.
        """
        from config.celery import app

        def busy() -> list[Any] | None:
            inspect = app.control.inspect(destination=[self.nodename], timeout=1.0)
            reserved = inspect.reserved()
            active = inspect.active()
            if not reserved or not active or self.nodename not in active:
                return None  # no answer yet
            return [*reserved.get(self.nodename, []), *active[self.nodename]]

        wait_until(
            lambda: busy() == [],
            timeout=timeout,
            describe=lambda: f"{self.nodename} still has {busy()}",
        )

    def resume_consuming(self) -> None:
        from config.celery import app

        for queue in (self.queue, f"{self.queue}-webhooks"):
            app.control.add_consumer(queue, destination=[self.nodename], reply=True)

    def __repr__(self) -> str:
        return f"<WorkerHandle {self.nodename} pid={self.pid} alive={self.alive}>"


_session_worker: WorkerHandle | None = None


def _worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    from django.db import connection

    env = os.environ.copy()
    env["DATABASE_URL"] = database_url_for(connection.settings_dict)
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env["DJANGO_SETTINGS_MODULE"] = "config.settings"
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update({key: str(value) for key, value in extra.items()})
    return env


def worker_refusing_to_start(extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A real prefork worker started with ``extra`` settings and its broker down (nothing
    listens on port 1), expected to refuse at once: a worker that checks its settings before
    its pool and its broker exits; one that does not waits for the broker, and the calling
    test fails here after 60 s."""
    env = _worker_env({**extra, "CELERY_BROKER_URL": "redis://127.0.0.1:1/0"})
    command = [sys.executable, "-m", "celery", "-A", "config", "worker", "-Q", "nowhere"]
    try:
        return subprocess.run(
            [*command, "-P", "prefork", "-c", "2", "-l", "info"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the worker did not refuse to start: {exc.stderr!r}"[-3000:])


def _require_broker() -> None:
    url = os.environ["CELERY_BROKER_URL"]
    if not _broker_reachable(url):
        pytest.fail(
            f"The Celery broker {url} is not reachable. Start Redis with "
            "`redis-server --daemonize yes` (or set CELERY_BROKER_URL).",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def celery_worker(django_db_setup: None, django_db_blocker: Any) -> Iterator[WorkerHandle]:
    """A real worker process for the whole session, on the test database; stopped at the end.

    Depends on ``django_db_setup`` so it is torn down before the test database is dropped.
    """
    global _session_worker
    _require_broker()
    pool, _, concurrency = os.environ.get("SAGA_TEST_WORKER_POOL", "prefork:2").partition(":")
    worker = WorkerHandle("session", _worker_env(), concurrency=int(concurrency or 2), pool=pool)
    try:
        worker.wait_ready()
        _session_worker = worker
        yield worker
    finally:
        _session_worker = None
        worker.stop()


@pytest.fixture
def worker_factory(django_db_setup: None) -> Iterator[Callable[..., WorkerHandle]]:
    """Start extra workers (same queue, extra env); all are stopped when the test ends."""
    started: list[WorkerHandle] = []
    paused: list[WorkerHandle] = []

    def start(
        env: dict[str, Any] | None = None,
        *,
        name: str = "extra",
        concurrency: int = 2,
        exclusive: bool = False,
        pool: str = "prefork",
    ) -> WorkerHandle:
        _require_broker()
        if exclusive and _session_worker is not None and _session_worker not in paused:
            _session_worker.pause_consuming()
            paused.append(_session_worker)
            _session_worker.wait_idle()
        worker = WorkerHandle(f"{name}{len(started) + 1}", _worker_env(env), concurrency, pool)
        started.append(worker)
        worker.wait_ready()
        return worker

    try:
        yield start
    finally:
        # SIGKILL, not a warm shutdown: the test is over, and a warm shutdown costs seconds per
        # worker. Whatever a killed worker held unacked stays on this session's own queue.
        for worker in started:
            worker.kill()
        for worker in paused:
            if worker.alive:
                worker.resume_consuming()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Delete this session's queue from the broker when the session ends.

    Every session has a queue of its own; on RabbitMQ it is durable (and so is its exchange),
    and on Redis its binding keys stay, so without this each session would leave one behind.
    """
    if _is_xdist_controller(session.config):
        return  # each worker deletes its own; the controller never had one
    url = os.environ.get("CELERY_BROKER_URL", "")
    if not url or not _broker_reachable(url, timeout=1.0):
        return
    from config.celery import app

    name = os.environ["CELERY_QUEUE"]
    queue = app.amqp.queues.get(name)
    if queue is None:
        return
    with contextlib.suppress(Exception), app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        bound = queue(conn.default_channel)
        bound.declare()  # binds it on this channel (Redis keeps bindings per channel state)
        bound.delete()
        if bound.exchange.name:
            bound.exchange.delete()


def manage_shell(env: dict[str, str], code: str) -> str:
    """Run ``code`` in ``manage.py shell`` in a process of its own configured as a worker is,
    plus ``env`` (as a web process of the same deployment would be); returns its output."""
    done = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=REPO_ROOT,
        env=_worker_env(env),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout
