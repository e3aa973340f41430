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

from .conftest import api_client_for, place, register

pytestmark = [pytest.mark.django_db(transaction=True)]


def test_a_delivery_continues_the_trace_of_the_request_that_placed_the_order(
    customer, catalog, receiver, monkeypatch, wait_for
):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    # No doorbells: this process delivers, so its spans are the ones exported here.
    monkeypatch.setattr(doorbell, "ring", lambda *a, **k: None)
    monkeypatch.setattr(delivery, "ring", lambda *a, **k: None)
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
