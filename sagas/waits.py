"""Parked steps: what a saga at a ``Wait`` or ``Sleep`` step does when a worker claims it.

The engine asks :func:`decide` and applies the answer in its usual fenced record: *park*
(no lease, ``next_attempt_at`` = the timeout or wake-up, a row that costs nothing until then),
*run* (the signal is there, or the sleep is over: the step's function runs like any other),
*timeout* (a ``Wait`` whose time passed without its signal) or *skip* (this saga does not wait
here at all). Deciding only reads rows, so the step has no effect to fence or to undo, which
is what lets a signal take a saga over from a worker that is deciding at the same moment (see
:mod:`sagas.signals`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from uuid import UUID

from sagas.definition import Park, StepContext
from sagas.models import Saga, SagaSignal, SagaStep

# A doorbell may arrive a hair before the time it was scheduled for.
_TOLERANCE = timedelta(milliseconds=50)


@dataclass(frozen=True)
class WaitDecision:
    kind: str  # "park" | "run" | "timeout" | "skip"
    signal: SagaSignal | None = None
    wake_at: datetime | None = None
    #: The wait's timeout (or sleep) in seconds: the one its step's row kept when it began,
    #: or for a saga arriving now, the step's as read now (what parking records); for a
    #: ``run`` that ends a wait early, what the deadline was moved by.
    seconds: float | None = None


def pending_signal(saga_id: UUID | str, name: str) -> SagaSignal | None:
    """The oldest signal ``name`` sent to the saga and not consumed yet."""
    return (
        SagaSignal.objects.filter(saga_id=saga_id, name=name, consumed_at__isnull=True)
        .order_by("id")
        .first()
    )


def decide(park: Park, saga: Saga, ctx: StepContext, now: datetime) -> WaitDecision:
    arriving = saga.waiting_since is None
    if arriving and park.when is not None and not park.when(ctx):
        return WaitDecision("skip")
    if park.signal:
        signal = pending_signal(saga.id, park.signal)
        if signal is not None:
            # Ends the wait, if one began: its length says what to give back to the deadline.
            seconds = wait_seconds(park, saga) if not arriving else None
            return WaitDecision("run", signal=signal, seconds=seconds)
    seconds = wait_seconds(park, saga)
    if seconds is None:
        return WaitDecision("park")
    due = (saga.waiting_since or now) + timedelta(seconds=seconds)
    if now + _TOLERANCE >= due:
        # Used up (a doorbell may come a hair early): nothing to give back to the deadline.
        return WaitDecision("timeout" if park.signal else "run")
    return WaitDecision("park", wake_at=due, seconds=seconds)


def wait_seconds(park: Park, saga: Saga) -> float | None:
    """The length of the saga's wait at ``park``: for a saga waiting there, the one its step's
    row kept when the wait began (a timeout setting changed while it waits, or a move to a
    version whose wait is longer, changes neither when it times out nor what it gives back to
    the deadline); for one arriving now, or parked by a release that did not keep it, the
    step's as read now."""
    if saga.waiting_since is not None:
        kept = (
            SagaStep.objects.filter(saga_id=saga.id, name=saga.current_step)
            .values_list("wait_seconds", flat=True)
            .first()
        )
        if kept is not None:
            return kept
    return park.duration


#: The step row's result of a ``Wait`` this saga does not need (its ``when`` said no).
SKIPPED = {"skipped": True}
