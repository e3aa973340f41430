"""Prometheus metrics of the engine.

prometheus_client runs in multiprocess mode (settings export ``PROMETHEUS_MULTIPROC_DIR``), so
what every process sharing that directory records adds up: on one host (``make run``) the web
process's ``/metrics`` shows the workers' counters too. Where a worker has a directory of its
own (a container), it serves its counters itself on ``WORKER_METRICS_PORT``
(:func:`serve_worker_metrics`). Gauges of sagas per state are read from the database at scrape
time (the rows are the truth), by web only.
"""

from __future__ import annotations

import glob
import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily

SAGAS_STARTED = Counter("saga_started_total", "Sagas started", ["saga_type"])
SAGAS_FINISHED = Counter(
    "saga_finished_total",
    "Sagas that reached succeeded, compensated or needs_manual",
    ["saga_type", "outcome"],
)
STEP_LATENCY = Histogram(
    "saga_step_duration_seconds",
    "Time a step or compensation function took",
    ["saga_type", "step", "phase"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
STEP_RETRIES = Counter(
    "saga_step_retries_total",
    "Attempts that failed transiently and were retried",
    ["saga_type", "step", "phase"],
)
COMPENSATIONS = Counter(
    "saga_compensations_total", "Compensations that completed", ["saga_type", "step"]
)
STALE_DELIVERIES = Counter(
    "saga_stale_deliveries_total", "Task deliveries fenced off as stale or duplicate"
)
SWEEP_REDISPATCHED = Counter("saga_sweep_redispatched_total", "Sagas re-rung by the sweeper")
PUMP_CLAIMS = Counter(
    "saga_pump_claims_total", "Sagas a pump claimed from the database (no doorbell of their own)"
)
DOORBELLS_COALESCED = Counter(
    "saga_doorbells_coalesced_total", "Doorbells not sent because every pump slot was taken"
)
SWEEP_HELD_BACK = Counter(
    "saga_sweep_held_back_total",
    "Repeat re-rings the sweeper held back while the queue could still hold their doorbells",
)


class _SagaStateCollector:
    """Sagas per state, counted in the database when scraped."""

    def collect(self):
        from django.db.models import Count

        from sagas.models import Saga

        family = GaugeMetricFamily("saga_state_count", "Sagas per state", labels=["state"])
        counts = dict(Saga.objects.order_by().values_list("state").annotate(n=Count("id")))
        from sagas.models import SagaState

        for state in SagaState.values:
            family.add_metric([state], counts.get(state, 0))
        yield family


def parked_by_provider() -> dict[str, int]:
    """Active sagas waiting for a provider's breaker or limits, per provider."""
    from django.db.models import Count

    from sagas.models import ACTIVE_STATES, Saga

    return dict(
        Saga.objects.filter(state__in=ACTIVE_STATES)
        .exclude(parked_on="")
        .order_by()
        .values_list("parked_on")
        .annotate(n=Count("id"))
    )


class _FilesCollector(multiprocess.MultiProcessCollector):
    """prometheus_client's collector of every process's counter files, past an empty one.

    A process SIGKILLed between creating its file and sizing it (a pool child killed as its
    first counter moved) leaves a file of 0 bytes. prometheus_client cannot read one, and it
    failed every scrape from then on, ``/metrics`` a 500, until someone deleted the file. An
    empty file holds no sample: it is passed by.
    """

    def collect(self):  # prometheus_client's own signature
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            try:
                if os.path.getsize(path) > 0:
                    files.append(path)
            except OSError:  # gone since the listing (a dead process's files cleaned up)
                continue
        return self.merge(files, accumulate=True)


#: What a saga can finish as (``saga_finished_total``'s ``outcome``).
OUTCOMES = ("succeeded", "compensated", "needs_manual")
_declared = False


def declare_known_series() -> None:
    """Every counter series this process's saga types and providers can count, at zero.

    A labelled counter has no series until its first increment, so a scrape showed no
    ``saga_finished_total{outcome="needs_manual"}`` until the first saga needed a person:
    ``rate()`` or ``increase()`` over it saw nothing, the first one included (it came from
    absent to 1), and an alert on it could not fire for the first incident. Declared at zero in
    a process's own counter file; multiprocess mode adds files up, so a zero changes no sum.
    Histograms are left to fill as steps run (a zero series per bucket per step is noise).
    Once per process.
    """
    global _declared
    if _declared:
        return
    from providers import metrics as provider_metrics
    from providers.models import BreakerState
    from sagas.definition import registered_definitions

    providers: set[str] = set()
    for definition in registered_definitions():
        kind = definition.saga_type
        SAGAS_STARTED.labels(kind)
        for outcome in OUTCOMES:
            SAGAS_FINISHED.labels(kind, outcome)
        for step in definition.steps:
            STEP_RETRIES.labels(kind, step.name, "forward")
            if step.compensate is not None:
                STEP_RETRIES.labels(kind, step.name, "compensation")
                COMPENSATIONS.labels(kind, step.name)
            if step.provider:
                providers.add(step.provider)
    for provider in sorted(providers):
        for outcome in ("ok", "failed"):
            provider_metrics.CALLS.labels(provider, outcome)
        for state in BreakerState.values:
            provider_metrics.TRANSITIONS.labels(provider, state)
        for state in ("open", "half_open", "failing"):
            provider_metrics.PARKED.labels(provider, state)
        provider_metrics.CANARIES.labels(provider)
        for limit in ("in_flight", "rate"):
            provider_metrics.LIMITED.labels(provider, limit)
    _declared = True


def render_metrics() -> tuple[bytes, str]:
    """The Prometheus exposition of every process's metrics plus the per-state gauges."""
    from providers.collector import BreakerCollector

    declare_known_series()
    registry = CollectorRegistry()
    _FilesCollector(registry)
    registry.register(_SagaStateCollector())
    registry.register(BreakerCollector(parked=parked_by_provider))
    return generate_latest(registry), CONTENT_TYPE_LATEST


def serve_worker_metrics(port: int) -> None:
    """Serve this host's (container's) multiprocess counters on ``port``, from a thread.

    For a Celery worker's main process: its pool processes write their counters into
    ``PROMETHEUS_MULTIPROC_DIR``, and each scrape adds the files up. Only the counters: the
    database-backed gauges come from web's ``/metrics``, so a sum over targets counts them once.
    """
    declare_known_series()
    registry = CollectorRegistry()
    _FilesCollector(registry)
    start_http_server(port, registry=registry)
