"""A wait's length is fixed when it begins, driven in-process.

The order saga's waits read their timeouts from settings (``ORDER_3DS_TIMEOUT``,
``ORDER_FRAUD_REVIEW_TIMEOUT``), and a deploy may change a setting while sagas wait. The wait
moved the saga's deadline by its length when it began; when it times out, and what it gives
back to the deadline when its signal comes early, must follow that same length (kept on the
wait's step row), or a raised
setting would take back more than was given (a saga cancelled as timed out while it worked)
and a lowered one would end waits already promised their time. ``test_wait_set`` reads its
timeout from ``TEST_WAIT_SECONDS``.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import Group, User
from django.utils import timezone

from sagas.models import Saga, SagaState, SagaStep
from sagas.services import saga_start
from sagas.signals import saga_signal
from tests.sagas.inprocess import deliver, one_step_per_delivery

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _setup(settings):
    one_step_per_delivery(settings, {})
    settings.TEST_WAIT_SECONDS = 120


def _kept(saga: Saga) -> float | None:
    """The length the wait's step row kept."""
    return SagaStep.objects.get(saga=saga, name="await_go").wait_seconds


def _parked() -> tuple[Saga, timedelta]:
    """A saga parked at ``await_go`` with a 120 s wait, and the deadline it had before."""
    saga = saga_start(saga_type="test_wait_set", data={})
    saga = deliver(saga.id)  # s1
    before = saga.deadline_at
    saga = deliver(saga.id)  # arrives at await_go: parks
    assert saga.waiting_since is not None and _kept(saga) == 120
    assert saga.deadline_at - before == timedelta(seconds=120)
    return saga, before


def _ops() -> User:
    user = User.objects.create_user("ops-waits", is_staff=True)
    user.groups.add(Group.objects.get(name="ops"))
    return User.objects.get(pk=user.pk)


def test_an_early_signal_gives_back_what_the_deadline_was_moved_by_not_the_new_setting(
    settings,
):
    saga, before = _parked()
    settings.TEST_WAIT_SECONDS = 5000  # raised while it waits
    saga_signal(saga_id=saga.id, name="go", payload={}, user=_ops())
    since = saga.waiting_since
    saga = deliver(saga.id)  # the signal is there: the wait ends
    assert saga.state == SagaState.RUNNING and saga.current_step == "s2"
    assert saga.waiting_since is None
    # The deadline keeps the time the wait took (120 s added, the unused part given back): a
    # give-back computed from 5000 s would put it ~80 minutes before the one it had.
    assert before <= saga.deadline_at <= before + (timezone.now() - since)


def test_a_lowered_setting_does_not_end_a_wait_that_already_began(settings):
    saga, _ = _parked()
    settings.TEST_WAIT_SECONDS = 1
    Saga.objects.filter(pk=saga.id).update(
        waiting_since=timezone.now() - timedelta(seconds=5)
    )  # past the new timeout, well within the old one
    saga = deliver(saga.id)
    assert saga.state == SagaState.RUNNING and saga.current_step == "await_go"
    assert saga.waiting_since is not None and _kept(saga) == 120
    assert saga.next_attempt_at > timezone.now() + timedelta(seconds=100)


def test_a_saga_arriving_after_the_change_waits_the_new_length(settings):
    settings.TEST_WAIT_SECONDS = 30
    saga = saga_start(saga_type="test_wait_set", data={})
    deliver(saga.id)  # s1
    saga = deliver(saga.id)
    assert _kept(saga) == 30
    assert saga.next_attempt_at - saga.waiting_since == timedelta(seconds=30)


def test_a_saga_parked_before_rows_kept_the_length_gives_back_by_the_steps(settings):
    """Rows parked by an older release have no ``wait_seconds``: the step's timeout, as then."""
    saga, before = _parked()
    SagaStep.objects.filter(saga=saga, name="await_go").update(wait_seconds=None)
    saga_signal(saga_id=saga.id, name="go", payload={}, user=_ops())
    saga = deliver(saga.id)
    assert saga.current_step == "s2"
    assert before <= saga.deadline_at <= before + (timezone.now() - saga.created_at)
