"""The production-shaped stack (docker-compose.yml, Dockerfile) has the contracted shape.

There is no Docker engine on these machines, so this reads the files: services, commands,
health checks and the order they start in.
"""

import re
import shlex
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
    # Required from the operator: no default secret in a production-shaped stack.
    assert re.fullmatch(r"\$\{SECRET_KEY:\?.+\}", env["SECRET_KEY"])
    assert f"metrics:{env['PROMETHEUS_MULTIPROC_DIR']}" in service["volumes"]


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


def test_dockerfile_builds_a_non_root_python_311_image_with_static_files():
    """python:3.11-slim, `pip install .`, collectstatic at build time, runs as a non-root user."""
    lines = [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    text = "\n".join(lines)
    assert lines[0] == "FROM python:3.11-slim"
    assert "pip install ." in text
    assert "manage.py collectstatic --noinput" in text
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}


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
