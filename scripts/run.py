#!/usr/bin/env python3
"""``make run``: one command from a fresh clone to a running sagarunner.

1. Creates ``.venv`` and installs the project into it when needed, then re-runs itself there.
2. Picks the services and says which in one line:
   explicit ``DATABASE_URL`` / ``CELERY_BROKER_URL``; else PostgreSQL and Redis on their
   standard local ports (creating the ``sagarunner`` database if missing); else the embedded
   default, a SQLite file and a file-backed Celery broker under ``var/``.
3. Generates a dev ``SECRET_KEY`` once into ``var/secret_key``, migrates, seeds the demo data
   (printing the demo staff login) and issues the ``demo-client`` API token, revoking the
   demo tokens earlier runs issued on that database (one still running included), and says
   when it did.
4. Runs web (gunicorn, port 8000), one Celery worker and Celery beat under honcho: one
   foreground group, logs interleaved and labelled, Ctrl-C stops all of them.

Standard library only until step 1 has re-run it inside the venv. Knobs (environment):
``SAGARUNNER_PORT`` (web port, 8000), ``SAGARUNNER_PG_HOST``/``SAGARUNNER_PG_PORT``
(127.0.0.1:5432) and ``SAGARUNNER_REDIS_HOST``/``SAGARUNNER_REDIS_PORT`` (127.0.0.1:6379): where
to look for local services; ``SAGARUNNER_VAR_DIR`` (``var/``). ``--prepare-only`` does
everything but start the processes (the chosen environment is in ``var/run.env``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv"
VENV_PYTHON = VENV / "bin" / "python"
STAMP = VENV / ".installed-stamp"


def say(message: str) -> None:
    print(f"sagarunner: {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# 1. The virtualenv
# ---------------------------------------------------------------------------------------------
def ensure_venv() -> None:
    """Create/refresh .venv when needed and re-exec this script with its interpreter."""
    in_venv = Path(sys.prefix).resolve() == VENV.resolve()
    if not VENV_PYTHON.exists():
        if sys.version_info < (3, 11):  # noqa: UP036 - run by whatever python3 is on PATH
            sys.exit("sagarunner needs Python 3.11 or newer to create .venv")
        say("creating .venv")
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    stale = not STAMP.exists() or STAMP.stat().st_mtime < (REPO / "pyproject.toml").stat().st_mtime
    if stale:
        say('installing the project into .venv (pip install -e ".[dev]")')
        pip = [str(VENV_PYTHON), "-m", "pip", "install", "--quiet"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True, cwd=REPO)
        subprocess.run([*pip, "-e", ".[dev]"], check=True, cwd=REPO)
        STAMP.touch()
    if not in_venv:
        os.execv(str(VENV_PYTHON), [str(VENV_PYTHON), str(Path(__file__).resolve()), *sys.argv[1:]])


# ---------------------------------------------------------------------------------------------
# 2. Services
# ---------------------------------------------------------------------------------------------
def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_taken(port: int) -> OSError | None:
    """Why the web port cannot be bound (something serves on it), or ``None`` if it is free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as exc:
            return exc
    return None


def refuse_busy_port(port: int) -> None:
    """Stop before printing anything else when the web port is taken (another `make run`?):
    otherwise the banner, a token and a curl line would point at the other instance."""
    taken = port_taken(port)
    if taken is not None:
        sys.exit(
            f"sagarunner: port {port} is already in use ({taken.strerror}); is another "
            f"`make run` still running? Stop it, or pick another port: "
            f"SAGARUNNER_PORT={port + 1} make run (on the same database, its demo token "
            "replaces the running one's, whose clients then get 401)"
        )


