"""The engine's spans: one trace per saga, from the request that started it to its last step.

``saga_start`` stores the W3C trace context of the request that starts a saga in
``Saga.trace_context``; every task that claims the saga, every step call and compensation,
and every signal then opens its span as a child of that stored context, so one trace holds
the saga's whole story however many workers, retries and days it took. Spans carry
``saga.id``, ``saga.type``, ``saga.step`` and ``saga.attempt``; where the span's own trigger
(a Celery task, a signal's HTTP request) belongs to another trace, the span links to it.

Anything else that acts for a saga later (a webhook delivery of its order's news, say) joins
the same trace by opening ``saga_span("webhook.deliver", saga, ...)`` around its work.

Tracing is off unless :func:`config.tracing.setup_tracing` turned it on for this process:
then every function here returns at once (a shared no-op context manager), so the engine's
hot path pays one boolean test per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

_enabled = False
_NOOP = contextlib.nullcontext()


def enable(on: bool = True) -> None:
    """Turn the engine's spans on (``config.tracing`` does, once the SDK is set up)."""
    global _enabled
    _enabled = on


def is_enabled() -> bool:
    return _enabled


def current_carrier() -> dict[str, str]:
    """The current trace context as W3C headers (``traceparent``...), to store with a saga."""
    if not _enabled:
        return {}
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def saga_span(name: str, saga: Any, *, step: str = "", **attributes: Any):
    """A span in the saga's trace (a context manager); a shared no-op when tracing is off."""
    if not _enabled:
        return _NOOP
    return _span(name, saga, step, attributes)


@contextlib.contextmanager
def _span(name: str, saga: Any, step: str, attributes: dict[str, Any]) -> Iterator[Any]:
    from opentelemetry import propagate, trace

    parent = propagate.extract(saga.trace_context or {})
    here = trace.get_current_span().get_span_context()
    links = []
    if (
        here.is_valid
        and here.trace_id != trace.get_current_span(parent).get_span_context().trace_id
    ):
        links.append(trace.Link(here))
    attrs = {
        "saga.id": str(saga.id),
        "saga.type": saga.saga_type,
        "saga.step": step or saga.current_step,
        "saga.attempt": int(saga.attempt or 0),
        **{f"saga.{k}": v for k, v in attributes.items() if v is not None},
    }
    tracer = trace.get_tracer("sagarunner.sagas")
    with tracer.start_as_current_span(
        name, context=parent if saga.trace_context else None, attributes=attrs, links=links
    ) as span:
        yield span
