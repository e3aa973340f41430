"""Traces: every span of one saga is in the trace of the request that started it.

In this process with an in-memory exporter (the test drives the saga itself, no doorbells),
and across processes with a real worker configured only by ``OTEL_*`` variables (its console
exporter writes the spans to its log).
"""

from __future__ import annotations

import ast
import contextlib
import json
import re

import pytest
from django.contrib.auth.models import Group, User
from django.db import transaction
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from config.tracing import tracing_requested
from sagas import doorbell, runner, tracing
from sagas.models import Saga, SagaState
from sagas.services import saga_start
from sagas.signals import saga_signal
from tests.sagas.sagatypes import ensure_effects_table

pytestmark = [pytest.mark.django_db(transaction=True)]

_EXPORTER = InMemorySpanExporter()
_PROVIDER = TracerProvider()
_PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))


@pytest.fixture
def spans(monkeypatch, transactional_db):
    """Tracing on in this process, spans kept in memory; doorbells off (the test drives)."""
    ensure_effects_table()
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: _PROVIDER)
    monkeypatch.setattr(doorbell, "ring", lambda *a, **k: None)
    _EXPORTER.clear()
    tracing.enable()
    yield _EXPORTER
    tracing.enable(False)


def drive(saga_id, *, until_parked: bool = False) -> Saga:
    """Run the saga in this process until it settles (or parks at a wait)."""
    for _ in range(50):
        saga = Saga.objects.get(pk=saga_id)
        if saga.state != SagaState.RUNNING and saga.state != SagaState.COMPENSATING:
            return saga
        if until_parked and saga.waiting_since is not None:
            return saga
        Saga.objects.filter(pk=saga_id).update(next_attempt_at=None)  # due now
        runner.advance(saga_id, saga.version)
    raise AssertionError("the saga did not settle")


def test_every_span_of_a_saga_shares_the_trace_of_the_request_that_started_it(spans):
    ops = User.objects.create_user("tracer", is_staff=True)
    ops.groups.add(Group.objects.get(name="ops"))
    ops = User.objects.get(pk=ops.pk)
    tracer = _PROVIDER.get_tracer("test")
    with tracer.start_as_current_span("POST /api/v1/orders/") as request, transaction.atomic():
        saga = saga_start(saga_type="test_wait", data={"script": {"s2": ["transient", "ok"]}})
    trace_id = request.get_span_context().trace_id
    assert Saga.objects.get(pk=saga.pk).trace_context["traceparent"]
    assert drive(saga.pk, until_parked=True).waiting_for == "go"
    # The signal comes from another request (another trace): its span joins the saga's.
    with tracer.start_as_current_span("POST /api/v1/sagas/{id}/signals/go/"):
        saga_signal(saga_id=saga.pk, name="go", payload={}, user=ops)
    assert drive(saga.pk).state == SagaState.SUCCEEDED

    mine = [s for s in spans.get_finished_spans() if s.attributes.get("saga.id") == str(saga.pk)]
    names = [s.name for s in mine]
    assert "saga.task" in names and "saga.signal go" in names
    assert names.count("saga.step s2") == 2  # a retry is a span of its own, attempt 1 and 2
    assert {s.context.trace_id for s in mine} == {trace_id}
    step = next(s for s in mine if s.name == "saga.step s1")
    assert step.attributes["saga.type"] == "test_wait"
    assert step.attributes["saga.step"] == "s1" and step.attributes["saga.attempt"] == 1
    retried = [s for s in mine if s.name == "saga.step s2"]
    assert [s.attributes["saga.attempt"] for s in retried] == [1, 2]
    assert retried[0].status.status_code.name == "ERROR"


def test_compensations_are_spans_in_the_same_trace(spans):
    tracer = _PROVIDER.get_tracer("test")
    with tracer.start_as_current_span("request") as request, transaction.atomic():
        saga = saga_start(saga_type="test5", data={"script": {"s3": ["business:no"]}})
    assert drive(saga.pk).state == SagaState.COMPENSATED
    mine = [s for s in spans.get_finished_spans() if s.attributes.get("saga.id") == str(saga.pk)]
    assert {s.name for s in mine} >= {"saga.compensate s2", "saga.compensate s1"}
    assert {s.context.trace_id for s in mine} == {request.get_span_context().trace_id}


def test_tracing_is_off_unless_otel_variables_ask_for_it():
    assert not tracing_requested({})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318"})
    assert tracing_requested({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing_requested({"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing_requested(
        {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://jaeger:4318"}
    )
    assert tracing.saga_span("x", None) is tracing.saga_span("y", None)  # off: a shared no-op


@pytest.mark.worker
def test_a_real_worker_continues_the_trace_configured_by_otel_variables(
    spans, worker_factory, wait_for, monkeypatch
):
    monkeypatch.undo()  # doorbells on again: the worker runs this saga
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: _PROVIDER)
    worker = worker_factory(
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_BSP_SCHEDULE_DELAY": "200"},
        name="traced",
        exclusive=True,
    )
    tracer = _PROVIDER.get_tracer("test")
    with tracer.start_as_current_span("request") as request, transaction.atomic():
        saga = saga_start(saga_type="test5", data={})
    wait_for(lambda: Saga.objects.get(pk=saga.pk).state == SagaState.SUCCEEDED, timeout=60)
    want = f"0x{request.get_span_context().trace_id:032x}"

    def exported() -> list[dict]:
        # Celery hands a worker's stdout to its logger: each span is one log line whose event
        # is the span's JSON as a Python string literal.
        spans = []
        for literal in re.findall(r"event=('(?:[^'\\]|\\.)*')", worker.log_text()):
            text = ast.literal_eval(literal)
            if text.startswith('{\n    "name"'):
                with contextlib.suppress(ValueError):  # Celery's span: repr()-quoted values
                    spans.append(json.loads(text))
        mine = [s["name"] for s in spans if s["attributes"].get("saga.id") == str(saga.pk)]
        # Spans are exported as they end: the steps first, then the task span around them,
        # then Celery's span around that; wait for all three kinds the checks below read.
        done = (
            sum(name.startswith("saga.step") for name in mine) == 5
            and "saga.task" in mine
            and any(s["name"] == "run/sagas.run" for s in spans)
        )
        return spans if done else None

    exported_spans = wait_for(exported, timeout=30, describe=lambda: worker.log_text()[-2000:])
    mine = [s for s in exported_spans if s["attributes"].get("saga.id") == str(saga.pk)]
    assert {s["context"]["trace_id"] for s in mine} == {want}, mine
    # The psycopg instrumentation is on in the pool process: a step's SQL is its child.
    steps = {s["context"]["span_id"] for s in mine if s["name"].startswith("saga.step")}
    sql = [
        s
        for s in exported_spans
        if s["attributes"].get("db.system") == "postgresql" and s["parent_id"] in steps
    ]
    assert sql and {s["context"]["trace_id"] for s in sql} == {want}, exported_spans[-3:]
    # So is the Celery instrumentation: the task's own span (the doorbell's trace) is linked
    # from the saga.task span that continues the saga's trace.
    celery = {s["context"]["span_id"] for s in exported_spans if s["name"] == "run/sagas.run"}
    task = next(s for s in mine if s["name"] == "saga.task")
    assert {link["context"]["span_id"] for link in task["links"]} & celery, task
