"""The OpenAPI schema validates, and the running API keeps to it (schemathesis).

The schemathesis run generates several hundred requests from the live schema (valid ones,
invalid ones and the schema's examples) against the WSGI application, authenticated as a
client and as ops staff, and fails on any 5xx, any status code the schema does not document,
and any response whose body, content type or headers do not match the schema. It runs as one
test per operation (pytest-xdist spreads them; one run of all 27 took about four minutes on
one process), and a test of its own checks that those tests cover the whole schema.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
from collections import Counter

import pytest
import schemathesis
from django.core.management import call_command
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.urls import get_resolver
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from config import api as config_api
from config.wsgi import application
from sagas.models import Saga

from .conftest import api_client_for, make_product, order_body

pytestmark = pytest.mark.django_db

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
#: Generated cases per operation, per generation mode, per user.
EXAMPLES = 6
#: Every operation of the schema (a test below checks this against the live schema), with
#: the statuses its run reaches: past the front door to the view, successes and refusals both
#: (the generation is derandomized, so each run sends the same cases).
STATUSES: dict[str, set[int]] = {
    "GET /api/v1/auth/token/": {200},
    "DELETE /api/v1/auth/token/": {204, 401},
    "GET /api/v1/orders/": {200, 400, 404},
    "POST /api/v1/orders/": {201, 400},
    "GET /api/v1/orders/{id}/": {200, 404},
    "POST /api/v1/orders/{id}/cancel/": {202, 404},
    "POST /api/v1/orders/{id}/signals/{name}/": {400, 404, 409},
    "GET /api/v1/orders/{id}/timeline/": {200, 404},
    "GET /api/v1/products/": {200, 404},
    "POST /api/v1/products/": {201, 400, 403},
    "GET /api/v1/products/{sku}/": {200, 404},
    "PATCH /api/v1/products/{sku}/": {200, 400, 403, 404},
    "GET /api/v1/sagas/": {200, 400, 403, 404},
    "GET /api/v1/sagas/{id}/": {200, 403, 404},
    "POST /api/v1/sagas/{id}/compensate/": {202, 400, 403, 404},
    "GET /api/v1/sagas/{id}/compensation-plan/": {200, 403, 404},
    "POST /api/v1/sagas/{id}/resolve/": {400, 403, 404, 409},
    "POST /api/v1/sagas/{id}/retry/": {202, 403, 404},
    "POST /api/v1/sagas/{id}/signals/{name}/": {400, 404, 409},
    "POST /api/v1/sagas/{id}/undo-done/": {400, 403, 404, 409},
    "GET /api/v1/webhooks/": {200, 404},
    "POST /api/v1/webhooks/": {400},
    "GET /api/v1/webhooks/{id}/": {200, 404},
    "DELETE /api/v1/webhooks/{id}/": {204, 404},
    "POST /api/v1/webhooks/{id}/rotate-secret/": {200, 404},
    "GET /healthz": {200},
    "GET /metrics": {200},
}
OPERATIONS = list(STATUSES)


def test_the_schema_validates_without_warnings(tmp_path):
    """``manage.py spectacular --validate --fail-on-warn`` passes (OpenAPI 3 validator, and
    no operation drf-spectacular had to guess about)."""
    out = tmp_path / "schema.yaml"
    call_command(
        "spectacular", validate=True, fail_on_warn=True, file=str(out), stdout=io.StringIO()
    )
    text = out.read_text()
    assert "/api/v1/orders/{id}/cancel/:" in text
    assert "Idempotency-Key" in text


@contextlib.contextmanager
def wsgi_keeps_the_test_connection():
    """The real WSGI application closes "old" database connections at each request's start and
    end, which would close the test's connection in the middle of its transaction; Django's
    test client switches that off the same way (and back on after each of its requests, so
    this wraps only the schemathesis run)."""
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def live(customer, ops):
    """A catalog (with the schema example's sku), an order of the client and its saga."""
    make_product("SR-MUG", price="12.00", stock=10_000)
    make_product("lamp", price="19.90", stock=10_000)
    client = api_client_for(customer)
    order = client.post("/api/v1/orders/", order_body([("lamp", 1)]), format="json").json()
    return {
        "users": {
            "client": {"Authorization": f"Token {client.token}"},
            "staff": {"Authorization": f"Token {api_client_for(ops).token}"},
        },
        "ids": {
            "order": order["id"],
            "saga": str(Saga.objects.get(order__id=order["id"]).id),
            "webhook": client.post(
                "/api/v1/webhooks/",
                {"url": "https://93.184.215.14/hooks", "events": ["order.confirmed"]},
                format="json",
            ).json()["id"],
        },
    }


def _strategies(schema, operation, ids):
    """Valid and invalid cases, cases on existing objects, and the schema's examples."""
    path = operation.path
    real = {}
    if "{id}" in path:
        prefix = path.removeprefix("/api/v1/").split("/", 1)[0]
        real = {"id": ids.get({"sagas": "saga", "webhooks": "webhook"}.get(prefix, "order"))}
    elif "{sku}" in path:
        real = {"sku": "lamp"}
    strategies = [
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    ]
    if real:
        strategies.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=real))
        strategies.append(operation.as_strategy(GenerationMode.NEGATIVE, path_parameters=real))
    strategies += schema.get_strategies_from_examples(operation)
    if operation.method.upper() == "GET" and any(p.name == "page" for p in operation.query):
        # A page past the end (404) is generated or not depending on what the process
        # generated before (pytest-xdist decides which tests share one): sent always.
        past_the_end = operation.Case(path_parameters=real or None, query={"page": 9999})
        strategies.append(st.just(past_the_end))
    if operation.label == "POST /api/v1/products/":
        # The generated bodies that pass validation are few, and whether one is among a run's
        # cases depends on what the process generated before; a new product is sent always.
        body = {"sku": "SCHEMA-NEW-1", "name": "New item", "price": "1.00", "stock_on_hand": 1}
        strategies.append(st.just(operation.Case(body=body, media_type="application/json")))
    if operation.label.endswith("/signals/{name}/"):
        # Likewise a signal to the real saga that its wait could take but that it is not
        # waiting for (a 409): among the generated cases only the few with a real id, a known
        # name and a valid key and payload get that far, and some runs had none.
        body = {"payload": {"approved": True}}
        case = operation.Case(
            path_parameters={**real, "name": "3ds_confirmed"},
            body=body,
            media_type="application/json",
        )
        strategies.append(st.just(case))
    return strategies


