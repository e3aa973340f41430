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


def render_metrics() -> tuple[bytes, str]:
    """The Prometheus exposition of every process's metrics plus the per-state gauges."""
    from providers.collector import BreakerCollector

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
    registry = CollectorRegistry()
    _FilesCollector(registry)
    start_http_server(port, registry=registry)