def redact(url: str) -> str:
    """The URL without its password, for printing."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def create_database_if_missing(host: str, port: int, user: str, name: str) -> None:
    import psycopg  # in the venv by now

    with psycopg.connect(
        host=host, port=port, user=user, dbname="postgres", autocommit=True, connect_timeout=5
    ) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
            say(f"created database {name}")


def refuse_unusable_database(url: str) -> None:
    """Exit with one line if an explicit PostgreSQL ``DATABASE_URL`` cannot be connected to.

    Without this, ``migrate`` fails with three tracebacks. The launcher creates the database
    only where it chose it itself; one named by the user is the user's to create.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql"):
        return
    import psycopg  # in the venv by now

    # Keep what libpq understands (host=/socket/dir, sslmode, sslcert, ...); drop the options
    # only the settings read (conn_max_age and the like), which libpq would refuse.
    libpq = {d.keyword.decode() for d in psycopg.pq.Conninfo.get_defaults()}
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k in libpq])
    try:
        psycopg.connect(urlunsplit(parts._replace(query=query)), connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1].replace("FATAL:", "").strip()
        options = [
            f"-h {parts.hostname}" if parts.hostname else "",
            f"-U {parts.username}" if parts.username else "",
        ]
        createdb = " ".join(["createdb", *filter(None, options), parts.path.lstrip("/")])
        say(
            f"cannot use DATABASE_URL {redact(url)}: {reason}. Create the database (e.g. "
            f"`{createdb}`), fix the URL, or unset DATABASE_URL to let `make run` choose"
        )
        sys.exit(1)


#: Settings that ``var/run.env`` carries when they were given to the launcher (see run_env).
PASSED_THROUGH = (
    "CELERY_QUEUE",
    "WEBHOOKS_QUEUE",
    "CACHE_URL",
    "CACHE_KEY_PREFIX",
    "SAGA_PUMP_REDIS_URL",
    "SAGA_DEFINITION_MODULES",
    "WEBHOOKS_ALLOW_PRIVATE",
)


def choose_services(var_dir: Path) -> dict[str, str]:
    """Return DATABASE_URL and CELERY_BROKER_URL, and print one line saying which."""
    explicit_db = os.environ.get("DATABASE_URL", "")
    explicit_broker = os.environ.get("CELERY_BROKER_URL", "")
    pg_host = os.environ.get("SAGARUNNER_PG_HOST", "127.0.0.1")
    pg_port = int(os.environ.get("SAGARUNNER_PG_PORT", "5432"))
    redis_host = os.environ.get("SAGARUNNER_REDIS_HOST", "127.0.0.1")
    redis_port = int(os.environ.get("SAGARUNNER_REDIS_PORT", "6379"))
    sqlite_url = f"sqlite:///{var_dir / 'sagarunner.sqlite3'}"
    local_db = f"postgres://postgres@{pg_host}:{pg_port}/sagarunner"
    local_broker = f"redis://{redis_host}:{redis_port}/0"

    if explicit_db or explicit_broker:
        db_url = explicit_db or sqlite_url
        broker_url = explicit_broker or "filesystem://"
        say(
            f"services: database {redact(db_url)}"
            f"{' (DATABASE_URL)' if explicit_db else ' (embedded default)'}, "
            f"broker {redact(broker_url)}"
            f"{' (CELERY_BROKER_URL)' if explicit_broker else ' (embedded file broker)'}"
        )
        if explicit_db:
            refuse_unusable_database(explicit_db)
        return {"DATABASE_URL": db_url, "CELERY_BROKER_URL": broker_url}

    reason = ""
    if reachable(pg_host, pg_port) and reachable(redis_host, redis_port):
        try:
            create_database_if_missing(pg_host, pg_port, "postgres", "sagarunner")
        except Exception as exc:  # noqa: BLE001 - any failure means "fall back", with the reason
            reason = f"PostgreSQL at {pg_host}:{pg_port} refused us ({exc.__class__.__name__})"
        else:
            say(
                f"services: local PostgreSQL ({local_db}) and Redis ({local_broker}); "
                "set DATABASE_URL / CELERY_BROKER_URL to use others"
            )
            return {"DATABASE_URL": local_db, "CELERY_BROKER_URL": local_broker}
    else:
        reason = (
            f"no DATABASE_URL/CELERY_BROKER_URL and no PostgreSQL+Redis on "
            f"{pg_host}:{pg_port}/{redis_host}:{redis_port}"
        )
    say(
        f"services: embedded default, SQLite {var_dir / 'sagarunner.sqlite3'} + file broker "
        f"{var_dir / 'broker'} ({reason}); for trying the product, not for production"
    )
    return {"DATABASE_URL": sqlite_url, "CELERY_BROKER_URL": "filesystem://"}


