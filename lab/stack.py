"""A throwaway sagarunner stack for the chaos run and the benchmark.

Everything here is started by the command that needs it and stopped by it, even on failure or
Ctrl-C: a scratch PostgreSQL database, a Redis server on a spare local port (so it may be
killed and started again), Celery workers, beat and the web process, each in its own process
group with its log in one directory (:mod:`lab.supervisor`). Nothing touches the developer's
``make run`` database, broker queue or metrics directory.

:class:`BrokerProxy` stands between the stack and a broker this code must not restart (a shared
RabbitMQ): an outage closes every connection through it and refuses new ones for a while, which
is what clients see when the broker restarts.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from lab.supervisor import Process, Supervisor, pid_alive

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# Ports and waiting
# ---------------------------------------------------------------------------------------------
def spare_port() -> int:
    """A local TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval=0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise StackError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class StackError(RuntimeError):
    """The stack could not be started (the message says which part and where its log is)."""


# ---------------------------------------------------------------------------------------------
# Scratch PostgreSQL databases
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PgServer:
    host: str
    port: int
    user: str
    password: str

    @classmethod
    def from_url(cls, url: str) -> PgServer:
        parts = urlsplit(url)
        if parts.scheme not in {"postgres", "postgresql", "pgsql"}:
            raise StackError(
                f"DATABASE_URL {parts.scheme}://... is not PostgreSQL; the chaos run and the "
                "benchmark need a PostgreSQL server to create their scratch database on"
            )
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5432,
            user=parts.username or "postgres",
            password=parts.password or "",
        )

    def url(self, dbname: str) -> str:
        auth = quote(self.user, safe="")
        if self.password:
            auth += ":" + quote(self.password, safe="")
        return f"postgres://{auth}@{self.host}:{self.port}/{quote(dbname, safe='')}"

    def admin(self):
        """An autocommit connection to the server's ``postgres`` database (for CREATE and DROP
        DATABASE); raises ``psycopg.Error`` when the server does not answer."""
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password or None,
            dbname="postgres",
            autocommit=True,
            connect_timeout=5,
        )

    def create_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')

    def drop_database(self, name: str) -> None:
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def drop_stale(self, prefix: str) -> list[str]:
        """Drop ``<prefix><pid>`` databases whose process is gone (a run killed with -9)."""
        pattern = re.compile(rf"^{re.escape(prefix)}(\d+)$")
        dropped = []
        with self.admin() as conn:
            for (name,) in conn.execute("SELECT datname FROM pg_database").fetchall():
                m = pattern.match(name)
                if m and not pid_alive(int(m.group(1))):
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                    dropped.append(name)
        return dropped


def default_database_url() -> str:
    """The database the settings point at; its server hosts the scratch databases."""
    from django.conf import settings

    db = settings.DATABASES["default"]
    if db["ENGINE"] != "django.db.backends.postgresql":
        raise StackError("the chaos run and the benchmark need PostgreSQL (DATABASE_URL)")
    server = PgServer(
        host=db.get("HOST") or "127.0.0.1",
        port=int(db.get("PORT") or 5432),
        user=db.get("USER") or "postgres",
        password=db.get("PASSWORD") or "",
    )
    return server.url(db["NAME"])


