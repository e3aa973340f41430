"""A hypothesis model of the engine: whatever the outcomes and deliveries, sagas settle right.

The engine is driven in-process (real PostgreSQL, the real claim/record code) so hypothesis can
explore thousands of interleavings quickly: random step and compensation outcomes, duplicate and
stale deliveries, and worker crashes (a claim whose step took effect and was never recorded,
followed by the lease expiring and the sweeper ringing again). Inside the test transaction no
doorbell leaves the process: the test delivers every message itself.
"""

from __future__ import annotations

import contextlib
from datetime import timedelta

import pytest
from django.db.models import F
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagas.definition import get_definition, step_context
from sagas.models import ACTIVE_STATES, Saga, SagaState
from sagas.runner import advance
from sagas.services import saga_start
from sagas.store import claim
from sagas.sweeper import sweep
from tests.sagas.sagatypes import FIVE, effects, ensure_effects_table

FORWARD = st.sampled_from(["ok", "ok", "ok", "business:no", "transient", "lost"])
UNDO = st.sampled_from(["ok", "ok", "transient", "lost"])
ACTIONS = st.sampled_from(["deliver", "deliver", "duplicate", "stale", "crash"])


@st.composite
def scripts(draw) -> dict[str, list[str]]:
    script = {}
    for name in FIVE:
        script[name] = draw(st.lists(FORWARD, min_size=1, max_size=4))
        script[f"undo:{name}"] = draw(st.lists(UNDO, min_size=1, max_size=4))
    return script


def _time_passes(saga_id) -> None:
    """Backoffs and leases run out (as they would while the message waits)."""
    past = timezone.now() - timedelta(seconds=3600)
    Saga.objects.filter(pk=saga_id).update(next_attempt_at=past, lease_until=past)


def _crash(saga: Saga) -> None:
    """A worker claims, the step takes effect, and the process dies before recording."""
    claimed = claim(saga.id, saga.version)
    if claimed is None:
        return
    definition = get_definition(claimed.saga_type)
    step = definition.steps[claimed.step_index]
    fn = step.action if claimed.state == SagaState.RUNNING else step.compensate
    ctx = step_context(definition, claimed, compensating=claimed.state != SagaState.RUNNING)
    with contextlib.suppress(Exception):  # the process is gone either way
        fn(ctx)


@pytest.fixture(autouse=True)
def _effects_table(db):
    ensure_effects_table()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=scripts(), actions=st.lists(ACTIONS, max_size=60))
def test_random_outcomes_duplicates_and_crashes_always_settle(db, script, actions):
    """Every saga settles; succeeded means every effect and no undo; compensated means every
    effect has its undo; needs_manual means the ladder stopped at one failing compensation."""
    saga = saga_start(saga_type="test5", data={"script": script})
    for i in range(400):
        saga = Saga.objects.get(pk=saga.pk)
        if saga.state not in ACTIVE_STATES:
            break
        action = actions[i] if i < len(actions) else "deliver"
        _time_passes(saga.id)
        if action == "crash":
            _crash(saga)
            sweep()  # the lease has expired: the sweeper takes the saga back
        elif action == "stale":
            advance(saga.id, saga.version - 1)
        elif action == "duplicate":
            advance(saga.id, saga.version)
            advance(saga.id, saga.version)  # the same message again: fenced off
        else:
            advance(saga.id, saga.version)
    saga = Saga.objects.get(pk=saga.pk)
    assert saga.state in {SagaState.SUCCEEDED, SagaState.COMPENSATED, SagaState.NEEDS_MANUAL}

    done = effects(saga.id)
    did = [n for n in FIVE if (n, "do") in done]
    undid = {n for n in FIVE if (n, "undo") in done}
    if saga.state == SagaState.SUCCEEDED:
        assert did == FIVE and not undid
    elif saga.state == SagaState.COMPENSATED:
        assert set(did) <= undid, (did, undid)
        # Nothing ran past the step that failed.
        failed = FIVE.index(saga.failed_step) if saga.failed_step else len(FIVE)
        assert all(FIVE.index(n) <= failed for n in did)
    else:
        # The ladder stopped at the undo that kept failing (the forward failure that started
        # it stays in failed_step).
        stopped = FIVE.index(saga.failed_undo)
        above = [n for n in did if FIVE.index(n) > stopped]
        below = [n for n in FIVE[:stopped] if n in undid]
        assert set(above) <= undid and not below
        assert saga.escalated_from == SagaState.COMPENSATING
    # Steps and timeline agree with the row.
    assert saga.steps.count() == len(FIVE)
    assert saga.events.filter(kind="started").count() == 1
    assert Saga.objects.filter(pk=saga.pk, version__gte=F("attempt")).exists()
