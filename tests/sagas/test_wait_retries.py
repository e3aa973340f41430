"""A parked step's action that fails after its wait ended, driven in-process.

Like the provider seam's tests, the engine runs here with the real claim and record code on
PostgreSQL and the test delivers every message itself, one step per delivery. The retry of
such an action runs it again: it does not wait again, whoever or whatever brings the saga
back (its backoff, the end of its provider's outage, an operator). The real-worker tests of
the common case are in ``test_waits.py``.
"""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group, User
from django.utils import timezone

from providers.models import Breaker
from sagas.models import Saga, SagaEvent, SagaState, SagaStep, StepStatus
from sagas.services import saga_retry_now, saga_start
from tests.sagas.inprocess import deliver, one_step_per_delivery
from tests.sagas.sagatypes import effects

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _setup(settings):
    # One failure in the window opens the breaker: the test's one call is its outage.
    one_step_per_delivery(
        settings, {"card": {"min_calls": 1, "failure_rate": 0.5, "cooldown": 60, "canaries": 1}}
    )


def _deliver(saga_id) -> Saga:
    """One delivery, with the parked saga's timer run out."""
    return deliver(saga_id, wake_timers=True)


def _waits(saga_id) -> int:
    return SagaEvent.objects.filter(saga_id=saga_id, kind="waiting").count()


def _at_the_timer(saga_type: str, script: dict) -> Saga:
    saga = saga_start(saga_type=saga_type, data={"script": script})
    saga = _deliver(saga.id)  # s1
    saga = _deliver(saga.id)  # arrives at nap: parks
    assert saga.current_step == "nap" and saga.waiting_since is not None
    return saga


def test_an_operators_retry_of_an_escalated_timer_runs_its_action():
    saga = _at_the_timer("test_sleep_pivot", {"nap": ["transient"]})
    saga = _deliver(saga.id)  # the timer ran out; the action fails; at the pivot: a person
    assert saga.state == SagaState.NEEDS_MANUAL and saga.waiting_since is None
    assert SagaStep.objects.get(saga=saga, name="nap").status == StepStatus.FAILED

    Saga.objects.filter(pk=saga.id).update(data={"script": {"nap": ["ok"]}})  # mended
    ops = User.objects.create_user("ops-retrier", is_staff=True)
    ops.groups.add(Group.objects.get(name="ops"))
    saga_retry_now(saga_id=saga.id, user=User.objects.get(pk=ops.pk))
    saga = _deliver(saga.id)
    assert saga.current_step == "s2" and saga.waiting_since is None
    assert _waits(saga.id) == 1
    assert effects(saga.id) == {("s1", "do"): 1, ("nap", "do"): 1}


def test_a_timer_held_back_by_its_providers_outage_runs_its_action_after_it():
    saga = _at_the_timer("test_sleep_provider", {"nap": ["transient"]})
    saga = _deliver(saga.id)  # the action fails and opens the breaker: its attempt is kept
    assert Breaker.objects.get(provider="card").state == "open"
    assert (saga.parked_on, saga.attempt, saga.waiting_since) == ("card", 0, None)
    assert saga.last_error  # what held it back, and what tells the next claim it failed here

    Saga.objects.filter(pk=saga.id).update(data={"script": {"nap": ["ok"]}})  # it is back
    Breaker.objects.filter(provider="card").update(probe_at=timezone.now())  # cool-down over
    saga = _deliver(saga.id)  # the canary: the action again, not the timer
    assert saga.current_step == "s2" and saga.waiting_since is None
    assert _waits(saga.id) == 1
    assert effects(saga.id) == {("s1", "do"): 1, ("nap", "do"): 1}


def test_a_step_that_became_a_timer_while_it_was_retrying_sleeps_before_its_action():
    """A plain step retrying under a name that a newer definition gives to a timer (a
    migration, a redeploy): its row says ``retrying``, but this saga never slept there."""
    saga = saga_start(saga_type="test_sleep_flaky", data={"script": {}})
    saga = _deliver(saga.id)  # s1
    assert saga.current_step == "nap"
    Saga.objects.filter(pk=saga.id).update(attempt=2, last_error="ConnectionError: earlier")
    SagaStep.objects.filter(saga=saga, name="nap").update(status=StepStatus.RETRYING)
    saga = _deliver(saga.id)
    assert saga.current_step == "nap" and saga.waiting_since is not None
    assert _waits(saga.id) == 1
    assert ("nap", "do") not in effects(saga.id)
