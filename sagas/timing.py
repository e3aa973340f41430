"""The engine's clocks: step timeouts, leases, task time limits, attempts and backoff.

Every knob is read when used (never at import time), so tests and workers can set them per
process. The runner, the row store and the doorbell size leases, limits and retries from here,
so the three agree on what "this step may take T seconds" means.
"""

from __future__ import annotations

import functools
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import FrameType

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings

from sagas.definition import (
    RetryPolicy,
    Step,
    get_definition,
    registered_definitions,
    registry_generation,
)
from sagas.models import Saga


def step_timeout(step: Step | None) -> float:
    """A step's own timeout, or ``SAGA_STEP_TIMEOUT``."""
    if step is not None and step.timeout is not None:
        return step.timeout
    return settings.SAGA_STEP_TIMEOUT


def lease_seconds(timeout: float | None = None) -> float:
    """How long a claim holds a saga: longer than its task can possibly keep running.

    ``timeout`` is the step timeout the task was sent for (its time limits derive from it, see
    :func:`task_time_limits`); ``None``: the one every doorbell is sent for
    (:func:`task_step_timeout`). The lease outlives the hard limit, so an expired lease always
    means its holder is gone.
    """
    if timeout is None:
        timeout = task_step_timeout()
    return timeout + settings.SAGA_INLINE_BUDGET + 5.0


def task_time_limits(timeout: float) -> tuple[float, float]:
    """``(soft, hard)`` Celery time limits of a task sent for a step with ``timeout``.

    The task may run inline steps for ``SAGA_INLINE_BUDGET`` and then one more step; the
    defaults (``CELERY_TASK_ANNOTATIONS``) are these for ``SAGA_STEP_TIMEOUT``.
    """
    soft = timeout + settings.SAGA_INLINE_BUDGET
    return soft, soft + 3.0


def task_step_timeout() -> float:
    """The step timeout every doorbell's task is sent for: the longest step timeout of any
    registered definition, up to ``SAGA_TASK_TIMEOUT_MAX`` (never below ``SAGA_STEP_TIMEOUT``).

    One size for every task means a task that runs a saga step after step (inline, or a pump
    going from saga to saga) never meets a step it has no time for: the order saga's carrier
    booking (twice the default timeout) used to cost each order a broker message, a task and a
    claim of its own in the middle of the saga. Each step still ends at its own timeout
    (:func:`step_deadline`); what grows is the lease, and so how long a saga whose worker died
    waits before another takes it (:func:`lease_seconds` of this). A step longer than
    ``SAGA_TASK_TIMEOUT_MAX`` keeps a doorbell of its own, sent with limits that fit it, so one
    hour-long step does not make every saga's lease an hour.
    """
    longest = _longest_registered_step()
    cap = settings.SAGA_TASK_TIMEOUT_MAX
    fitting = [t for t in longest if t <= cap + TIMEOUT_SLACK]
    return max([settings.SAGA_STEP_TIMEOUT, *fitting])


def doorbell_only(timeout: float | None) -> bool:
    """Whether a step with ``timeout`` needs a task of its own (a doorbell sent with limits that
    fit it): longer than :func:`task_step_timeout`, which every other task has. The pumps pass
    such a saga by (``sagas.store.claim_due``) and a task going step after step stops before it.
    """
    return timeout is not None and timeout > task_step_timeout() + TIMEOUT_SLACK


def _longest_registered_step() -> list[float]:
    """Every distinct step timeout the registered definitions set (kept until they change)."""
    return _step_timeouts(registry_generation())


@functools.lru_cache(maxsize=1)
def _step_timeouts(generation: int) -> list[float]:
    # The generation is read before the registry: a change meanwhile is seen at the next call.
    return sorted({s.timeout for d in registered_definitions() for s in d.steps if s.timeout})


# The step timeout the running task was sent for (None: not in a task; see current_task_timeout).
task_timeout: ContextVar[float | None] = ContextVar("saga_task_timeout", default=None)


# When the running task's inline budget ends (time.monotonic()); None: no budget (a direct call).
inline_until: ContextVar[float | None] = ContextVar("saga_inline_until", default=None)


def within_inline_budget() -> bool:
    """Whether the running task may still start another step itself.

    Asked when the next step would start, not when the previous one did: a step that began
    inside the budget may end well past it, and the task's time limits (step timeout plus
    budget) only cover one step started inside it.
    """
    until = inline_until.get()
    return until is None or time.monotonic() < until


# Timeouts travel as time limits and back (soft limit minus the inline budget): compare them
# with a little slack for float rounding.
TIMEOUT_SLACK = 1e-3


def current_task_timeout() -> float:
    """The step timeout the running task was sent for: its time limits derive from it. Outside
    a task (the runner called directly), the one every doorbell is sent for."""
    value = task_timeout.get()
    return task_step_timeout() if value is None else value


def timeout_at(saga: Saga, step_name: str) -> float:
    """The timeout of ``step_name`` in the saga's own definition (the default if unknown)."""
    return timeout_of(saga.saga_type, saga.definition_version, step_name)


