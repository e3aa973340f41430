"""A step's ``undone_by_hand``: the participant hears of an undo a person did by hand.

An operator's undo done (API or console, the same service) calls the hook of the step it
records, in its own transaction, with the context the compensation would have had; a hook that
raises refuses the operation and nothing of it, or of the hook, is kept. The order saga's
participants are covered end to end in ``tests/orders/test_manual_undo.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.contrib.auth.models import Group
from django.utils import timezone

from sagas.definition import SagaDefinition, Step, StepContext, register, unregister
from sagas.models import Saga, SagaEvent, SagaState, SagaStep, StepStatus
from tests.admin.conftest import needs_manual
from tests.api.conftest import api_client_for, assert_error

pytestmark = pytest.mark.django_db

TYPE = "test_by_hand"
#: What the hook was called with, in this process (the operation runs in it).
SEEN: list[StepContext] = []


def _noop(ctx: StepContext) -> dict:
    return {"ok": True}


def _by_hand(ctx: StepContext) -> dict:
    # Written before it may refuse: a refusal must take this back with the rest.
    SagaEvent.objects.create(saga_id=ctx.saga_id, at=timezone.now(), kind="hook_wrote")
    if ctx.data.get("refuse"):
        raise RuntimeError("the ledger is closed for the night")
    SEEN.append(ctx)
    return {"recorded": True}


@pytest.fixture(autouse=True)
def by_hand_type() -> Iterator[None]:
    SEEN.clear()
    register(
        SagaDefinition(
            TYPE,
            steps=[
                Step("s1", _noop, compensate=_noop, undone_by_hand=_by_hand),
                Step("s2", _noop, compensate=_noop),
                Step("s3", _noop),
            ],
        )
    )
    yield
    unregister(TYPE, 1)


@pytest.fixture
def ops_api(django_user_model):
    user = django_user_model.objects.create_user("olivia", is_staff=True)
    user.groups.add(Group.objects.get(name="ops"))
    return api_client_for(user)


def undo_done(ops_api, saga: Saga, step: str):
    return ops_api.post(
        f"/api/v1/sagas/{saga.pk}/undo-done/",
        {"step": step, "note": "done in the other system"},
        format="json",
    )


def test_the_hook_hears_of_the_undo_with_the_compensations_keys(ops_api):
    """Waiting on the undo of s1: the hook runs once, with s1's undo and forward keys, and the
    saga ends compensated, its step undone by hand."""
    saga = needs_manual(saga_type=TYPE, step_index=0, failed_step="s1")
    response = undo_done(ops_api, saga, "s1")
    assert response.status_code == 202, response.content
    [ctx] = SEEN
    assert (ctx.step, ctx.compensating) == ("s1", True)
    assert (ctx.idempotency_key, ctx.forward_key) == (
        f"saga:{saga.pk}:s1:undo",
        f"saga:{saga.pk}:s1",
    )
    saga.refresh_from_db()
    assert saga.state == SagaState.COMPENSATED
    assert SagaStep.objects.get(saga=saga, name="s1").status == StepStatus.COMPENSATED_BY_HAND
    assert SagaEvent.objects.filter(saga=saga, kind="hook_wrote").count() == 1


def test_a_step_without_a_hook_is_recorded_by_the_engine_alone(ops_api):
    saga = needs_manual(saga_type=TYPE, step_index=1, failed_step="s2")
    assert undo_done(ops_api, saga, "s2").status_code == 202
    assert SEEN == []
    saga.refresh_from_db()
    assert (saga.state, saga.current_step) == (SagaState.COMPENSATING, "s1")


def test_a_hook_that_raises_refuses_the_undo_done_and_nothing_is_kept(ops_api):
    """409 undo_record_failed with the hook's reason; the saga, its step, its timeline are as
    they were, and what the hook wrote before it raised is gone too."""
    saga = needs_manual(saga_type=TYPE, step_index=0, failed_step="s1")
    Saga.objects.filter(pk=saga.pk).update(data={"refuse": True})
    saga.refresh_from_db()
    events = SagaEvent.objects.filter(saga=saga).count()

    body = assert_error(undo_done(ops_api, saga, "s1"), 409, "undo_record_failed")
    assert body["detail"] == (
        "Could not record the undo of s1 as done by hand: the ledger is closed for the night"
    )
    after = Saga.objects.get(pk=saga.pk)
    assert (after.state, after.current_step, after.version) == (
        SagaState.NEEDS_MANUAL,
        "s1",
        saga.version,
    )
    assert SagaStep.objects.get(saga=saga, name="s1").status != StepStatus.COMPENSATED_BY_HAND
    assert SagaEvent.objects.filter(saga=saga).count() == events  # no ops_undo_done, no hook_wrote


def test_a_hook_without_a_compensation_is_refused_when_declared():
    with pytest.raises(ValueError, match="undone_by_hand needs a compensation"):
        Step("s", _noop, undone_by_hand=_by_hand)
