"""A hypothesis model of the engine: whatever the outcomes and deliveries, sagas settle right.

The engine is driven in-process (real PostgreSQL, the real claim/record code) so hypothesis can
explore thousands of interleavings quickly: random step and compensation outcomes, duplicate and
stale deliveries, and worker crashes (a claim whose step took effect and was never recorded,
followed by the lease expiring and the sweeper ringing again). Inside the test transaction no
doorbell leaves the process: the test delivers every message itself.
"""

from __future__ import annotations

import contextlib
import copy
from datetime import timedelta

import pytest
from django.db.models import F
from django.test import override_settings
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagas.definition import get_definition, step_context
from sagas.exceptions import SagaOperationRefused
from sagas.models import ACTIVE_STATES, Saga, SagaState
from sagas.runner import advance
from sagas.services import saga_request_cancel, saga_start
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


def _crash_in_a_run(saga: Saga, steps: int) -> None:
    """A worker claims a step that starts a run of steps recorded once (``test_plain``), runs
    up to ``steps`` of them, each write committing as it is made, and dies before the run's
    one record. Only a step's first attempt starts a run; any other claim runs one step."""
    claimed = claim(saga.id, saga.version)
    if claimed is None:
        return
    definition = get_definition(claimed.saga_type)
    compensating = claimed.state != SagaState.RUNNING
    i = claimed.step_index
    run = [i] if compensating or claimed.attempt > 1 else [i, *definition.run_after(i)]
    running = copy.copy(claimed)
    for j in run[:steps]:
        step = definition.steps[j]
        running.current_step = step.name
        fn = step.compensate if compensating else step.action
        try:
            result = fn(step_context(definition, running, compensating=compensating))
        except Exception:  # noqa: BLE001 - the run ends here, and the process with it
            return
        running.results = {**running.results, step.name: result}


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
    _play("test5", script, actions)


RUN_ACTIONS = st.sampled_from(
    ["deliver", "deliver", "duplicate", "stale", "crash", "crash_run", "crash_run", "cancel"]
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    script=scripts(),
    actions=st.lists(st.tuples(RUN_ACTIONS, st.integers(1, 5)), max_size=60),
    budget=st.sampled_from([0.0, 60.0]),
)
def test_runs_recorded_once_settle_right_whatever_cuts_them_short(db, script, actions, budget):
    """The same with steps that stay in the database and share records: a delivery runs them
    back to back and records them once, and a crash may cut such a run short after any of its
    steps (``crash_run``: its writes committed, nothing recorded); a client may cancel at any
    time. Whatever ran is undone if the saga compensates; an undo of a step that never ran
    leaves its tombstone. A delivery runs every step it can (a budget of 60 s: runs recorded
    once, and broken) or one step (0: a run cut short may start at any step)."""
    with override_settings(SAGA_INLINE_BUDGET=budget):
        _play("test_plain", script, [a for a, _ in actions], [n for _, n in actions])


def _play(saga_type: str, script: dict, actions: list[str], lengths: list[int] = ()) -> None:
    saga = saga_start(saga_type=saga_type, data={"script": script})
    for i in range(400):
        saga = Saga.objects.get(pk=saga.pk)
        if saga.state not in ACTIVE_STATES:
            break
        action = actions[i] if i < len(actions) else "deliver"
        _time_passes(saga.id)
        if action == "crash":
            _crash(saga)
            sweep()  # the lease has expired: the sweeper takes the saga back
        elif action == "crash_run":
            _crash_in_a_run(saga, lengths[i])
            sweep()
        elif action == "cancel":
            with contextlib.suppress(SagaOperationRefused):  # past its pivot, or cancelling
                saga_request_cancel(saga_id=saga.id, reason="customer_cancelled")
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
        if saga_type == "test5":
            # Nothing ran past the step that failed (a run cut short may have, before it).
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
