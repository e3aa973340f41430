"""``lost_response`` and ``crash`` promise the operation took effect before the caller lost its
answer: inside a transactional step (the inventory steps of the order saga) too, where the
effect would otherwise roll back with the step and the fault rehearse only an error.

Run in-process, as :mod:`tests.orders.test_order_round_trips` runs a saga, with the fault in
this process's settings.
"""

from __future__ import annotations

import json

import pytest
from django.db import transaction

from inventory.models import Product, Reservation, ReservationStatus
from providers import breaker
from sagas.definition import forward_key
from sagas.models import Saga, SagaState, SagaStep
from sagas.runner import advance
from tests import conftest
from tests.sagas.inprocess import out_of_workers_reach

from .conftest import make_product, place

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _in_process_only(settings):
    """No worker takes these sagas (see test_order_round_trips); one step per delivery."""
    settings.SAGA_INLINE_BUDGET = 0
    breaker._known_breakers.clear()
    breaker._known_slots.clear()
    worker = conftest._session_worker
    if worker is not None and worker.alive:
        worker.pause_consuming()
    yield
    if worker is not None and worker.alive:
        worker.resume_consuming()


def test_a_lost_response_of_the_hold_leaves_the_hold_in_place_and_the_retry_finds_it(
    customer, settings
):
    make_product("widget", stock=5)
    with transaction.atomic():
        order = place(customer, [("widget", 2)])
        out_of_workers_reach(order.saga_id, 10_000)
    settings.SAGA_FAULTS = json.dumps({"inventory.reserve": {"lost_response": 1.0}})

    advance(order.saga_id, 10_000)

    saga = Saga.objects.get(pk=order.saga_id)
    assert (saga.state, saga.current_step) == (SagaState.RUNNING, "reserve_inventory")
    step = SagaStep.objects.get(saga=saga, name="reserve_inventory")
    assert step.attempts == 1 and "lost response" in step.last_error and step.maybe_effect
    # The effect took place: the hold is there, under the step's key.
    key = forward_key(saga.id, "reserve_inventory")
    assert Reservation.objects.get(key=key).status == ReservationStatus.HELD
    assert Product.objects.get(sku="widget").reserved == 2

    # The fault is gone; the retry asks again under the same key and gets the first answer.
    settings.SAGA_FAULTS = ""
    Saga.objects.filter(pk=saga.pk).update(next_attempt_at=None, lease_until=None)
    advance(saga.id, saga.version)
    assert SagaStep.objects.get(saga=saga, name="reserve_inventory").status == "succeeded"
    assert Reservation.objects.filter(key=key).count() == 1
    assert Product.objects.get(sku="widget").reserved == 2