def _runner(strategy, *, label: str, user: str, headers: dict, failures: list, sent: Counter):
    """One hypothesis run: each generated case is sent and checked; failures are collected
    (the first 20, as curl commands with the reason) instead of stopping the run."""

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case) -> None:
        sent[label] += 1
        try:
            response = case.call_and_validate(headers=headers, checks=CHECKS)
            sent[f"status {response.status_code}"] += 1
        except Exception as exc:  # noqa: BLE001 - collected and reported by the test
            if len(failures) < 20:
                failures.append(f"[{user}] {case.as_curl_command()}\n{exc}")

    return run


def test_every_operation_of_the_schema_is_checked():
    """The live-API check below runs once per operation, so pytest-xdist spreads its
    generation over its processes; together those runs still cover the whole schema: the
    parametrization is exactly the schema's operations (none missing, none stale), and between
    them they reach successes and refusals of every kind (200, 201, 202, 400, 404, 409), as
    the single whole-schema run did."""
    labels = [result.ok().label for result in _schema().get_all_operations()]
    assert len(labels) == len(set(labels)) == 27, labels
    assert sorted(labels) == sorted(OPERATIONS)
    reached = set().union(*STATUSES.values())
    assert reached >= {200, 201, 202, 400, 404, 409}, reached


@pytest.mark.parametrize("label", OPERATIONS)
def test_the_live_api_conforms_to_its_schema(live, label):
    """The operation, as a client and as ops staff: no 5xx, only documented status codes,
    bodies, content types and headers as documented; and the run reached the statuses listed
    for it in ``STATUSES`` (the view, not only the front door)."""
    with wsgi_keeps_the_test_connection():
        failures, sent = _run_schemathesis(live, label)
    statuses = {int(k.split()[1]) for k in sent if k.startswith("status ")}
    print(f"schemathesis {label}: {sent[label]} requests; {sorted(sent.items())}")
    assert not failures, f"{len(failures)} failing cases of {sent[label]}:\n\n" + "\n\n".join(
        failures
    )
    assert sent[label] >= 2, sent  # at least one request per user
    assert statuses >= STATUSES[label], sent