@dataclass
class Stack:
    """The processes of one sagarunner deployment on this machine, all stopped by :meth:`close`.

    ``env`` is the environment every process gets (``DATABASE_URL``, ``CELERY_BROKER_URL``,
    ``CELERY_QUEUE``, knobs). Every process ever started is remembered by the supervisor, so
    :meth:`close` also reaps the pool children of a worker whose main process was killed.
    """

    env: dict[str, str]
    log_dir: Path
    queue: str
    redis: Process | None = None
    redis_port: int | None = None
    web_port: int | None = None
    _generation: dict[str, int] = field(default_factory=dict)
    supervisor: Supervisor = field(init=False)

    def __post_init__(self) -> None:
        self.supervisor = Supervisor(self.log_dir, self.env)

    @property
    def procs(self) -> list[Process]:
        return list(self.supervisor.procs)

    # -- Redis ----------------------------------------------------------------------------
    def start_redis(self, port: int | None = None) -> str:
        """Start (or start again) our own Redis server; return its broker URL."""
        self.redis_port = port or self.redis_port or spare_port()
        self.redis = self.supervisor.start(
            "redis",
            [
                "redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--protected-mode", "no", "--loglevel", "warning",
            ],
        )  # fmt: skip
        wait_until(
            lambda: answers("127.0.0.1", self.redis_port) or self._died(self.redis),
            20,
            "redis-server to listen",
        )
        self._raise_if_died(self.redis)
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def stop_redis(self, sig: int = signal.SIGKILL) -> None:
        """Stop our Redis server (SIGKILL: a crash; SIGTERM: a clean shutdown). With no
        persistence configured, every queued message is gone, as after a real crash."""
        if self.redis is not None and self.redis.alive:
            self.redis.signal(sig)
            self.redis.wait(10)
            self.redis.kill()

    # -- Celery ---------------------------------------------------------------------------
    def start_worker(self, slot: str, *, concurrency: int = 2, pool: str = "prefork") -> Process:
        """Start the worker of ``slot`` (``w1``, ``w2``...); each restart gets a new node name.

        A ``hooks...`` slot consumes the webhook deliveries' queue (settings.WEBHOOKS_QUEUE),
        the others the sagas' queue, as in production.
        """
        queue = f"{self.queue}-webhooks" if slot.startswith("hooks") else self.queue
        generation = self._generation.get(slot, 0) + 1
        self._generation[slot] = generation
        node = f"{slot}g{generation}.{os.getpid()}@{socket.gethostname()}"
        proc = self.supervisor.start(
            f"{slot}g{generation}",
            [
                sys.executable, "-m", "celery", "-A", "config", "worker",
                "--pool", pool, "--concurrency", str(concurrency), "-Q", queue,
                "-n", node, "--without-heartbeat", "--without-gossip", "--without-mingle",
                "-l", "info",
            ],
            log_name=f"worker-{slot}.log",
        )  # fmt: skip
        proc.node = node  # type: ignore[attr-defined]
        return proc

    def wait_workers_ready(self, workers: Iterable[Process], timeout: float = 90) -> None:
        """Every worker answers a ping (through the broker, so the broker works too)."""
        from config.celery import app

        pending = {w.node: w for w in workers}  # type: ignore[attr-defined]
        deadline = time.monotonic() + timeout
        while pending:
            for w in pending.values():
                self._raise_if_died(w)
            try:
                replies = app.control.ping(destination=list(pending), timeout=1.0) or []
            except Exception:  # noqa: BLE001 - the broker may still be starting
                replies = []
                time.sleep(0.5)
            for reply in replies:
                for node in reply:
                    pending.pop(node, None)
            if pending and time.monotonic() > deadline:
                raise StackError(
                    f"workers {', '.join(pending)} did not answer a ping in {timeout:.0f}s; "
                    f"logs in {self.log_dir}"
                )

    def start_beat(self) -> Process:
        return self.supervisor.start(
            "beat", [sys.executable, "-m", "celery", "-A", "config", "beat", "-l", "info"]
        )

    # -- web ------------------------------------------------------------------------------
    def start_web(self, *, workers: int = 2, threads: int = 4) -> Process:
        self.web_port = self.web_port or spare_port()
        proc = self.supervisor.start(
            "web",
            [
                sys.executable, "-m", "gunicorn", "config.wsgi",
                "--bind", f"127.0.0.1:{self.web_port}", "--workers", str(workers),
                "--threads", str(threads), "--worker-class", "gthread", "--timeout", "60",
                "--graceful-timeout", "5", "--access-logfile", "-",
            ],
        )  # fmt: skip
        wait_until(lambda: answers("127.0.0.1", self.web_port) or self._died(proc), 60, "gunicorn")
        self._raise_if_died(proc)
        return proc

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    # -- bookkeeping ----------------------------------------------------------------------
    @staticmethod
    def _died(proc: Process) -> bool:
        return not proc.alive

    def _raise_if_died(self, proc: Process) -> None:
        if not proc.alive:
            raise StackError(
                f"{proc.name} exited with {proc.returncode} at start; log {proc.log_path}:"
                f"\n{proc.log_tail()}"
            )

    def close(self) -> None:
        """Stop every process ever started: web first, then beat and workers, Redis last."""
        workers = [p.name for p in self.procs if p.name not in {"web", "beat", "redis"}]
        self.supervisor.stop_all(order=["web", "beat", *workers, "redis"])


# ---------------------------------------------------------------------------------------------
# Environment shared by every process of a stack
# ---------------------------------------------------------------------------------------------
def stack_env(
    *,
    database_url: str,
    broker_url: str,
    queue: str,
    metrics_dir: Path,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """``os.environ`` plus what makes a stack its own: database, broker, queue, metrics, key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGA_", "PYTEST_"))}
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "DATABASE_URL": database_url,
            "CELERY_BROKER_URL": broker_url,
            "CELERY_QUEUE": queue,
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "SECRET_KEY": os.environ.get("SECRET_KEY") or secrets.token_urlsafe(40),
            "DEBUG": "0",  # production-like: no query log growing in long-lived processes
            "HTTPS_ONLY": "0",  # but plain http on loopback
            # A load generator, not a client to protect against: no rate limits.
            "API_RATE_LIMIT": "",
            "API_RATE_LIMIT_ORDERS": "",
            "API_RATE_LIMIT_ANON": "",
            "PYTHONUNBUFFERED": "1",
            "LOG_FORMAT": "console",
            "SAGA_DEFINITION_MODULES": "lab.bench_saga",
        }
    )
    env.pop("TEST_DATABASE_NAME", None)
    env.update(extra or {})
    return env


def replace_host_port(url: str, host: str, port: int) -> str:
    """``url`` with its host and port replaced (credentials and path kept)."""
    parts = urlsplit(url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@{host}:{port}" if auth else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


# ---------------------------------------------------------------------------------------------
# A TCP proxy to simulate outages of a broker we must not restart
# ---------------------------------------------------------------------------------------------
class BrokerProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target``; :meth:`outage` cuts it for a while.

    During an outage every open connection is closed and new ones are refused (nothing
    listens), which is what a client sees while a broker restarts. The broker itself, and
    its queues, are untouched.
    """

    def __init__(self, target_host: str, target_port: int, port: int | None = None) -> None:
        self.target = (target_host, target_port)
        self.port = port or spare_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def outage(self, seconds: float) -> None:
        self.down()
        time.sleep(seconds)
        self.up()

    def close(self) -> None:
        self._closed = True
        self.down()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self._conns.update((client, upstream))
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 1.0)
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    peers[s].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()
                with self._lock:
                    self._conns.discard(s)
