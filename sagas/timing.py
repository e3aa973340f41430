"""The engine's clocks: step timeouts, leases, task time limits, attempts and backoff.

Every knob is read when used (never at import time), so tests and workers can set them per
process. The runner, the row store and the doorbell size leases, limits and retries from here,
so the three agree on what "this step may take T seconds" means.
"""

from __future__ import annotations

import random
import time
from contextvars import ContextVar

from django.conf import settings

from sagas.definition import RetryPolicy, Step, get_definition
from sagas.models import Saga


def step_timeout(step: Step | None) -> float:
    """A step's own timeout, or ``SAGA_STEP_TIMEOUT``."""
    if step is not None and step.timeout is not None:
        return step.timeout
    return settings.SAGA_STEP_TIMEOUT


def lease_seconds(timeout: float | None = None) -> float:
    """How long a claim holds a saga: longer than its task can possibly keep running.

    ``timeout`` is the step timeout the task was sent for (its time limits derive from it, see
    :func:`task_time_limits`); the lease outlives the hard limit, so an expired lease always
    means its holder is gone.
    """
    if timeout is None:
        timeout = settings.SAGA_STEP_TIMEOUT
    return timeout + settings.SAGA_INLINE_BUDGET + 5.0


def task_time_limits(timeout: float) -> tuple[float, float]:
    """``(soft, hard)`` Celery time limits of a task sent for a step with ``timeout``.

    The task may run inline steps for ``SAGA_INLINE_BUDGET`` and then one more step; the
    defaults (``CELERY_TASK_ANNOTATIONS``) are these for ``SAGA_STEP_TIMEOUT``.
    """
    soft = timeout + settings.SAGA_INLINE_BUDGET
    return soft, soft + 3.0


# The step timeout the running task was sent for (None: SAGA_STEP_TIMEOUT, the default limits).
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
    """The step timeout the running task was sent for: its time limits derive from it."""
    value = task_timeout.get()
    return settings.SAGA_STEP_TIMEOUT if value is None else value


def timeout_at(saga: Saga, step_name: str) -> float:
    """The timeout of ``step_name`` in the saga's own definition (the default if unknown)."""
    return timeout_of(saga.saga_type, saga.definition_version, step_name)


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
    what a worker crash already does. And the WAL is one sequence: the participant's own
    write in the next step, or the record that hands the saga on, waits for its flush and
    with it for everything before. So only those hand-over commits wait for the disk, which
    takes the engine's own waits for an fsync from six per five-step saga to one.
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
