"""OpenTelemetry set-up: the standard SDK, configured by the standard ``OTEL_*`` variables.

Off unless ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, ``console``) or an OTLP
endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``),
and always off with ``OTEL_SDK_DISABLED=true``. Everything else (service name, resource
attributes, sampler, batch sizes, headers) is read by the SDK itself from its own variables.

When on: a tracer provider with a batch span processor, and the Django, Celery and psycopg
instrumentations, each set up in the process that serves (gunicorn/runserver: at WSGI start;
a Celery pool process: after the fork, since the batch processor's thread would not survive
it). When off nothing is imported beyond this module, and the engine's own spans
(:mod:`sagas.tracing`) cost one boolean test.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the SDK is imported only when tracing is on
    from opentelemetry.sdk.trace.export import SpanExporter

_lock = threading.Lock()
_configured = False


def tracing_requested(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def _exporters() -> list[SpanExporter]:
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())  # endpoint, headers: from OTEL_EXPORTER_OTLP_*
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        elif name and name != "none":
            raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported exporter {name!r}")
    return exporters


def setup_tracing(role: str) -> bool:
    """Configure tracing for this process if the environment asks for it; idempotent.

    ``role`` (``web``, ``worker``, ``beat``) names the default service
    (``sagarunner-<role>``) when ``OTEL_SERVICE_NAME`` is not set. Returns whether tracing is on.
    """
    global _configured
    if not tracing_requested():
        return False
    with _lock:
        if _configured:
            return True
        from opentelemetry import trace
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        defaults = (
            {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: f"sagarunner-{role}"}
        )
        provider = TracerProvider(resource=Resource.create(defaults))
        for exporter in _exporters():
            provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        _instrument(role)
        from sagas import tracing as saga_tracing

        saga_tracing.enable()
        _configured = True
    return True


def _instrument(role: str) -> None:
    from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor

    PsycopgInstrumentor().instrument(skip_dep_check=True)
    if role == "web":
        from opentelemetry.instrumentation.django import DjangoInstrumentor

        DjangoInstrumentor().instrument()
    else:
        from opentelemetry.instrumentation.celery import CeleryInstrumentor

        CeleryInstrumentor().instrument()