# ---------------------------------------------------------------------------------------------
# 3. Secret, migrations, demo data
# ---------------------------------------------------------------------------------------------
def dev_secret_key(var_dir: Path) -> str:
    path = var_dir / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


def manage(env: dict[str, str], *args: str, capture: bool = False) -> str:
    """Run a management command; if it fails, stop with one line (its own error is above it),
    not with this script's traceback on top."""
    result = subprocess.run(
        [sys.executable, str(REPO / "manage.py"), *args],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE if capture else None,
    )
    if result.returncode != 0:
        if capture and result.stdout:
            print(result.stdout, end="", flush=True)
        how = (
            f"exit status {result.returncode}"
            if result.returncode > 0
            else f"killed by signal {-result.returncode}"
        )
        say(f"`manage.py {args[0]}` failed ({how}), see above; stopping")
        sys.exit(result.returncode if result.returncode > 0 else 128 - result.returncode)
    return result.stdout if capture else ""


def write_env_file(path: Path, values: dict[str, str]) -> None:
    """``KEY=value`` lines a shell sources (``set -a; . var/run.env``): each value quoted, since
    some are what the user typed (a ``CACHE_URL`` with ``&`` in its query string)."""
    lines = [f"{key}={shlex.quote(value)}" for key, value in sorted(values.items())]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)


