"""Signals a saga would accept and never take are refused (409) instead, and waits that share
a signal's name must agree on who may send it and how its payload is checked. In-process, one
step per delivery."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Group, User
from django.utils import timezone

from sagas.definition import SagaDefinition, Wait, register, unregister
from sagas.exceptions import SagaOperationRefused
from sagas.models import Saga, SagaSignal, SagaState
from sagas.services import saga_request_cancel, saga_start
from sagas.signals import saga_signal
from tests.sagas.inprocess import deliver, one_step_per_delivery
from tests.sagas.sagatypes import scripted

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _setup(settings):
    one_step_per_delivery(settings, {})


@pytest.fixture
def ops():
    user = User.objects.create_user("ops-signaller", is_staff=True)
    user.groups.add(Group.objects.get(name="ops"))
    return User.objects.get(pk=user.pk)


def _parked(saga_type: str) -> Saga:
    saga = saga_start(saga_type=saga_type, data={"script": {}})
    deliver(saga.id)  # s1
    saga = deliver(saga.id)  # parks at await_go
    assert saga.waiting_for == "go"
    return saga


def _refused(saga: Saga, ops) -> str:
    with pytest.raises(SagaOperationRefused) as refused:
        saga_signal(saga_id=saga.id, name="go", payload={"ok": True}, user=ops)
    assert refused.value.code == "not_waiting"
    assert not SagaSignal.objects.filter(saga=saga).exists()
    return refused.value.detail


def test_a_signal_to_a_saga_being_cancelled_is_refused_not_kept_for_ever(ops):
    saga = _parked("test_wait")
    saga_request_cancel(saga_id=saga.id, reason="customer_cancelled", actor="test")
    assert "being cancelled" in _refused(saga, ops)
    saga = deliver(saga.id)
    assert saga.state == SagaState.COMPENSATING


def test_a_signal_after_a_compensating_waits_timeout_is_refused_though_no_worker_saw_it(ops):
    """The timer is due but no worker has fired it yet: the signal comes too late either way,
    and the saga compensates on its timeout as declared."""
    saga = _parked("test_wait")
    past = timezone.now() - timedelta(seconds=121)
    Saga.objects.filter(pk=saga.id).update(waiting_since=past)
    assert "timed out" in _refused(saga, ops)
    saga = deliver(saga.id)
    assert saga.state == SagaState.COMPENSATING and saga.failure_code == "timed_out"


def test_a_wait_that_escalates_still_takes_a_signal_after_its_timeout(ops):
    saga = _parked("test_wait_escalate")
    past = timezone.now() - timedelta(seconds=5)
    Saga.objects.filter(pk=saga.id).update(waiting_since=past)
    outcome = saga_signal(saga_id=saga.id, name="go", payload={"ok": True}, user=ops)
    assert outcome.delivered_now
    saga = deliver(saga.id)
    assert saga.state == SagaState.RUNNING and saga.current_step == "s2"


def _lenient(payload) -> str | None:
    return None


def _strict(payload) -> str | None:
    return None if "reviewer" in payload else "reviewer is required"


@pytest.mark.parametrize(
    "second",
    [
        Wait("go", timeout=60, name="ops_go", validate=_strict),
        Wait("go", timeout=60, name="ops_go", validate=_lenient, client=None),
    ],
)
def test_waits_sharing_a_signal_must_agree_on_sender_and_payload_check(second):
    """The first wait lets the saga's client send ``go`` with a lenient check; a later one is
    for staff with a strict check. A signal is checked before anyone knows which wait takes
    it, so such a definition is refused when it is declared."""
    first = Wait("go", timeout=60, name="client_go", validate=_lenient, client=lambda _: 1)
    with pytest.raises(ValueError, match="differ in who may send it"):
        SagaDefinition("two_goes", steps=[*scripted(["s1"]), first, *scripted(["s2"]), second])
    same = Wait("go", timeout=60, name="again", validate=_lenient, client=first.park.client)
    SagaDefinition("two_goes", steps=[*scripted(["s1"]), first, *scripted(["s2"]), same])


def test_waits_sharing_a_signal_may_name_the_same_method_twice():
    """``owners.client_of`` read twice is two bound-method objects, equal but not identical:
    the same rule, so the definition stands."""

    class Owners:
        def client_of(self, saga_id: str) -> int:
            return 1

    owners = Owners()
    steps = [
        *scripted(["s1"]),
        Wait("go", timeout=60, name="first_go", client=owners.client_of),
        *scripted(["s2"]),
        Wait("go", timeout=60, name="second_go", client=owners.client_of),
    ]
    SagaDefinition("two_goes", steps=steps)


def test_a_signal_that_came_in_time_is_taken_and_a_second_key_is_already_signalled(ops):
    saga = _parked("test_wait")
    saga_signal(saga_id=saga.id, name="go", payload={"ok": True}, key="k1", user=ops)
    past = timezone.now() - timedelta(seconds=121)
    Saga.objects.filter(pk=saga.id).update(waiting_since=past)
    with pytest.raises(SagaOperationRefused) as refused:
        saga_signal(saga_id=saga.id, name="go", payload={"ok": True}, key="k2", user=ops)
    assert refused.value.code == "already_signalled"
    saga = deliver(saga.id)
    assert saga.current_step == "s2"


def test_a_wait_past_the_pivot_takes_a_signal_after_its_timeout(ops):
    """Past its pivot a wait escalates on timeout whatever it declares: a person would let the
    saga go on with the signal, so it is taken, not refused as too late."""
    definition = SagaDefinition(
        "late_wait",
        steps=[*scripted(["s1", "p"], pivot="p"), Wait("go", timeout=60), *scripted(["s2"])],
    )
    register(definition)
    try:
        saga = saga_start(saga_type="late_wait", data={"script": {}})
        for _ in range(3):  # s1, p, parks at go
            saga = deliver(saga.id)
        assert saga.waiting_for == "go"
        past = timezone.now() - timedelta(seconds=61)
        Saga.objects.filter(pk=saga.id).update(waiting_since=past)
        assert saga_signal(saga_id=saga.id, name="go", payload={}, user=ops).delivered_now
    finally:
        unregister("late_wait", 1)


def test_a_saga_given_its_signal_waits_for_it_no_longer_before_a_worker_takes_it(ops):
    """Accepted, the signal is the saga's: its row stops saying it waits for one (an order
    reads ``processing``, not ``requires_action``, while the doorbell is on its way), and the
    wait's start stays for the deadline's give-back."""
    saga = _parked("test_wait")
    since = saga.waiting_since
    saga_signal(saga_id=saga.id, name="go", payload={"ok": True}, user=ops)
    row = Saga.objects.get(pk=saga.id)
    assert (row.waiting_for, row.waiting_since) == ("", since)
    saga = deliver(saga.id)
    assert (saga.current_step, saga.waiting_since) == ("s2", None)
    assert SagaSignal.objects.get(saga=saga).consumed_by == "await_go"


def test_a_wait_at_the_pivot_past_its_deadline_refuses_a_signal_it_would_not_take(ops):
    """At its pivot a saga past its deadline is still undone while the pivot has not run (a
    wait at the pivot has not): a signal then would only wake it to be cancelled."""
    definition = SagaDefinition(
        "pivot_wait",
        steps=[*scripted(["s1"]), Wait("go", timeout=None, pivot=True), *scripted(["s2"])],
    )
    register(definition)
    try:
        saga = saga_start(saga_type="pivot_wait", data={"script": {}})
        deliver(saga.id)  # s1
        saga = deliver(saga.id)  # parks at go, for as long as it takes
        assert saga.waiting_for == "go"
        Saga.objects.filter(pk=saga.id).update(deadline_at=timezone.now() - timedelta(seconds=1))
        assert "being cancelled" in _refused(Saga.objects.get(pk=saga.id), ops)
    finally:
        unregister("pivot_wait", 1)
