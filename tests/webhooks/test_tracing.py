"""A webhook delivery of an order's news is a span in the trace of the order's saga."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sagas import doorbell, runner, tracing
from sagas.models import ACTIVE_STATES, Saga
from webhooks import delivery
from webhooks.delivery import deliver_endpoint

from .conftest import api_client_for, make_product, place, register

pytestmark = [pytest.mark.django_db(transaction=True)]


def test_a_delivery_continues_the_trace_of_the_request_that_placed_the_order(
    customer, catalog, receiver, monkeypatch, wait_for
):
    exporter, provider = _spans_in_this_process(monkeypatch)
    tracing.enable()
    try:
        client = api_client_for(customer)
        endpoint = register(client, receiver.url)
        with provider.get_tracer("test").start_as_current_span("POST /orders/") as request:
            order = place(client)
        for _ in range(20):  # run the saga here until it settles (its records emit the events)
            saga = Saga.objects.get(pk=order["saga"]["id"])
            if saga.state not in ACTIVE_STATES:
                break
            Saga.objects.filter(pk=saga.pk).update(next_attempt_at=None)
            runner.advance(saga.pk, saga.version)
        assert deliver_endpoint(endpoint["id"]) >= 1
    finally:
        tracing.enable(False)
    wait_for(receiver.accepted, timeout=30)
    spans = [s for s in exporter.get_finished_spans() if s.name == "webhook.deliver"]
    assert spans, [s.name for s in exporter.get_finished_spans()]
    assert {s.context.trace_id for s in spans} == {request.get_span_context().trace_id}
    assert spans[0].attributes["saga.id"] == order["saga"]["id"]
    assert spans[0].attributes["saga.webhook_endpoint"] == endpoint["id"]


def test_one_order_is_one_trace_from_its_request_to_its_webhook_deliveries(
    customer, receiver, monkeypatch, wait_for
):
    """The whole story of one order in one trace, its root the Django instrumentation's span of
    ``POST /api/v1/orders/``: the saga's tasks, step calls, the fraud review signal sent by a
    later request (its own trace, linked), the compensations the rejection runs, and the
    webhook deliveries of the order's news; every saga span says which saga, type, step and
    attempt it is."""
    from django.contrib.auth.models import Group
    from opentelemetry.instrumentation.django import DjangoInstrumentor
    from opentelemetry.trace import SpanKind

    make_product("safe", price="600.00", stock=10)  # two are above ORDER_FRAUD_REVIEW_ABOVE
    ops = type(customer).objects.create_user("analyst", is_staff=True)
    ops.groups.add(Group.objects.get(name="ops"))
    exporter, provider = _spans_in_this_process(monkeypatch)
    instrumentor = DjangoInstrumentor()
    instrumentor.instrument(tracer_provider=provider, skip_dep_check=True)
    tracing.enable()

    def run_saga(saga_id, *, until_parked: bool = False) -> Saga:
        for _ in range(30):
            saga = Saga.objects.get(pk=saga_id)
            if saga.state not in ACTIVE_STATES or (until_parked and saga.waiting_since):
                return saga
            Saga.objects.filter(pk=saga.pk).update(next_attempt_at=None)
            # Time limits as long as the carrier booking's: every step may run here.
            runner.advance(saga.pk, saga.version, timeout=60.0)
        raise AssertionError(f"saga {saga_id} did not settle")

    try:
        client, analyst = api_client_for(customer), api_client_for(ops)  # after instrument()
        endpoint = register(client, receiver.url)
        order = place(client, lines=[("safe", 2)])
        saga_id = order["saga"]["id"]
        assert run_saga(saga_id, until_parked=True).waiting_for == "fraud_review"
        response = analyst.post(
            f"/api/v1/sagas/{saga_id}/signals/fraud_review/",
            {"payload": {"approved": False}},
            format="json",
        )
        assert response.status_code == 202, response.content
        assert run_saga(saga_id).failure_code == "fraud_rejected"
        assert deliver_endpoint(endpoint["id"]) >= 1
    finally:
        tracing.enable(False)
        instrumentor.uninstrument()
    wait_for(receiver.accepted, timeout=30)

    finished = exporter.get_finished_spans()
    requests = {s.attributes["http.url"]: s for s in finished if s.kind == SpanKind.SERVER}
    placed = requests["http://testserver/api/v1/orders/"]
    signalled = requests[f"http://testserver/api/v1/sagas/{saga_id}/signals/fraud_review/"]
    trace_id = placed.context.trace_id
    assert signalled.context.trace_id != trace_id  # another request, another trace

    mine = [s for s in finished if s.attributes.get("saga.id") == saga_id]
    names = {s.name for s in mine}
    assert {
        "saga.task",
        "saga.step reserve_inventory",
        "saga.step authorize_payment",
        "saga.step arrange_shipment",
        "saga.step fraud_review",
        "saga.signal fraud_review",
        "saga.compensate arrange_shipment",
        "saga.compensate authorize_payment",
        "saga.compensate reserve_inventory",
        "webhook.deliver",
    } <= names, sorted(names)
    assert {s.context.trace_id for s in mine} == {trace_id}
    # The signal's span is in the saga's trace and links to the request that sent it.
    signal_span = next(s for s in mine if s.name == "saga.signal fraud_review")
    assert signalled.context.span_id in {link.context.span_id for link in signal_span.links}
    for span in mine:
        if span.name.startswith(("saga.step", "saga.compensate")):
            assert span.attributes["saga.type"] == "order", span.name
            assert span.attributes["saga.step"] == span.name.split(" ", 1)[1], span.name
            assert span.attributes["saga.attempt"] >= 1, span.name


def _spans_in_this_process(monkeypatch) -> tuple[InMemorySpanExporter, TracerProvider]:
    """Spans exported in memory, and no doorbells: this process runs the saga and delivers,
    so its spans are the whole trace."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    monkeypatch.setattr(doorbell, "ring", lambda *a, **k: None)
    monkeypatch.setattr(delivery, "ring", lambda *a, **k: None)
    return exporter, provider
