"""Start-up behaviour: SECRET_KEY refusal, and the embedded default `make run` falls back to."""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from lab.supervisor import Supervisor
from tests.conftest import ARTIFACTS_DIR, REPO_ROOT, database_url_for

# Variables the test session sets that a "fresh machine" would not have.
SESSION_ONLY = (
    "DATABASE_URL",
    "CELERY_BROKER_URL",
    "SECRET_KEY",
    "DEBUG",
    "TEST_DATABASE_NAME",
    "PROMETHEUS_MULTIPROC_DIR",
    "SAGARUNNER_VAR_DIR",
    "HTTPS_ONLY",
)


def fresh_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in SESSION_ONLY}
    env.update(extra)
    return env


def free_port() -> int:
    """A local TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def django_setup(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_settings_refuse_to_start_without_secret_key_when_debug_is_off(tmp_path):
    """DEBUG unset and SECRET_KEY unset: start-up fails with a message naming SECRET_KEY."""
    result = django_setup(fresh_env(SAGARUNNER_VAR_DIR=str(tmp_path)))

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert "SECRET_KEY is not set" in result.stderr


@pytest.mark.parametrize("hours", ["0", "23"])
def test_settings_refuse_to_keep_idempotency_keys_for_less_than_a_day(tmp_path, hours):
    """Clients are promised a day to retry an order under the same Idempotency-Key: a shorter
    retention (0 was taken, and the hourly purge then deleted every key) is refused at start."""
    result = django_setup(
        fresh_env(SAGARUNNER_VAR_DIR=str(tmp_path), SECRET_KEY="x", IDEMPOTENCY_KEY_TTL_HOURS=hours)
    )
    assert result.returncode != 0
    assert (
        f"IDEMPOTENCY_KEY_TTL_HOURS must be at least 24 (keys are kept at least a day), not {hours}"
        in result.stderr
    )


@pytest.mark.parametrize("seconds", ["0", "-5"])
def test_settings_refuse_a_request_body_timeout_that_is_not_positive(tmp_path, seconds):
    """A socket given no time at all would refuse every body, and a negative one is no wait."""
    result = django_setup(
        fresh_env(SAGARUNNER_VAR_DIR=str(tmp_path), SECRET_KEY="x", REQUEST_BODY_TIMEOUT=seconds)
    )
    assert result.returncode != 0
    assert (
        f"REQUEST_BODY_TIMEOUT must be a positive number of seconds, not {seconds}" in result.stderr
    )


def test_manage_py_without_secret_key_says_so_in_one_line(tmp_path):
    """``manage.py`` run without the environment ``make run`` writes (``var/run.env``): the
    message naming SECRET_KEY, not Django's traceback of the settings import above it."""
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=REPO_ROOT,
        env=fresh_env(SAGARUNNER_VAR_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("sagarunner: SECRET_KEY is not set."), result.stderr
    assert "Traceback" not in result.stderr


def test_settings_start_without_secret_key_in_debug(tmp_path):
    """DEBUG=1 without SECRET_KEY starts (with a throwaway development key)."""
    result = django_setup(fresh_env(DEBUG="1", SAGARUNNER_VAR_DIR=str(tmp_path)))

    assert result.returncode == 0, result.stderr


def test_settings_start_with_secret_key_and_debug_off(tmp_path):
    """A SECRET_KEY is all a production start needs."""
    result = django_setup(fresh_env(SECRET_KEY="x" * 50, SAGARUNNER_VAR_DIR=str(tmp_path)))

    assert result.returncode == 0, result.stderr


def test_log_level_is_taken_in_any_case_and_a_wrong_one_is_named(tmp_path):
    """``LOG_LEVEL=warning`` is WARNING (logging refused it: "Unknown level: 'warning'", a
    traceback about the celery logger); a level that does not exist stops start-up saying so."""
    base = {"SECRET_KEY": "x" * 50, "SAGARUNNER_VAR_DIR": str(tmp_path)}
    shown = subprocess.run(
        [
            sys.executable,
            "-c",
            "import django; django.setup(); "
            "import logging; print(logging.getLevelName(logging.getLogger().level))",
        ],
        cwd=REPO_ROOT,
        env=fresh_env(LOG_LEVEL=" warning ", **base),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip().splitlines()[-1] == "WARNING"

    wrong = django_setup(fresh_env(LOG_LEVEL="loud", **base))
    assert wrong.returncode != 0
    assert "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL" in wrong.stderr


@pytest.fixture
def services() -> Iterator[Supervisor]:
    """The launched processes, each in its own group logging to test-artifacts/; killed after."""
    supervisor = Supervisor(ARTIFACTS_DIR)
    yield supervisor
    supervisor.kill_all()


def _log_name(name: str) -> str:
    return f"embedded-{name}-{uuid.uuid4().hex[:6]}.log"


def read_env_file(path: Path) -> dict[str, str]:
    """What a shell that sources the file (``set -a; . var/run.env``) ends up with."""
    script = f'set -a; . "{path}"; set +a; env -0'
    shown = subprocess.run(
        ["bash", "-c", script], env={}, capture_output=True, text=True, check=True, timeout=30
    )
    pairs = (entry.split("=", 1) for entry in shown.stdout.split("\0") if "=" in entry)
    return {key: value for key, value in pairs if key not in ("PWD", "SHLVL", "_")}


def get_healthz(port: int) -> tuple[int, dict] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def test_launcher_says_in_one_line_that_a_named_database_does_not_exist(tmp_path):
    """An explicit DATABASE_URL naming a missing database: exit 1 with one line saying so and
    how to go on, no traceback (the launcher only creates a database it chose itself)."""
    from django.db import connection

    missing = {**connection.settings_dict, "NAME": f"sagarunner_missing_{os.getpid()}"}
    prepared = subprocess.run(
        [sys.executable, "scripts/run.py", "--prepare-only", "--no-install"],
        cwd=REPO_ROOT,
        env=fresh_env(
            SAGARUNNER_VAR_DIR=str(tmp_path / "var"),
            DATABASE_URL=database_url_for(missing),
            CELERY_BROKER_URL="redis://127.0.0.1:6379/15",
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert prepared.returncode == 1, prepared.stdout + prepared.stderr
    assert "Traceback" not in prepared.stdout + prepared.stderr
    [line] = [line for line in prepared.stdout.splitlines() if "cannot use DATABASE_URL" in line]
    assert f'"{missing["NAME"]}" does not exist' in line and "createdb" in line


@pytest.mark.django_db(transaction=True)
def test_launcher_stops_with_one_line_when_a_management_command_fails(tmp_path):
    """The deploy check refusing the database (an unfinished saga of a type nothing registers,
    as an interrupted benchmark leaves): the check's own error, then one line, no traceback."""
    from django.db import connection

    from sagas.models import Saga

    Saga.objects.create(saga_type="gone", definition_version=1, current_step="s1")
    prepared = subprocess.run(
        [sys.executable, "scripts/run.py", "--prepare-only", "--no-install"],
        cwd=REPO_ROOT,
        env=fresh_env(
            SAGARUNNER_VAR_DIR=str(tmp_path / "var"),
            DATABASE_URL=database_url_for(connection.settings_dict),
            CELERY_BROKER_URL="redis://127.0.0.1:6379/15",
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = prepared.stdout + prepared.stderr
    assert prepared.returncode == 1, output
    assert "Traceback" not in output
    assert "1 unfinished 'gone' saga run on version 1" in output
    [line] = [line for line in prepared.stdout.splitlines() if "failed (exit status 1)" in line]
    assert line.startswith("sagarunner: `manage.py migrate` failed")


@pytest.mark.django_db(transaction=True)
def test_each_launch_revokes_the_demo_token_the_last_one_printed(tmp_path, django_user_model):
    """Each `make run` prints a new demo-client token (the old one is stored hashed and cannot
    be shown again). It left the last run's live for its 90 days, one more every run; now it
    revokes it: after two launches the first token is refused, the second works, and a token
    demo-client was issued by hand before is still valid. Only the launch that revoked one
    says so (the first said "the last run's is revoked" with nothing to revoke)."""
    from django.db import connection
    from rest_framework.test import APIClient

    from accounts.tokens import token_issue

    env = fresh_env(
        SAGARUNNER_VAR_DIR=str(tmp_path / "var"),
        DATABASE_URL=database_url_for(connection.settings_dict),
        CELERY_BROKER_URL="redis://127.0.0.1:6379/15",
    )
    own = django_user_model.objects.create_user("demo-client")
    _, by_hand = token_issue(user=own)

    notes: list[str] = []

    def launch() -> str:
        prepared = subprocess.run(
            [sys.executable, "scripts/run.py", "--prepare-only", "--no-install"],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert prepared.returncode == 0, prepared.stdout + prepared.stderr
        found = re.search(r"client API token \(user demo-client\): (\S+)", prepared.stdout)
        assert found, prepared.stdout
        # The launcher's own lines (stdout), and the note issue_token writes on stderr (the
        # log lines there, the audit's token.revoked among them, start otherwise).
        said = [line for line in prepared.stdout.splitlines() if "revoked" in line.lower()]
        said += [line for line in prepared.stderr.splitlines() if line.startswith("Revoked")]
        notes.append("\n".join(said))
        return found.group(1)

    def status(token: str) -> int:
        api = APIClient()
        api.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        return api.get("/api/v1/orders/").status_code

    first = launch()
    assert status(first) == 200
    second = launch()
    assert second != first
    assert (status(first), status(second), status(by_hand)) == (401, 200, 200)
    assert own.auth_token_set.count() == 2
    assert notes[0] == ""
    assert notes[1].startswith("Revoked 1 earlier demo token of demo-client: "), notes[1]


@pytest.mark.worker
def test_launcher_falls_back_to_sqlite_and_the_file_broker_and_they_work(
    tmp_path, services, wait_for
):
    """No service URLs and nothing on the standard ports: the launcher says it uses the embedded
    default, prepares SQLite + the file broker under var/, and then web answers /healthz 200 and a
    real worker executes a task sent through the file broker (seen in the SQLite file)."""
    var_dir = tmp_path / "var"
    launcher_env = fresh_env(
        SAGARUNNER_VAR_DIR=str(var_dir),
        # Point the standard local ports at closed ones: "no PostgreSQL, no Redis here".
        SAGARUNNER_PG_PORT=str(free_port()),
        SAGARUNNER_REDIS_PORT=str(free_port()),
    )

    prepared = subprocess.run(
        [sys.executable, "scripts/run.py", "--prepare-only", "--no-install"],
        cwd=REPO_ROOT,
        env=launcher_env,
        capture_output=True,
        text=True,
        timeout=180,
    )

    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    service_lines = [line for line in prepared.stdout.splitlines() if "services:" in line]
    assert len(service_lines) == 1 and "embedded default" in service_lines[0]
    assert "demo-staff" in prepared.stdout
    chosen = read_env_file(var_dir / "run.env")
    assert chosen["DATABASE_URL"] == f"sqlite:///{var_dir / 'sagarunner.sqlite3'}"
    assert chosen["CELERY_BROKER_URL"] == "filesystem://"
    assert (var_dir / "secret_key").read_text().strip() == chosen["SECRET_KEY"]
    run_env = {**launcher_env, **chosen}

    port = free_port()
    web = services.start(
        "web",
        [sys.executable, "-m", "gunicorn", "config.wsgi", "--bind", f"127.0.0.1:{port}"],
        env=run_env,
        log_name=_log_name("web"),
    )
    worker = services.start(
        "worker",
        [sys.executable, "-m", "celery", "-A", "config", "worker", "-l", "info", "-c", "1"],
        env=run_env,
        log_name=_log_name("worker"),
    )

    health = wait_for(
        lambda: get_healthz(port), timeout=60, describe=lambda: (get_healthz(port), web.log_tail())
    )
    assert health == (200, {"status": "ok", "database": "ok", "broker": "ok"})
    assert_plain_http_works(port, prepared.stdout)

    marker = f"embedded-{uuid.uuid4().hex}"
    sent = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "config", "call", "config.ping_db"]
        + ["--args", json.dumps([marker])],
        cwd=REPO_ROOT,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert sent.returncode == 0, sent.stderr

    def marker_row() -> bool:
        with sqlite3.connect(var_dir / "sagarunner.sqlite3", timeout=5) as db:
            return db.execute("SELECT 1 FROM auth_group WHERE name = ?", [marker]).fetchone()

    wait_for(marker_row, timeout=60, describe=worker.log_tail)


def assert_plain_http_works(port: int, launcher_output: str) -> None:
    """What `make run` prints works over plain http on localhost (DEBUG on, so HTTPS_ONLY is
    off): the console's login page is served, not redirected to https, without HSTS; its CSRF
    cookie is not Secure (else a browser never sends it back over http and every login is a
    403), so the printed demo staff login gets in; the printed client token reads the API.
    /healthz alone would not show this: it is exempt from the https redirect."""
    base = f"http://127.0.0.1:{port}"
    password = re.search(r"demo-staff / (\S+)", launcher_output)
    token = re.search(r"client API token \(user demo-client\): (\S+)", launcher_output)
    assert password and token, launcher_output

    browser = requests.Session()
    page = browser.get(f"{base}/admin/login/", allow_redirects=False, timeout=30)
    assert page.status_code == 200, (page.status_code, page.headers.get("Location"))
    assert "Strict-Transport-Security" not in page.headers
    assert not any(cookie.secure for cookie in browser.cookies)
    logged_in = browser.post(
        f"{base}/admin/login/?next=/admin/",
        data={
            "csrfmiddlewaretoken": browser.cookies["csrftoken"],
            "username": "demo-staff",
            "password": password.group(1),
            "next": "/admin/",
        },
        allow_redirects=False,
        timeout=30,
    )
    assert (logged_in.status_code, logged_in.headers.get("Location")) == (302, "/admin/")
    assert browser.get(f"{base}/admin/", allow_redirects=False, timeout=30).status_code == 200

    products = requests.get(
        f"{base}/api/v1/products/",
        headers={"Authorization": f"Token {token.group(1)}"},
        allow_redirects=False,
        timeout=30,
    )
    assert products.status_code == 200, products.text


def _launch_without_serving(
    flag: str, var: Path, port: int, **extra: str
) -> subprocess.CompletedProcess:
    """``scripts/run.py FLAG`` (``--prepare-only``, ``--migrate-only``) on this session's
    database, with ``var`` as its var directory and ``port`` as its web port."""
    from django.db import connection

    return subprocess.run(
        [sys.executable, "scripts/run.py", flag, "--no-install"],
        cwd=REPO_ROOT,
        env=fresh_env(
            SAGARUNNER_VAR_DIR=str(var),
            SAGARUNNER_PORT=str(port),
            DATABASE_URL=database_url_for(connection.settings_dict),
            CELERY_BROKER_URL="redis://127.0.0.1:6379/15",
            **extra,
        ),
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.django_db(transaction=True)
def test_run_env_carries_the_queue_and_the_cache_given_to_make_run(tmp_path):
    """``CELERY_QUEUE=orders make run``: a manage.py command run afterwards with var/run.env
    (as the README says) sent its doorbells to the default queue, which no worker of that run
    read; the sagas moved only when the sweeper found them. run.env carries such settings."""
    var = tmp_path / "var"
    given = {
        "CELERY_QUEUE": "orders-q",
        # Sourced as the README says, an unquoted & ran the line in the background.
        "CACHE_URL": "redis://127.0.0.1:6379/14?socket_timeout=5&retry_on_timeout=true",
        "CACHE_KEY_PREFIX": "other app",
        "SAGA_DEFINITION_MODULES": "lab.bench_saga",
        "WEBHOOKS_ALLOW_PRIVATE": "1",
    }
    prepared = _launch_without_serving("--prepare-only", var, 8002, **given)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    run_env = read_env_file(var / "run.env")
    assert {name: run_env.get(name) for name in given} == given


@pytest.mark.django_db(transaction=True)
def test_a_launch_on_another_port_leaves_the_running_ones_metrics(tmp_path):
    """A second `make run` beside a running one (another SAGARUNNER_PORT, as the busy-port
    message suggests) deleted the whole metrics directory, the files the running instance's
    processes were writing among them. Each port has its own now: the other port's files stay,
    this port's stale ones from an earlier run go, and run.env names this port's."""

    var = tmp_path / "var"
    running = var / "metrics" / "8000" / "counter_4242.db"
    stale = var / "metrics" / "8001" / "counter_1.db"
    for path in (running, stale):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"written by a process of an earlier or running launch")
    prepared = _launch_without_serving("--prepare-only", var, 8001)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    assert running.exists()
    assert not stale.exists() and stale.parent.is_dir()
    assert f"PROMETHEUS_MULTIPROC_DIR={stale.parent}" in (var / "run.env").read_text()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("flag", ["--migrate-only", "--prepare-only"])
def test_migrate_or_prepare_beside_a_run_serving_on_its_port_leaves_its_metrics(tmp_path, flag):
    """`make migrate` (``--migrate-only``) or ``--prepare-only`` beside a `make run` serving on
    the same port emptied that run's metrics directory: its /metrics lost every count until it
    was restarted. A launch that will not serve leaves it alone, and its own commands count in
    a directory thrown away, so nothing of theirs adds to the serving run's counts."""

    var = tmp_path / "var"
    with socket.socket() as serving:  # what a running make run's web holds
        serving.bind(("0.0.0.0", 0))
        serving.listen()
        port = serving.getsockname()[1]
        running = var / "metrics" / str(port) / "counter_4242.db"
        running.parent.mkdir(parents=True)
        running.write_bytes(b"written by the serving run's web process")
        done = _launch_without_serving(flag, var, port)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(running.parent.iterdir()) == [running]
    assert sorted(p.name for p in (var / "metrics").iterdir()) == [str(port)]
