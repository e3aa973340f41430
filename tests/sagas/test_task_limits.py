"""The time limits every doorbell's task carries, and each step's own deadline inside them.

``task_step_timeout()`` sizes every task for the longest registered step up to
``SAGA_TASK_TIMEOUT_MAX``; ``step_deadline()`` still ends each step at its own timeout. In
process, on pytest's main thread, which is where a prefork pool process runs its tasks too.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from sagas import doorbell, timing
from sagas.definition import BusinessFailure, SagaDefinition, Step, register, unregister
from sagas.provider_seam import call_step
from sagas.timing import (
    doorbell_only,
    lease_seconds,
    step_deadline,
    task_step_timeout,
    task_timeout,
)


def _noop(ctx):
    return {}


@pytest.fixture
def one_more_type():
    """Register a type with the step timeouts given, forgotten afterwards."""
    registered: list[str] = []

    def add(*timeouts: float) -> None:
        name = f"limits_{len(registered)}"
        steps = [Step(f"s{i}", _noop, timeout=t) for i, t in enumerate(timeouts)]
        register(SagaDefinition(name, steps=steps))
        registered.append(name)

    yield add
    for name in registered:
        unregister(name, 1)


def test_every_task_fits_the_longest_registered_step_up_to_the_cap(settings, one_more_type):
    settings.SAGA_STEP_TIMEOUT = 3.0
    settings.SAGA_TASK_TIMEOUT_MAX = 20.0
    before = task_step_timeout()
    one_more_type(12.0)
    assert task_step_timeout() == max(before, 12.0)
    one_more_type(19.5, 400.0)  # 400 s is past the cap: that step keeps a task of its own
    assert task_step_timeout() == 19.5
    assert not doorbell_only(19.5)
    assert doorbell_only(400.0)
    # The lease of a task sized so outlives its hard limit, as for the default.
    assert lease_seconds() == 19.5 + settings.SAGA_INLINE_BUDGET + 5.0


def test_never_below_the_default_step_timeout(settings):
    settings.SAGA_TASK_TIMEOUT_MAX = 0.0  # the cap admits no step: every task has the default
    settings.SAGA_STEP_TIMEOUT = 3.0
    assert task_step_timeout() == 3.0
    assert doorbell_only(6.0)
    assert doorbell._limits(None) == {}  # the default: the task's annotations say so


def test_a_doorbell_carries_the_shared_limits(settings, one_more_type):
    settings.SAGA_STEP_TIMEOUT = 3.0
    settings.SAGA_TASK_TIMEOUT_MAX = 500.0
    settings.SAGA_INLINE_BUDGET = 0.5
    one_more_type(300.0)
    assert doorbell._limits(None) == {"soft_time_limit": 300.5, "time_limit": 303.5}
    assert doorbell._limits(3.0) == {"soft_time_limit": 300.5, "time_limit": 303.5}
    one_more_type(501.0)  # a step of its own: its doorbell carries its own limits
    assert doorbell._limits(501.0) == {"soft_time_limit": 501.5, "time_limit": 504.5}


@contextmanager
def in_task_sized_for(seconds: float) -> Iterator[None]:
    """As inside a task whose limits fit ``seconds``, with no inline budget."""
    token = task_timeout.set(seconds)
    try:
        yield
    finally:
        task_timeout.reset(token)


def never_answers(ctx=None) -> None:
    """A participant whose provider never answers: a read on a socket nobody writes to. The
    socket's own timeout only bounds a test whose alarm failed; the alarm interrupts the read."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(30)
        ours.recv(1)


@pytest.fixture
def no_budget(settings):
    settings.SAGA_INLINE_BUDGET = 0.0


@pytest.mark.usefixtures("no_budget")
def test_a_step_past_its_own_timeout_is_cut_off_inside_a_longer_task():
    with in_task_sized_for(60.0), pytest.raises(SoftTimeLimitExceeded), step_deadline(0.05):
        never_answers()
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # nothing left armed
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL


@pytest.mark.usefixtures("no_budget")
def test_a_step_within_its_timeout_is_left_alone():
    with in_task_sized_for(60.0), step_deadline(30.0):
        armed = signal.getitimer(signal.ITIMER_REAL)[0]
    assert 0 < armed <= 30.0  # its own deadline was set while it ran
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@pytest.mark.usefixtures("no_budget")
def test_no_alarm_where_the_tasks_own_limit_comes_as_early():
    with in_task_sized_for(30.0), step_deadline(30.0):
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@pytest.mark.usefixtures("no_budget")
def test_someone_elses_timer_is_left_alone():
    fired: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        with in_task_sized_for(60.0), step_deadline(1.0):
            pass
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 99.0 < remaining <= 100.0  # still theirs, not disarmed
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert fired == []


@pytest.mark.usefixtures("no_budget")
def test_no_alarm_off_the_main_thread():
    """A threads-pool task: signals only reach the main thread, so no alarm is set."""
    seen: list[tuple[float, float]] = []

    def task() -> None:
        with in_task_sized_for(60.0), step_deadline(1.0):
            seen.append(signal.getitimer(signal.ITIMER_REAL))

    thread = threading.Thread(target=task)
    thread.start()
    thread.join()
    assert seen == [(0.0, 0.0)]


@pytest.mark.usefixtures("no_budget")
def test_an_alarm_after_the_step_ended_is_ignored():
    """Celery's own soft limit can cut the deadline's clean-up short, leaving the timer armed:
    its alarm then finds no step waiting for it and raises nowhere."""
    with in_task_sized_for(60.0), step_deadline(30.0), pytest.raises(SoftTimeLimitExceeded):
        timing._step_overran(signal.SIGALRM, None)  # the step's own alarm
    timing._step_overran(signal.SIGALRM, None)  # a stray one, later: nothing happens


@pytest.mark.usefixtures("no_budget")
def test_only_the_step_function_is_timed():
    """call_step times the function it calls, not its own bookkeeping: a function cut off is a
    transient failure; a definite answer given in time stays definite."""

    def declines(ctx):
        raise BusinessFailure("declined", "no")

    with in_task_sized_for(60.0):
        with pytest.raises(SoftTimeLimitExceeded):
            call_step(never_answers, None, None, timeout=0.05)
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        with pytest.raises(BusinessFailure):
            call_step(declines, None, None, timeout=0.05)
        assert call_step(lambda ctx: {"ok": True}, None, None, timeout=0.05) == {"ok": True}
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
