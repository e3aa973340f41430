"""``/metrics`` (Prometheus text, no authentication) and ``/healthz`` next to the API."""

from __future__ import annotations

import pytest
from django.test import Client

from .conftest import assert_error

pytestmark = pytest.mark.django_db


def test_metrics_is_prometheus_text_with_the_saga_metrics(client_api, place):
    """Anyone may scrape /metrics: text exposition with sagas per state counted from the
    database (the engine's counters are checked after a real run, in test_lifecycle)."""
    place(client_api)
    response = Client().get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    text = response.content.decode()
    assert 'saga_state_count{state="running"} 1.0' in text
    assert 'saga_state_count{state="succeeded"} 0.0' in text
    for name in ("saga_state_count",):
        assert f"# TYPE {name}" in text
    assert Client().get("/metrics/").status_code == 200


@pytest.mark.parametrize("method", ["post", "put", "delete"])
def test_metrics_answers_another_method_405_json(method):
    """Not the CSRF failure page (HTML, 403): the one error body, naming the methods allowed,
    as /healthz does."""
    response = getattr(Client(enforce_csrf_checks=True), method)("/metrics")
    assert_error(response, 405, "method_not_allowed")
    assert response["Allow"] == "GET, HEAD"


def test_healthz_is_still_there_and_open(client_api):
    """/healthz answers without credentials (200 when the database and broker answer)."""
    response = Client().get("/healthz")
    assert response.status_code in (200, 503)
    assert response.json()["database"] == "ok"


def test_schema_and_docs_are_served(anon_api):
    """/api/schema/ (OpenAPI) and /api/docs/ (Swagger UI) are reachable without credentials."""
    schema = anon_api.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for path in (
        "/api/v1/products/",
        "/api/v1/products/{sku}/",
        "/api/v1/orders/",
        "/api/v1/orders/{id}/",
        "/api/v1/orders/{id}/timeline/",
        "/api/v1/orders/{id}/cancel/",
        "/api/v1/sagas/",
        "/api/v1/sagas/{id}/",
        "/api/v1/sagas/{id}/retry/",
        "/api/v1/sagas/{id}/compensate/",
        "/api/v1/sagas/{id}/resolve/",
        "/api/v1/sagas/{id}/compensation-plan/",
        "/healthz",
        "/metrics",
    ):
        assert path in paths, path
    docs = anon_api.get("/api/docs/")
    assert docs.status_code == 200
    assert b"swagger" in docs.content.lower()


def test_swagger_ui_is_served_locally_not_from_a_cdn(anon_api):
    """/api/docs/ loads Swagger UI from our own static files (drf-spectacular-sidecar), so the
    docs work on a machine without internet access."""
    html = anon_api.get("/api/docs/").content.decode()
    bundle = "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js"
    assert bundle in html
    assert "cdn.jsdelivr" not in html
    assert Client().get(bundle).status_code == 200


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/api/schema/?format=xml", {}, 404),  # no such format
        ("/api/schema/", {"HTTP_ACCEPT": "application/xml"}, 406),
        ("/api/docs/?format=xml", {}, 404),
    ],
)
def test_schema_and_docs_errors_are_the_apis_json(anon_api, path, headers, status):
    """The schema view renders YAML and the docs view HTML; an error of either is JSON in the
    one error shape all the same (it was YAML, served as the OpenAPI media type)."""
    assert_error(anon_api.get(path, **headers), status)


def test_schema_and_docs_throttled_answer_json(settings, anon_api):
    """Past the anonymous limit, the YAML schema and the Swagger page (and its script) answer
    429 as JSON with Retry-After, not YAML or an HTML page."""
    settings.API_RATE_LIMIT_ANON = "1/day"
    address = "203.0.113.77"
    assert anon_api.get("/api/schema/", REMOTE_ADDR=address).status_code == 200
    for path in ("/api/schema/", "/api/docs/", "/api/docs/?script="):
        response = anon_api.get(path, REMOTE_ADDR=address)
        assert_error(response, 429, "throttled")
        assert int(response["Retry-After"]) >= 1


def test_metrics_are_served_past_the_empty_file_of_a_process_killed_as_it_made_it():
    """A pool child SIGKILLed between creating its counter file and sizing it leaves 0 bytes;
    /metrics still answers, with the other processes' counters (it was a 500 from then on)."""
    import os
    from pathlib import Path

    empty = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]) / "counter_2147483646.db"
    empty.touch()
    try:
        response = Client().get("/metrics")
        assert response.status_code == 200
        assert "saga_state_count" in response.content.decode()
    finally:
        empty.unlink()


def test_metrics_show_every_known_counter_series_at_zero_before_it_counts(tmp_path):
    """A labelled counter had no series until its first increment: no
    ``saga_finished_total{outcome="needs_manual"}`` until a saga first needed a person, so
    ``increase()`` over it missed that first one and an alert on it could not fire. A new
    process (its own metrics directory, nothing counted) shows every series its saga types and
    providers can count, at zero."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT, _worker_env

    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    scrape = (
        "import django; django.setup(); from django.test import Client; "
        "print(Client().get('/metrics').content.decode())"
    )
    done = subprocess.run(
        [sys.executable, "-c", scrape],
        cwd=REPO_ROOT,
        env=_worker_env({"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    for line in (
        'saga_started_total{saga_type="order"} 0.0',
        'saga_finished_total{outcome="needs_manual",saga_type="order"} 0.0',
        'saga_finished_total{outcome="compensated",saga_type="order"} 0.0',
        'saga_step_retries_total{phase="compensation",saga_type="order",step="authorize_payment"}'
        " 0.0",
        'saga_compensations_total{saga_type="order",step="authorize_payment"} 0.0',
        'provider_calls_total{outcome="failed",provider="payments"} 0.0',
        'provider_breaker_transitions_total{provider="payments",to="open"} 0.0',
        'provider_parked_total{provider="shipping",state="failing"} 0.0',
        'provider_canaries_total{provider="payments"} 0.0',
        'provider_limited_total{limit="rate",provider="payments"} 0.0',
    ):
        assert line in text, (line, text[-3000:])


def test_metrics_are_rendered_at_most_once_in_their_reuse_window(client_api, place, settings):
    """Anyone may scrape /metrics, and a render counts every saga per state in the database:
    scrapes within ``METRICS_REUSE_SECONDS`` (a minute here, so the test does not race the
    clock) share one render, and with 0 every scrape renders afresh."""
    from config import metrics

    settings.METRICS_REUSE_SECONDS = 60.0
    metrics._recent.forget()
    first = Client().get("/metrics").content.decode()
    place(client_api)
    assert Client().get("/metrics").content.decode() == first
    settings.METRICS_REUSE_SECONDS = 0
    assert 'saga_state_count{state="running"} 1.0' in Client().get("/metrics").content.decode()
    assert 'saga_state_count{state="running"} 1.0' not in first
