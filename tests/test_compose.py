"""The production-shaped stack (docker-compose.yml, Dockerfile) has the documented shape.

There is no Docker engine on these machines, so this reads the files: services, commands,
health checks and the order they start in.
"""

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
APP_SERVICES = ("web", "worker", "webhooks", "beat")


@pytest.fixture(scope="module")
def services() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]


def command_of(service: dict) -> str:
    command = service["command"]
    return command if isinstance(command, str) else shlex.join(command)


def test_compose_has_the_contracted_services(services):
    """db, redis, web, worker and beat (plus the one-shot migrate) are defined."""
    assert {"db", "redis", "web", "worker", "beat", "migrate"} <= set(services)


def test_database_is_postgres_with_a_pg_isready_health_check(services):
    """db is PostgreSQL 15 and reports healthy only when pg_isready says so."""
    db = services["db"]
    assert db["image"].startswith("postgres:15")
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])


def test_redis_has_a_ping_health_check(services):
    """redis reports healthy only when it answers PING."""
    assert services["redis"]["image"].startswith("redis")
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]


@pytest.mark.parametrize("name", [*APP_SERVICES, "migrate"])
def test_app_services_are_built_from_the_dockerfile_with_the_settings_they_need(services, name):
    """Each app service builds the Dockerfile and gets the URLs, a secret and the metrics dir."""
    service = services[name]
    assert service["build"] == {"context": ".", "dockerfile": "Dockerfile"}
    env = service["environment"]
    assert env["DATABASE_URL"].startswith("postgres://") and "@db:5432/" in env["DATABASE_URL"]
    assert env["CELERY_BROKER_URL"].startswith("redis://redis:6379")
    # No default secret: passed through as set (empty when unset) and checked by the image's
    # entrypoint when the container starts (test_entrypoint_* below).
    assert env["SECRET_KEY"] == "${SECRET_KEY:-}"
    # Its own metrics directory, never a volume shared with other containers.
    assert env["PROMETHEUS_MULTIPROC_DIR"]
    mounted = [str(v).split(":")[-1] for v in service.get("volumes", [])]
    assert env["PROMETHEUS_MULTIPROC_DIR"] not in mounted


def test_processes_run_the_contracted_commands(services):
    """web is gunicorn on config.wsgi, worker and beat are `celery -A config ...`."""
    assert command_of(services["web"]).startswith("gunicorn config.wsgi")
    assert "0.0.0.0:8000" in command_of(services["web"])
    assert command_of(services["worker"]).startswith("celery -A config worker")
    # Webhook deliveries have their own queue and worker, apart from saga steps.
    assert command_of(services["worker"]).endswith("-Q sagarunner")
    assert command_of(services["webhooks"]).startswith("celery -A config worker")
    assert command_of(services["webhooks"]).endswith("-Q sagarunner-webhooks")
    assert command_of(services["beat"]).startswith("celery -A config beat")
    assert command_of(services["migrate"]) == "python manage.py migrate --noinput"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_processes_start_after_healthy_services_and_completed_migrations(services, name):
    """web, worker and beat wait for healthy db/redis and a migrate run that exited 0."""
    assert services[name]["depends_on"] == {
        "db": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }
    assert services["migrate"]["depends_on"]["db"] == {"condition": "service_healthy"}
    assert services["migrate"]["restart"] == "no"


def test_web_is_health_checked_on_healthz(services):
    """The web container is healthy only when GET /healthz succeeds."""
    web = services["web"]
    assert "/healthz" in " ".join(web["healthcheck"]["test"])
    assert "8000:8000" in web["ports"]


def _dockerfile_lines() -> list[str]:
    return [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_dockerfile_builds_a_non_root_python_311_image_with_static_files():
    """python:3.11-slim, the project installed, collectstatic at build time, runs as a non-root
    user, every container through the entrypoint."""
    lines = _dockerfile_lines()
    text = "\n".join(lines)
    assert lines[0] == "FROM python:3.11-slim"
    assert "pip install --no-deps ." in text
    assert "manage.py collectstatic --noinput" in text
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}
    assert 'ENTRYPOINT ["/app/scripts/docker-entrypoint.sh"]' in lines


