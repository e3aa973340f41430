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
from django.utils import timezone

from inventory.models import Product, Reservation, ReservationStatus
from providers import outage
from providers.models import FakeProviderStatus
from sagas.definition import forward_key
from sagas.models import Saga, SagaState, SagaStep
from sagas.runner import advance
from sagas.store import StepTransaction
from sagas.transactions import commit_what_the_step_wrote, note_earlier_steps
from tests.sagas.inprocess import only_this_process, out_of_workers_reach

from .conftest import make_product, place

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _in_process_only(settings):
    """No worker takes these sagas; one step per delivery."""
    settings.SAGA_INLINE_BUDGET = 0
    with only_this_process():
        yield


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


def test_a_call_refused_by_an_outage_inside_a_transactional_step_is_still_counted(customer):
    """``provider_outage`` counts the calls the provider got while down; the hold's refused
    call is counted although its step's transaction rolls back."""
    make_product("widget", stock=5)
    with transaction.atomic():
        order = place(customer, [("widget", 1)])
        out_of_workers_reach(order.saga_id, 10_000)
    outage.start("inventory", 60)
    outage._read_at = float("-inf")  # this process reads the outage now, not in 0.25 s
    try:
        advance(order.saga_id, 10_000)
    finally:
        outage.end("inventory")
        outage._read_at = float("-inf")
    step = SagaStep.objects.get(saga=order.saga_id, name="reserve_inventory")
    assert "is down" in step.last_error
    assert not Reservation.objects.filter(order_id=order.id).exists()
    assert FakeProviderStatus.objects.get(provider="inventory").calls_while_down == 1


def test_the_faults_commit_is_only_for_a_step_transaction_holding_its_own_writes_alone():
    """Not inside a caller's transaction, not in a batch whose earlier steps' records are
    deferred: there the fault stays an error and their writes roll back with the step."""
    with transaction.atomic():  # a caller's transaction around the step's
        tx = StepTransaction(True)
        make_product("outer", stock=1)
        assert commit_what_the_step_wrote() is False
        tx.rollback()
        transaction.set_rollback(True)
    tx = StepTransaction(True)
    make_product("batched", stock=1)
    note_earlier_steps()  # as a batch does when it defers a step's record
    assert commit_what_the_step_wrote() is False
    tx.rollback()
    tx = StepTransaction(True)
    make_product("alone", stock=1)
    assert commit_what_the_step_wrote() is True
    tx.rollback()  # too late for the write: it was committed
    assert sorted(Product.objects.values_list("sku", flat=True)) == ["alone"]


def test_a_sale_whose_answer_is_lost_every_time_waits_for_a_person_who_confirms_it_once(
    customer, settings
):
    """The pivot's sale takes effect but its answer is lost on every attempt: the saga stops for
    a person at ``confirm_order`` with the stock sold. Resolving it confirms the order, and the
    stock is sold once, not again (the resolve's sale is a no-op under the step's key).
    Breakers off: with them, a provider that answers nobody but this saga looks down, and the
    saga waits on its breaker instead of spending its attempts (see test_provider_seam)."""
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group

    from orders.models import Order
    from orders.selectors import OrderStatus
    from sagas.services import saga_resolve

    settings.SAGA_PROVIDER_BREAKERS = False
    make_product("widget", stock=5)
    with transaction.atomic():
        order = place(customer, [("widget", 2)])
        out_of_workers_reach(order.saga_id, 10_000)
    version = 10_000
    for _ in range(30):  # each delivery runs one attempt
        saga = Saga.objects.get(pk=order.saga_id)
        if saga.state != SagaState.RUNNING:
            break
        if saga.current_step == "confirm_order":
            settings.SAGA_FAULTS = json.dumps({"inventory.commit": {"lost_response": 1.0}})
        Saga.objects.filter(pk=saga.pk).update(next_attempt_at=timezone.now())  # backoff over
        advance(order.saga_id, version)
        version = Saga.objects.get(pk=order.saga_id).version
    saga = Saga.objects.get(pk=order.saga_id)
    assert (saga.state, saga.failed_step) == (SagaState.NEEDS_MANUAL, "confirm_order")
    reservation = Reservation.objects.get(key=forward_key(saga.id, "reserve_inventory"))
    assert reservation.status == ReservationStatus.COMMITTED  # sold, though never answered
    widget = Product.objects.get(sku="widget")
    assert (widget.stock_on_hand, widget.reserved) == (3, 0)

    settings.SAGA_FAULTS = ""
    person = get_user_model().objects.create_user("ops-pat", is_staff=True)
    person.groups.add(Group.objects.get(name="ops"))
    saga_resolve(saga_id=saga.id, user=person, note="sold: confirmed by hand", accept_effects=True)
    assert Order.objects.get(pk=order.pk).status == OrderStatus.CONFIRMED
    widget = Product.objects.get(sku="widget")
    assert (widget.stock_on_hand, widget.reserved) == (3, 0)  # sold once