# ---------------------------------------------------------------------------------------------
# 4. The process group
# ---------------------------------------------------------------------------------------------
def procfile(port: int) -> str:
    """Each process runs under scripts/supervise.py: one that dies is started again (with a
    backoff and a log line) while the others keep serving, instead of honcho stopping all.
    The worker runs without gossip, mingle and heartbeat: a single worker has no peers to
    talk to, and their broadcast channels only add reconnect errors when the broker restarts."""
    python = sys.executable
    keep = f"{python} {REPO / 'scripts' / 'supervise.py'}"
    return (
        f"web: exec {keep} web -- {python} -m gunicorn config.wsgi --bind 0.0.0.0:{port} "
        "--workers 2 --threads 4 --access-logfile - --graceful-timeout 5\n"
        f"worker: exec {keep} worker -- {python} -m celery -A config worker -l info "
        "--concurrency 2 --without-gossip --without-mingle --without-heartbeat\n"
        f"beat: exec {keep} beat -- {python} -m celery -A config beat -l info\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="choose services, migrate and seed, write var/run.env; do not start processes",
    )
    parser.add_argument(
        "--migrate-only",
        action="store_true",
        help="choose services and apply migrations, nothing else (make migrate)",
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="use the running interpreter as is: do not create or refresh .venv",
    )
    args = parser.parse_args()

    if not args.no_install:
        ensure_venv()

    var_dir = Path(os.environ.get("SAGARUNNER_VAR_DIR", REPO / "var")).resolve()
    var_dir.mkdir(parents=True, exist_ok=True)
    port = int(os.environ.get("SAGARUNNER_PORT", "8000"))

    if not (args.prepare_only or args.migrate_only):
        refuse_busy_port(port)
    chosen = choose_services(var_dir)
    # prometheus_client's multiprocess files describe the processes of one run only, so a run
    # starts with none; one directory per port, so that another run beside this one (another
    # SAGARUNNER_PORT, as the busy-port message suggests) neither deletes the files of the one
    # still serving nor adds its processes to that one's /metrics. Only a launch that will
    # serve, or prepare for serving, on a free port empties it: `make migrate` and
    # `--prepare-only` beside a run serving on this port leave that run's files alone.
    metrics_dir = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR", var_dir / "metrics" / str(port)))
    if not args.migrate_only and port_taken(port) is None:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True, exist_ok=True)
    run_env = {
        # Given to make run by hand, these decide where work and state go: a manage.py command
        # run with run.env but without them (saga_migrate, say) would ring doorbells on a
        # queue no worker of this run reads, or miss the sagas of the definitions it loads.
        **{name: os.environ[name] for name in PASSED_THROUGH if os.environ.get(name)},
        **chosen,
        "SECRET_KEY": os.environ.get("SECRET_KEY") or dev_secret_key(var_dir),
        "DEBUG": os.environ.get("DEBUG", "1"),
        "SAGARUNNER_VAR_DIR": str(var_dir),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "LOG_FORMAT": os.environ.get("LOG_FORMAT", "console"),
        "DJANGO_SETTINGS_MODULE": "config.settings",
    }
    env = {**os.environ, **run_env, "PYTHONUNBUFFERED": "1"}
    # Remembered for `--prepare-only` callers and for running manage.py by hand:
    #   set -a; . var/run.env; set +a
    write_env_file(var_dir / "run.env", run_env)

    # The preparing commands count in a directory of their own, thrown away: their counters
    # are nobody's (in the port's directory they would add to a serving run's /metrics).
    with tempfile.TemporaryDirectory(prefix="prepare-", dir=metrics_dir.parent) as scratch:
        preparing = {**env, "PROMETHEUS_MULTIPROC_DIR": scratch}
        manage(preparing, "migrate", "--noinput", "-v", "0" if not args.migrate_only else "1")
        if args.migrate_only:
            return
        manage(preparing, "seed_demo")
        # --demo: this token replaces every demo token printed before on this database, a
        # running instance's too: one is live, the last printed. The command says on stderr
        # (passed through) when it revoked any, so a first run claims nothing.
        token = manage(preparing, "issue_token", "demo-client", "--demo", capture=True).strip()
    say(f"client API token (user demo-client): {token}")
    say(
        "  place an order: curl -X POST -H 'Content-Type: application/json' "
        f"-H 'Authorization: Token {token}' -d '"
        '{"items": [{"sku": "SR-MUG", "quantity": 1}], "payment_method": "pm_card_visa", '
        '"shipping_address": {"name": "Ada", "line1": "1 Main St", "city": "London", '
        '"postal_code": "SW1", "country": "GB"}}'
        f"' http://localhost:{port}/api/v1/orders/"
    )
    say(
        f"  then list it: curl -H 'Authorization: Token {token}' http://localhost:{port}/api/v1/orders/"
    )
    if args.prepare_only:
        say(f"prepared; environment in {var_dir / 'run.env'}")
        return

    say(f"starting web (http://localhost:{port}/, ops console /admin/), worker and beat; Ctrl-C")
    procfile_path = var_dir / "Procfile"
    procfile_path.write_text(procfile(port))
    os.chdir(REPO)
    os.environ.clear()
    os.environ.update(env)
    serve(procfile_path)


class _MainProcessFirst:
    """honcho's process manager, but a stop request goes to each main process only.

    honcho sends SIGTERM to each process *group*. A Celery worker must get it alone: it then
    finishes its current tasks and stops its own pool (its warm shutdown). Killed together
    with its pool, it can wait forever for children that are already gone. SIGKILL, the last
    resort after ``KILL_WAIT``, still goes to the whole group.
    """

    def __init__(self) -> None:
        from honcho.compat import ProcessManager

        self._honcho = ProcessManager()

    def terminate(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)

    def kill(self, pid: int) -> None:
        self._honcho.kill(pid)


def serve(procfile_path: Path) -> None:
    """Run the Procfile under honcho in this (foreground) process until Ctrl-C."""
    import honcho.command
    import honcho.manager

    # A worker's warm shutdown (finish the running step, stop the pool) takes a few seconds,
    # longer on the file broker; honcho's default patience is 5 s.
    honcho.manager.KILL_WAIT = 30
    honcho.manager.ProcessManager = _MainProcessFirst
    honcho.command.main(
        ["start", "--procfile", str(procfile_path), "--app-root", str(REPO), "--env", os.devnull]
    )


if __name__ == "__main__":
    main()