def test_dockerfile_installs_dependencies_in_a_layer_before_the_code():
    """Only pyproject.toml is copied before the dependencies are installed: a change to the
    code alone reuses that layer. The project itself is installed after its code, without
    dependencies."""
    lines = _dockerfile_lines()
    copies = [i for i, line in enumerate(lines) if line.startswith("COPY ")]
    assert lines[copies[0]] == "COPY pyproject.toml /app/"
    code = next(i for i in copies if lines[i] == "COPY . /app")
    deps = next(i for i, line in enumerate(lines) if "pip install -r" in line)
    assert copies[0] < deps < code
    project = next(i for i, line in enumerate(lines) if "pip install --no-deps ." in line)
    assert project > code


def test_compose_commands_work_without_secret_key():
    """No ${VAR:?...} anywhere: compose interpolates the whole file for every command, so one
    required variable made `docker compose down` and `logs` fail without SECRET_KEY."""
    text = (ROOT / "docker-compose.yml").read_text()
    assert not re.findall(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?\?", text)
    assert "metrics" not in (yaml.safe_load(text).get("volumes") or {})


@pytest.mark.parametrize("name", ["worker", "webhooks"])
def test_workers_serve_their_own_metrics_and_skip_gossip_and_mingle(services, name):
    """A worker container serves its counters on WORKER_METRICS_PORT (exposed to the
    network, for the scraper); it has no peers to gossip or mingle with, whose broadcast
    channels only add errors on every broker reconnect."""
    service = services[name]
    port = service["environment"]["WORKER_METRICS_PORT"]
    assert port in service["expose"]
    command = command_of(service)
    assert "--without-gossip" in command and "--without-mingle" in command


def _entrypoint(env: dict[str, str], *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(ROOT / "scripts" / "docker-entrypoint.sh"), *command],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_entrypoint_refuses_to_start_without_secret_key_in_one_line(tmp_path):
    done = _entrypoint({"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}, "echo", "started")
    assert done.returncode == 78
    assert "started" not in done.stdout
    assert done.stderr.count("\n") == 1 and "SECRET_KEY is not set" in done.stderr


def test_entrypoint_empties_the_containers_metrics_directory_then_runs_the_command(tmp_path):
    """Files of an earlier start (same pids, other processes) are gone before anything runs."""
    metrics = tmp_path / "metrics"
    (metrics / "old").mkdir(parents=True)
    (metrics / "counter_7.db").write_bytes(b"stale")
    (metrics / "old" / "histogram_7.db").write_bytes(b"stale")
    done = _entrypoint(
        {"SECRET_KEY": "x", "PROMETHEUS_MULTIPROC_DIR": str(metrics)},
        "sh",
        "-c",
        'ls -A "$PROMETHEUS_MULTIPROC_DIR"; echo started',
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "started\n"
    assert metrics.is_dir() and not list(metrics.iterdir())


def test_jaeger_runs_only_with_the_tracing_profile_and_apps_can_point_at_it(services):
    """`docker compose --profile tracing up` adds Jaeger (OTLP on 4318, UI on 16686); the
    apps trace only when OTEL_EXPORTER_OTLP_ENDPOINT is set, so a plain `up` does not."""
    jaeger = services["jaeger"]
    assert jaeger["profiles"] == ["tracing"]
    assert "4318:4318" in jaeger["ports"] and "16686:16686" in jaeger["ports"]
    for name in ("web", "worker", "beat"):
        env = services[name]["environment"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "${OTEL_EXPORTER_OTLP_ENDPOINT:-}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_processes_are_restarted_when_they_die(services, name):
    """A worker, beat or web container that exits on its own is started again by Docker."""
    assert services[name]["restart"] in ("unless-stopped", "always")
