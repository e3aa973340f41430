"""GET /healthz: 200 when the database and the broker answer, 503 naming what is down."""

import socket

import pytest
from django.db import connections


def closed_port() -> int:
    """A local TCP port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.django_db
def test_healthz_is_ok_when_database_and_broker_answer(client):
    """With PostgreSQL and Redis up, /healthz is 200 and says so per component."""
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok", "broker": "ok"}
    assert "no-cache" in response.headers["Cache-Control"]


@pytest.mark.django_db
@pytest.mark.parametrize("scheme", ["redis", "amqp"])
def test_healthz_is_503_naming_the_broker_when_the_broker_is_down(client, settings, scheme):
    """A broker URL pointing at a closed port makes /healthz 503 with broker unavailable."""
    settings.CELERY_BROKER_URL = f"{scheme}://127.0.0.1:{closed_port()}/0"

    response = client.get("/healthz")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["database"] == "ok"
    assert body["broker"] in {"unavailable", "timeout"}
    assert body["down"] == ["broker"]


@pytest.mark.django_db
def test_healthz_is_503_naming_the_database_when_the_database_is_down(client, monkeypatch):
    """A database at a closed port makes /healthz 503 with database unavailable."""
    # The check opens a fresh connection in its own thread, from these connection settings; the
    # test's own connection is already open and is not affected.
    monkeypatch.setitem(connections.settings["default"], "HOST", "127.0.0.1")
    monkeypatch.setitem(connections.settings["default"], "PORT", str(closed_port()))

    response = client.get("/healthz")

    assert response.status_code == 503
    body = response.json()
    assert body["database"] in {"unavailable", "timeout"}
    assert body["broker"] == "ok"
    assert body["down"] == ["database"]


@pytest.mark.django_db
def test_healthz_accepts_the_file_broker(client, settings, tmp_path):
    """The embedded default's filesystem:// broker counts as reachable."""
    folder = tmp_path / "broker"
    folder.mkdir()
    settings.CELERY_BROKER_URL = "filesystem://"
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(folder),
        "data_folder_out": str(folder),
    }

    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.json()["broker"] == "ok"


@pytest.mark.django_db
@pytest.mark.parametrize("method", ["post", "put", "delete"])
def test_healthz_answers_another_method_405_json(method):
    """Not the CSRF failure page (HTML, 403): the one error body, naming the method allowed."""
    from django.test import Client

    response = getattr(Client(enforce_csrf_checks=True), method)("/healthz")
    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD"
    assert response.json()["code"] == "method_not_allowed"


@pytest.mark.django_db
def test_healthz_checks_at_most_once_a_second_per_process(client, monkeypatch):
    """Anyone may call /healthz, and each check opens a database and a broker connection of
    its own: a loop of calls opened connections without end. Calls within a second share one
    check (reused here for a minute, so that the test does not race the clock), and a check
    about another database or broker is not reused."""
    from config import health

    ran = []
    real = dict(health.CHECKS)
    counted = {name: (lambda name=name: ran.append(name) or real[name]()) for name in real}
    monkeypatch.setattr(health, "CHECKS", counted)
    monkeypatch.setattr(health, "REUSE_SECONDS", 60.0)
    health._recent.forget()

    for _ in range(5):
        assert client.get("/healthz").status_code == 200
    assert sorted(ran) == ["broker", "database"]

    monkeypatch.setitem(connections.settings["default"], "PORT", str(closed_port()))
    assert client.get("/healthz").status_code == 503