@contextmanager
def step_deadline(timeout: float) -> Iterator[None]:
    """End a step that runs past ``timeout`` + ``SAGA_INLINE_BUDGET`` as Celery's soft time
    limit would: ``SoftTimeLimitExceeded`` raised in the step, a transient failure.

    A task's limits fit the longest step it may run (:func:`task_step_timeout`), so for a
    shorter step they come late; this alarm keeps each step to its own timeout. It is a
    ``SIGALRM`` timer, so it works where signals reach the running code: a pool process's main
    thread (prefork, solo). On the threads pool nothing interrupts a step, as Celery enforces no
    time limits there either: once the lease of a step that hangs has run out, the sweeper
    starts another attempt beside it (under the same idempotency key). A timer someone else
    armed is left alone (the step then has none of its own); on prefork the task's hard limit
    stays the backstop for code that never returns to Python (solo has no hard limit).
    """
    global _armed
    limit = timeout + settings.SAGA_INLINE_BUDGET
    soft_limit = current_task_timeout() + settings.SAGA_INLINE_BUDGET
    if limit + TIMEOUT_SLACK >= soft_limit or not _alarm_usable():
        yield  # the task's own soft limit is as early: nothing to add
        return
    previous = signal.signal(signal.SIGALRM, _step_overran)
    try:
        _armed = True
        signal.setitimer(signal.ITIMER_REAL, limit)
        yield
    finally:
        # Disowned first: if another exception (Celery's own soft limit) cuts this block
        # short, an alarm that still comes finds nobody to raise for and is ignored.
        _armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Whether a step_deadline() is waiting for its alarm now (one at most: main thread only).
_armed = False


def _step_overran(signum: int, frame: FrameType | None) -> None:
    if _armed:
        raise SoftTimeLimitExceeded("the step ran past its own timeout")


def _alarm_usable() -> bool:
    """A ``SIGALRM`` timer reaches this code now, and nobody else has one armed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    # Greenlets share the main thread: the signal would land in whichever one runs.
    gevent, eventlet = sys.modules.get("gevent.monkey"), sys.modules.get("eventlet.patcher")
    if gevent is not None and gevent.is_module_patched("time"):
        return False
    if eventlet is not None and eventlet.is_monkey_patched("time"):
        return False
    return signal.getitimer(signal.ITIMER_REAL)[0] == 0


def timeout_of(saga_type: str, version: int, step_name: str) -> float:
    """The timeout of a step of a registered definition (the default if unknown here)."""
    try:
        return step_timeout(get_definition(saga_type, version).step(step_name))
    except (LookupError, KeyError):
        return settings.SAGA_STEP_TIMEOUT


def max_attempts_of(step: Step, *, compensating: bool) -> int:
    """How many attempts ``step`` (or its compensation) gets: its own policy, else the
    global setting."""
    policy = step.compensation_retry if compensating else step.retry
    if policy is not None and policy.max_attempts is not None:
        return policy.max_attempts
    if compensating:
        return settings.SAGA_COMPENSATION_MAX_ATTEMPTS
    return settings.SAGA_MAX_ATTEMPTS


def lease_only_commits() -> bool:
    """Whether commits that only move a lease forward skip the wait for their WAL flush.

    A claim, and a record after which the same task goes straight on to the next step, only
    say "this task holds the saga": nobody else is told (no doorbell, no terminal state). If
    PostgreSQL itself crashed before flushing one, the saga would come back at its previous
    version and the sweeper would run the step again under the same idempotency key, which is
    what a worker crash already does. And the WAL is one sequence: a participant's write that
    waits, or the record that hands the saga on, waits for its flush and with it for
    everything before. So only those hand-over commits wait for the disk, which takes the
    engine's own waits for an fsync from six per five-step saga to one, with two exceptions
    (``sagas.store``): the claim or go-on record before a forward step that may leave the
    database (:attr:`~sagas.definition.Step.may_leave_database`), and the record that begins
    the compensation, both of which must not be lost once something outside may have acted.
    """
    return settings.SAGA_ASYNC_LEASE_COMMITS


def backoff_delay(attempt: int, policy: RetryPolicy | None = None) -> float:
    """Exponential backoff with jitter: ``min(cap, base * 2**(attempt-1))`` times [0.5, 1].

    The jitter spreads retries of many sagas hitting the same provider, while keeping each
    saga's delays growing (until the cap), so a flapping provider gets more room every time.
    ``policy`` (a step's own) overrides ``SAGA_BACKOFF_BASE`` and ``SAGA_BACKOFF_MAX``.
    """
    base, cap = settings.SAGA_BACKOFF_BASE, settings.SAGA_BACKOFF_MAX
    if policy is not None:
        base = base if policy.backoff_base is None else policy.backoff_base
        cap = cap if policy.backoff_max is None else policy.backoff_max
    ceiling = min(cap, base * 2 ** max(attempt - 1, 0))
    return ceiling * random.uniform(0.5, 1.0)
