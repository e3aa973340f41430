"""A worker with ``WORKER_METRICS_PORT`` serves its processes' counters itself.

In the compose stack every container has a metrics directory of its own (the same low pids in
different containers would otherwise write the same files), so web's ``/metrics`` cannot read
the workers' counters; each worker container is a scrape target of its own instead.
"""

from __future__ import annotations

import urllib.request

import pytest
from django.db import transaction

from lab.stack import spare_port
from sagas.models import Saga, SagaState
from sagas.services import saga_start
from tests.sagas.sagatypes import ensure_effects_table

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


def _scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            return answer.read().decode()
    except OSError:
        return None


def test_a_worker_serves_its_counters_on_its_metrics_port(worker_factory, wait_for):
    """A saga the worker ran shows in the worker's own /metrics; the database-backed gauges
    do not (web serves those, so a sum over all targets counts them once)."""
    ensure_effects_table()
    port = spare_port()
    worker_factory(env={"WORKER_METRICS_PORT": str(port)}, name="metrics", exclusive=True)
    with transaction.atomic():
        saga = saga_start(saga_type="test5", data={"script": {}})
    wait_for(
        lambda: Saga.objects.get(pk=saga.pk).state == SagaState.SUCCEEDED,
        timeout=60,
        describe=lambda: Saga.objects.values("state", "current_step").get(pk=saga.pk),
    )
    finished = 'saga_finished_total{outcome="succeeded",saga_type="test5"}'
    body = wait_for(lambda: (text := _scrape(port)) and finished in text and text, timeout=30)
    assert "saga_step_duration_seconds_bucket" in body
    assert "saga_state_count" not in body