@functools.cache
def _schema():
    """The live schema, loaded once per test process."""
    return schemathesis.openapi.from_wsgi("/api/schema/?format=json", application)


def _run_schemathesis(live: dict, label: str) -> tuple[list[str], Counter]:
    schema = _schema()
    failures: list[str] = []
    sent: Counter = Counter()
    (operation,) = [
        result.ok() for result in schema.get_all_operations() if result.ok().label == label
    ]
    # Each operation's run has tokens of its own (the fixture is per test), so revoking one
    # (DELETE /api/v1/auth/token/) ends only that run's credentials.
    for user, headers in live["users"].items():
        for strategy in _strategies(schema, operation, live["ids"]):
            run = _runner(
                strategy,
                label=operation.label,
                user=user,
                headers=headers,
                failures=failures,
                sent=sent,
            )
            try:
                run()
            except Unsatisfiable:
                continue
    return failures, sent


def test_the_schema_documents_the_pages_the_api_takes(anon_api, client_api, catalog):
    """``page`` from 1 or ``last``, ``page_size`` from 1: a client built from the schema does
    not send ``page=0`` (a 400) believing it valid; and what it does send is served."""
    document = anon_api.get("/api/schema/?format=json").json()
    listed = document["paths"]["/api/v1/products/"]["get"]["parameters"]
    params = {p["name"]: p["schema"] for p in listed}
    assert params["page"] == {
        "oneOf": [{"type": "integer", "minimum": 1}, {"type": "string", "enum": ["last"]}]
    }
    assert params["page_size"] == {"type": "integer", "minimum": 1}
    for query in ("page=1&page_size=1", "page=last&page_size=1000"):
        assert client_api.get(f"/api/v1/products/?{query}").status_code == 200, query


def _api_view_classes() -> set[type]:
    """Every DRF view class the URLconf routes to."""
    found: set[type] = set()

    def walk(patterns) -> None:
        for pattern in patterns:
            if hasattr(pattern, "url_patterns"):
                walk(pattern.url_patterns)
            elif (cls := getattr(pattern.callback, "cls", None)) is not None:
                found.add(cls)

    walk(get_resolver().url_patterns)
    return found


def _opening(doc: str) -> str:
    """A docstring's first line, its spaces as one: what a description built from it starts
    with."""
    return " ".join(inspect.cleandoc(doc).splitlines()[0].split())


def test_every_operation_says_what_it_does_not_how_a_mixin_works(anon_api):
    """Each operation has a description of its own, for its users: none is the docstring of a
    class the view inherits from (drf-spectacular falls back on the first docstring up the
    view's MRO, and nine operations, listing orders to deleting a webhook, were described by
    ``config.api.BodyReadFirst``'s note on parsing bodies), nor that of any class of
    ``config.api``, where the API's shared pieces live."""
    inherited = {
        _opening(klass.__doc__)
        for view in _api_view_classes()
        for klass in view.__mro__[1:]
        if klass.__doc__ and klass.__doc__.strip()
    }
    inherited |= {
        _opening(klass.__doc__)
        for _, klass in inspect.getmembers(config_api, inspect.isclass)
        if klass.__module__ == config_api.__name__ and klass.__doc__
    }
    document = anon_api.get("/api/schema/?format=json").json()
    described = {}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if isinstance(operation, dict) and "responses" in operation:
                described[f"{method.upper()} {path}"] = " ".join(
                    operation.get("description", "").split()
                )
    assert sorted(described) == sorted(OPERATIONS)
    leaked = {
        label: opening
        for label, text in described.items()
        for opening in inherited
        if opening and opening in text
    }
    assert not leaked, leaked
    missing = sorted(label for label, text in described.items() if not text)
    assert not missing, missing
