"""Definition versions side by side, against real workers.

The ``ver`` type (:mod:`tests.sagas.sagatypes`) has v1 ``a, b, c`` and v2 ``a, check, b, c``
(a step inserted), ``c`` the pivot. A worker started with ``TEST_SAGA_WITHOUT=ver:1`` plays a
deploy whose code no longer has v1.
"""

from __future__ import annotations

import pytest
from django.db import transaction

from sagas.doorbell import ring
from sagas.models import Saga, SagaState, SagaStep
from sagas.services import saga_start
from tests.sagas.sagatypes import VER_V1, VER_V2, effects, ensure_effects_table

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _effects_table(transactional_db):
    ensure_effects_table()


def start(version=None, script=None) -> Saga:
    with transaction.atomic():
        return saga_start(saga_type="ver", data={"script": script or {}}, version=version)


def finished(saga_id, wait_for, timeout=60) -> Saga:
    def check():
        saga = Saga.objects.get(pk=saga_id)
        return saga if saga.state not in (SagaState.RUNNING, SagaState.COMPENSATING) else None

    return wait_for(
        check,
        timeout=timeout,
        describe=lambda: (
            Saga.objects.filter(pk=saga_id)
            .values("state", "definition_version", "current_step", "attempt", "last_error")
            .first()
        ),
    )


def ran(saga_id) -> list[str]:
    steps = Saga.objects.get(pk=saga_id).events.filter(kind="step_succeeded")
    return list(steps.order_by("id").values_list("step", flat=True))


def test_v1_sagas_keep_running_on_v1_beside_v2_and_new_ones_start_on_v2(celery_worker, wait_for):
    """With v1 and v2 registered, a saga started on v1 runs v1's steps (retries included)
    while new sagas start on v2 and run its inserted step."""
    old = start(version=1, script={"b": ["transient", "transient", "ok"]})
    new = start()
    assert (old.definition_version, new.definition_version) == (1, 2)
    assert old.definition_fingerprint != new.definition_fingerprint

    old, new = finished(old.id, wait_for), finished(new.id, wait_for)
    assert (old.state, new.state) == (SagaState.SUCCEEDED, SagaState.SUCCEEDED)
    assert ran(old.id) == VER_V1 and ran(new.id) == VER_V2
    assert effects(old.id) == {(name, "do"): 1 for name in VER_V1}
    assert effects(new.id) == {(name, "do"): 1 for name in VER_V2}
    steps = SagaStep.objects.filter(saga_id=old.id).order_by("index")
    assert [s.name for s in steps] == VER_V1


def test_a_worker_without_v1_leaves_v1_sagas_untouched(worker_factory, wait_for):
    """A worker whose code lacks v1 neither claims nor counts an attempt on a v1 saga (and
    does not crash); a worker that knows v1 runs it afterwards."""
    newer = worker_factory({"TEST_SAGA_WITHOUT": "ver:1"}, exclusive=True, concurrency=1)
    old = start(version=1)
    new = start(version=2)
    # One process takes the queue in order: the v1 doorbell was handled before v2's saga ran.
    assert finished(new.id, wait_for).state == SagaState.SUCCEEDED
    row = Saga.objects.get(pk=old.id)
    assert (row.state, row.current_step, row.attempt) == (SagaState.RUNNING, "a", 0)
    assert row.lease_until is None and row.version == old.version
    assert effects(old.id) == {}
    assert newer.alive and "Traceback" not in newer.log_text()

    newer.stop()  # else it may take the next doorbell too, and drop it again
    worker_factory(name="knows-v1")
    ring(old.id, old.version)
    assert finished(old.id, wait_for).state == SagaState.SUCCEEDED
    assert ran(old.id) == VER_V1
