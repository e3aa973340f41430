"""The runner: one step, one short claim, one short record.

A doorbell (:mod:`sagas.doorbell`) says "saga X at version V may have work now". The task
that answers it:

1. **claims** the saga (:func:`sagas.store.claim`): zero rows means the message is stale or a
   duplicate, and the task stops;
2. **calls** the step (or compensation) function outside any transaction, with a derived
   idempotency key, so no row lock is held across a provider call (through the provider seam,
   :mod:`sagas.provider_seam`);
3. **decides** the outcome (next step, retry time, compensation, escalation, a park) and has
   the row store **record** it in one transaction fenced on the claimed version. If the next
   piece of work is due at once and the task is within its time budget, the same UPDATE also
   claims it and the task goes straight on; otherwise the next doorbell rings after commit.

Losing a message loses nothing: the sweeper (:mod:`sagas.sweeper`) finds sagas whose
``next_attempt_at`` is overdue and whose lease has expired, and rings again. Receiving one
twice costs one UPDATE that matches no row. A worker killed mid-step leaves a lease that
expires; the next claim counts another attempt and repeats the call with the same idempotency
key, so the participant returns its first result.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import structlog
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction
from django.utils import timezone

from providers import breaker as provider_breaker
from providers.config import breakers_enabled
from sagas import metrics, pumps, tracing, waits
from sagas.definition import (
    BusinessFailure,
    NothingHappened,
    RetryPolicy,
    SagaDefinition,
    Step,
    change_hook,
    definition_of,
    next_compensable,
    step_context,
    type_change_hook,
)
from sagas.doorbell import ring, ring_on_commit
from sagas.models import Saga, SagaEvent, SagaSignal, SagaState, SagaStep, StepStatus
from sagas.provider_seam import call_step, gate, gate_ahead, held_back
from sagas.store import (
    Batch,
    BatchBroken,
    ClaimAhead,
    Record,
    StepTransaction,
    claim,
    claim_due,
    claiming_ahead,
    close_batch,
    current_batch,
    due_saga,
    effect_possible,
    fenced_update,
    ladder_rows,
    mark_unrecorded_run,
    open_batch,
    released_lease,
    write,
)
from sagas.timing import (
    TIMEOUT_SLACK,
    backoff_delay,
    current_task_timeout,
    inline_until,
    max_attempts_of,
    step_timeout,
    task_step_timeout,
    task_timeout,
    timeout_at,
    within_inline_budget,
)

log = structlog.get_logger("sagas.engine")


def _start_compensation(
    definition: SagaDefinition,
    saga: Saga,
    rec: Record,
    *,
    reason: str,
    failed_index: int,
    failed_may_have_effect: bool,
) -> None:
    """Turn ``rec`` into "compensate everything up to ``failed_index``, newest first".

    Up to a later step (before the pivot) whose row says a lost or broken task may have run
    it (``maybe_effect``): a step of a run recorded once with the failed one
    (:class:`sagas.store.Batch`). That step's undo comes first, and the ladder goes down from
    it through every marked step. The rows are read for every saga whatever its definition
    says today (one query, off the happy path): a saga moved to another version
    (``saga_migrate``) carries the marks of the run its old version may have run.
    """
    rec.transitions.append("begin_compensation")
    rec.fields["failure_code"] = reason
    _unpark(saga, rec)
    failed = definition.steps[failed_index]
    first: int | None = None
    later = [
        j
        for j in range(failed_index + 1, definition.pivot_index)
        if definition.steps[j].compensate is not None
    ]
    maybe = ladder_rows(saga.id)[1] if later else frozenset()
    marked = [j for j in later if definition.steps[j].name in maybe]
    if marked:
        first = marked[-1]
    elif failed_may_have_effect and failed.compensate is not None:
        first = failed_index
    else:
        first = next_compensable(definition, saga, failed_index)
    rec.event("compensation_started", saga, detail=f"reason: {reason}")
    if first is None:
        rec.transitions.append("finish_compensation")
        rec.fields.update(
            next_attempt_at=None, lease_until=None, finished_at=timezone.now(), attempt=0
        )
        rec.event("compensated", saga, detail="nothing had taken effect")
        rec.finished = "compensated"
        return
    rec.fields.update(step_index=first, current_step=definition.steps[first].name)
    rec.go_on = True


def _escalate(saga: Saga, rec: Record, *, step: str, error: str) -> None:
    rec.transitions.append("escalate")
    _unpark(saga, rec)
    # An undo that keeps failing is its own fact: the forward failure that started the undoing
    # (failed_step and failure_code, the saga's failure signature) stays as it was.
    where = "failed_undo" if saga.state == SagaState.COMPENSATING else "failed_step"
    rec.fields.update(
        escalated_from=saga.state,
        **{where: step},
        last_error=error[:2000],
        next_attempt_at=None,
        lease_until=None,
    )
    rec.event("needs_manual", saga, step=step, detail=error)
    rec.finished = "needs_manual"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


def _boundary_cancel_reason(definition: SagaDefinition, saga: Saga, now: datetime) -> str:
    """A cancel or a passed deadline is honoured only while no run of the pivot may have taken
    effect (its step row says so, not the attempt counter: a park gives its claim back)."""
    if saga.cancel_reason:
        reason = saga.cancel_reason
    elif saga.deadline_at is not None and now >= saga.deadline_at:
        reason = "timed_out"
    else:
        return ""
    pivot = definition.pivot_index
    i = definition.index_of(saga.current_step)
    if i > pivot or (i == pivot and effect_possible(saga, saga.current_step, claimed=True)):
        return ""
    return reason


def _schedule_retry(
    saga: Saga,
    rec: Record,
    *,
    step: str,
    phase: str,
    error: str,
    took: float,
    policy: RetryPolicy | None = None,
) -> None:
    """A transient failure with attempts left: persist the next due time, ring with a countdown."""
    delay = backoff_delay(saga.attempt, policy)
    metrics.STEP_RETRIES.labels(saga.saga_type, step, phase).inc()
    kind = "step_retry" if phase == "forward" else "compensation_retry"
    rec.event(
        kind,
        saga,
        step=step,
        detail=f"{error}; next attempt in {delay:.3f}s",
        duration_ms=took * 1e3,
    )
    now = timezone.now()
    rec.fields.update(
        next_attempt_at=now + timedelta(seconds=delay),
        lease_until=released_lease(timeout_at(saga, saga.current_step), now),
        last_error=error,
    )
    rec.ring_after = delay


def _park_for_provider(
    saga: Saga, rec: Record, *, step: str, wait: provider_breaker.Wait, inline_ok: bool
) -> Saga | None:
    """The provider cannot take a call now: come back later as if this claim never happened.

    The claim counted an attempt; the park gives it back in the same fenced record, so an
    outage of any length spends none of the saga's attempts. The timeline gets one ``parked``
    event per stay, not one per probe. With the provider's ``park_max`` set, a saga already
    parked on it looks again after about as long as it has waited so far
    (:func:`providers.breaker.recheck_after`); the breaker's closing wakes it earlier
    (:func:`sagas.sweeper.wake_parked`).
    """
    now = timezone.now()
    delay = wait.delay
    if saga.parked_on == wait.provider:
        delay = provider_breaker.recheck_after(wait, lambda: _parked_for(saga, now))
    given_back = max(saga.attempt - 1, 0)
    if "attempts" in rec.step_fields:
        # The failed call's record: its row keeps the count as the park leaves it, so a later
        # run with no record of its own still shows as one above it (store.effect_possible).
        rec.step_fields["attempts"] = given_back
    rec.fields.update(
        attempt=given_back,
        next_attempt_at=now + timedelta(seconds=delay),
        lease_until=released_lease(timeout_at(saga, saga.current_step), now),
    )
    if wait.reason in provider_breaker.MOMENTARY:
        # A moment's queueing for a call slot or the rate limit is no stay on the provider:
        # ``parked_on`` stays as it was. Taken for one, a saga that only queued would count
        # as held back for an outage already, and its last attempt, failing in the outage
        # that followed, would not be kept (see sagas.provider_seam.held_back).
        rec.fields["parked_on"] = saga.parked_on
        rec.ring_after = delay
        return write(saga, rec, inline_ok=inline_ok)
    rec.fields["parked_on"] = wait.provider
    if wait.generation is not None and rec.step_name is not None:
        rec.step_fields["held_generation"] = wait.generation  # see provider_seam.held_back
        rec.step_fields["held_times"] = wait.holds
    if saga.parked_on != wait.provider:
        rec.event(
            "parked",
            saga,
            step=step,
            detail=f"provider {wait.provider}: {wait.reason}; next try in {delay:.1f}s",
        )
    rec.ring_after = delay
    return write(saga, rec, inline_ok=inline_ok)


def _parked_for(saga: Saga, now: datetime) -> float:
    """Seconds since this stay began: its ``parked`` event, the newest one of the saga."""
    since = (
        SagaEvent.objects.filter(saga_id=saga.id, kind="parked")
        .order_by("-id")
        .values_list("at", flat=True)
        .first()
    )
    return 0.0 if since is None else (now - since).total_seconds()


def _took(saga: Saga, step: Step, started: float, phase: str) -> float:
    """Seconds since ``started`` (a step call's ``perf_counter``), counted in the step's latency."""
    duration = time.perf_counter() - started
    metrics.STEP_LATENCY.labels(saga.saga_type, step.name, phase).observe(duration)
    return duration


def _forward(definition: SagaDefinition, saga: Saga, *, inline_ok: bool) -> Saga | None:
    rec = Record()
    i = definition.index_of(saga.current_step)
    step = definition.steps[i]
    if saga.attempt > 1 and step.shares_records:
        # Claimed again: the first run of this step may have gone on through a run of steps
        # recorded once and lost their record with its own (see sagas.store.Batch).
        mark_unrecorded_run(definition, saga.id, i)
    now = timezone.now()
    reason = _boundary_cancel_reason(definition, saga, now)
    if reason:
        # Earlier runs of this step may have taken effect: then it is undone too. At the pivot
        # the boundary asked already (it honours a cancel there only if none may have).
        rec.event("cancel_honoured", saga, step=step.name, detail=f"reason: {reason}")
        earlier = i != definition.pivot_index and effect_possible(saga, step.name, claimed=True)
        if earlier:
            rec.step_name = step.name
            rec.step_fields = {"maybe_effect": True, "status": StepStatus.FAILED}
        _start_compensation(
            definition,
            saga,
            rec,
            reason=reason,
            failed_index=i,
            failed_may_have_effect=earlier,
        )
        return write(saga, rec, inline_ok=inline_ok)

    max_attempts = max_attempts_of(step, compensating=False)
    if saga.attempt > max_attempts:
        # Claimed again and again without a record: the step keeps killing its worker.
        return _forward_exhausted(
            definition, saga, rec, error="attempts exhausted without an answer (worker lost)"
        )

    ticket = gate(step)
    if isinstance(ticket, provider_breaker.Wait):
        return _park_for_provider(saga, rec, step=step.name, wait=ticket, inline_ok=inline_ok)
    ctx = step_context(definition, saga, compensating=False)
    action = step.action
    if step.park is not None:
        decision = _resumed(step, saga) or waits.decide(step.park, saga, ctx, now)
        if decision.kind == "park":
            return _park(saga, step, rec, decision, now)
        if decision.kind == "timeout":
            return _wait_timed_out(definition, saga, step, rec, inline_ok=inline_ok)
        if decision.kind == "skip":
            # This saga does not wait here: on to the next step, with no event or result.
            rec.step_name = step.name
            rec.step_fields = {"status": StepStatus.SUCCEEDED, "result": waits.SKIPPED}
            _next_step(definition, saga, rec, i)
            return write(saga, rec, inline_ok=inline_ok)
        if decision.signal is not None:
            ctx = replace(ctx, signal=decision.signal.payload)
            rec.on_written = _consume(decision.signal, step.name)
        _unpark(saga, rec, wait_seconds=decision.seconds)
    batch = current_batch()
    if batch is not None and batch.pending:
        assert batch.tx is not None  # a batch only goes on into a transactional step
        tx = batch.tx
    else:
        tx = StepTransaction(step.transactional and step.park is None)
    started = time.perf_counter()
    try:
        with tracing.saga_span(f"saga.step {step.name}", saga, step=step.name, phase="forward"):
            result = call_step(
                action, ctx, ticket, step.non_retryable, tx, rec, timeout=step_timeout(step)
            )
    except BusinessFailure as exc:
        tx.rollback()
        duration = _took(saga, step, started, "forward")
        earlier = effect_possible(saga, step.name, claimed=True)
        rec.step_name = step.name
        rec.step_fields = {
            "status": StepStatus.FAILED,
            "attempts": saga.attempt,
            "last_error": f"{exc.code}: {exc.detail}"[:2000],
            "maybe_effect": earlier,
        }
        rec.event("step_failed", saga, step=step.name, detail=str(exc), duration_ms=duration * 1e3)
        rec.fields.update(failed_step=step.name, last_error=str(exc)[:2000])
        if i > definition.pivot_index:
            _escalate(saga, rec, step=step.name, error=f"{exc.code} after the pivot: {exc.detail}")
        else:
            _start_compensation(
                definition,
                saga,
                rec,
                reason=exc.code,
                failed_index=i,
                failed_may_have_effect=earlier,
            )
        return write(saga, rec, inline_ok=inline_ok)
    except Exception as exc:  # noqa: BLE001 - anything but a BusinessFailure is transient
        tx.rollback()
        duration = _took(saga, step, started, "forward")
        error = _describe(exc)
        rec.on_written = None  # a signal whose decision failed stays pending for the retry
        # A failure that may have come after the effect (a timeout) marks the step for undoing;
        # one raised before the call could take effect carries over what earlier runs left.
        maybe = not isinstance(exc, NothingHappened) or effect_possible(
            saga, step.name, claimed=True
        )
        rec.step_name = step.name
        rec.step_fields = {
            "status": StepStatus.RETRYING,
            "attempts": saga.attempt,
            "last_error": error,
            "maybe_effect": maybe,
        }
        wait = held_back(saga, step, ticket, last=saga.attempt >= max_attempts)
        if wait is not None:
            rec.fields["last_error"] = error
            return _park_for_provider(saga, rec, step=step.name, wait=wait, inline_ok=inline_ok)
        if saga.attempt >= max_attempts:
            rec.event("step_failed", saga, step=step.name, detail=error, duration_ms=duration * 1e3)
            return _forward_exhausted(definition, saga, rec, error=error, maybe_effect=maybe)
        _schedule_retry(
            saga,
            rec,
            step=step.name,
            phase="forward",
            error=error,
            took=duration,
            policy=step.retry,
        )
        return write(saga, rec, inline_ok=inline_ok)
    except BaseException:
        tx.rollback()
        raise

    try:
        duration = _took(saga, step, started, "forward")
        rec.step_name = step.name
        rec.step_fields = {
            "status": StepStatus.SUCCEEDED,
            "attempts": saga.attempt,
            "result": result,
            "took_effect": True,
        }
        rec.fields["results"] = {**saga.results, step.name: result}
        rec.event("step_succeeded", saga, step=step.name, duration_ms=duration * 1e3)
        _next_step(definition, saga, rec, i)
        if batch is not None and _batches_on(definition, saga, rec, i, tx, batch):
            return batch.defer(saga, rec, tx)
    except BaseException:
        tx.rollback()  # never leave a transactional step's transaction open on the connection
        raise
    return write(saga, rec, inline_ok=inline_ok, tx=tx)


def _batches_on(
    definition: SagaDefinition,
    saga: Saga,
    rec: Record,
    i: int,
    tx: StepTransaction,
    batch: Batch,
) -> bool:
    """Whether step ``i``'s record may wait for the next step's (see :class:`sagas.store.Batch`).

    Only between two steps the task goes straight on with (PostgreSQL), both transactional
    (the next one runs in the same transaction) or both sharing records (each commits its own
    writes, :attr:`sagas.definition.Step.shares_records`). Not into a step gated by a
    provider's breaker (its counters are shared rows, reported outside any saga's
    transaction), not for a saga type with a change hook (it hears of every record), and not
    into a step whose timeout this task cannot fit.
    """
    if not (settings.SAGA_BATCH_STEPS and rec.go_on and within_inline_budget()):
        return False
    nxt = definition.steps[i + 1]
    if not tx.open and not (definition.steps[i].shares_records and nxt.shares_records):
        return False
    if not tx.open and type_change_hook(saga) is not None:
        # A plain run's record is autocommitted, and for a type with a hook that would make it
        # one guarded on the saga's data: a flag set meanwhile would break the whole run.
        return False
    if rec.transitions or rec.carried or rec.on_written is not None or rec.ring_after is not None:
        return False
    if connection.vendor != "postgresql":
        return False  # SQLite would hold its one write lock across the steps
    if not batch.pending:
        # A worker lost mid-batch leaves the row at the batch's first step, so the claim that
        # picks the saga up again counts its attempt there: never start at a step that cannot
        # spare one, nor at the pivot (an attempt past the first means "may have run"); nor at
        # a step behind a provider's breaker, whose call ticket would stay out for the batch.
        step = definition.steps[i]
        if step.pivot or max_attempts_of(step, compensating=False) < 2:
            return False
        if step.provider and breakers_enabled():
            return False
    if tx.open and not nxt.transactional:
        return False
    if nxt.park is not None or (nxt.provider and breakers_enabled()):
        return False
    # A step that fails inside a batch is called again when the task goes on step by step,
    # before its failure counts: only for a step that may be tried more than once.
    if max_attempts_of(nxt, compensating=False) < 2:
        return False
    if step_timeout(nxt) > current_task_timeout() + TIMEOUT_SLACK:
        return False
    return change_hook(saga) is None


def _resumed(step: Step, saga: Saga) -> waits.WaitDecision | None:
    """A parked step whose action failed after its wait ended: run the action again.

    The wait was over (its signal arrived, or its timer ran out) when the action ran, and the
    failure's record left the wait; so this claim retries the action (with the signal, still
    unconsumed) instead of arriving at the step afresh. Arriving again would park a timer for
    its whole duration again, move the deadline on again, and give the attempts back, so an
    action that keeps failing would never exhaust them. The same holds for an operator's retry
    of such a step after it escalated (its row ``failed``).

    Only a saga that is not waiting and was retried (``attempt`` > 1) or failed before
    (``last_error``, which stays set after a later success, so a saga that once failed pays
    this read at each parked step it reaches) can be this case; only then is the step row
    read. A timer's action runs only if this saga did wait here (its ``waiting`` event): a step
    that was retrying as something else when a new definition made it a timer sleeps first.
    """
    if saga.waiting_since is not None or (saga.attempt <= 1 and not saga.last_error):
        return None
    park = step.park
    assert park is not None
    status = (
        SagaStep.objects.filter(saga_id=saga.id, name=step.name)
        .values_list("status", flat=True)
        .first()
    )
    if status not in (StepStatus.RETRYING, StepStatus.FAILED):
        return None  # never got past deciding (a worker lost while it decided): decide again
    if park.signal:
        signal = waits.pending_signal(saga.id, park.signal)
        return None if signal is None else waits.WaitDecision("run", signal=signal)
    slept = SagaEvent.objects.filter(saga_id=saga.id, kind="waiting", step=step.name).exists()
    return waits.WaitDecision("run") if slept else None


def _next_step(definition: SagaDefinition, saga: Saga, rec: Record, i: int) -> None:
    """Step ``i`` is done: go on to the next one, or succeed after the last.

    A ``Wait`` this saga will not wait at (its ``when`` says no: no 3-D Secure for this card,
    no review for this amount) is passed by in the same record, its row marked as skipped:
    the saga never stands at it, so a client never sees it as the step being run, and it
    costs no record of its own.
    """
    j = i + 1
    while j < len(definition.steps) and _passes_by(definition, saga, rec, j):
        rec.passed_steps.append(
            (definition.steps[j].name, {"status": StepStatus.SUCCEEDED, "result": waits.SKIPPED})
        )
        j += 1
    if j < len(definition.steps):
        rec.fields.update(step_index=j, current_step=definition.steps[j].name)
        rec.go_on = True
        rec.ahead = functools.partial(gate_ahead, definition.steps[j])
    else:
        rec.transitions.append("succeed")
        rec.fields.update(
            next_attempt_at=None, lease_until=None, finished_at=timezone.now(), attempt=0
        )
        rec.event("succeeded", saga)
        rec.finished = "succeeded"


def _passes_by(definition: SagaDefinition, saga: Saga, rec: Record, index: int) -> bool:
    """Whether the step at ``index`` is a ``Wait`` whose ``when`` says this saga will not wait
    there, asked as the step would ask it on arrival (with the results recorded so far).

    Not a pivot (a cancel is still honoured at a pivot's first attempt), and not when ``when``
    fails: the step then decides on arrival, as it always did.
    """
    step = definition.steps[index]
    park = step.park
    if park is None or park.when is None or step.pivot:
        return False
    probe = copy.copy(saga)
    probe.step_index, probe.current_step = index, step.name
    probe.results = rec.fields.get("results", saga.results)
    try:
        return not park.when(step_context(definition, probe, compensating=False))
    except Exception:  # noqa: BLE001 - the step itself asks again when the saga gets there
        return False


def _forward_exhausted(
    definition: SagaDefinition,
    saga: Saga,
    rec: Record,
    *,
    error: str,
    inline_ok: bool = True,
    maybe_effect: bool = True,
) -> Saga | None:
    """The step's attempts are spent: compensate (undoing the step too if a run of it may have
    taken effect, ``maybe_effect``), or, at or past the pivot, stop for a person."""
    i = definition.index_of(saga.current_step)
    step = definition.steps[i]
    rec.step_name = step.name
    rec.step_fields = {
        **rec.step_fields,
        "status": StepStatus.FAILED,
        "attempts": saga.attempt,
        "maybe_effect": maybe_effect,
        "last_error": error,
    }
    rec.fields.update(failed_step=step.name, last_error=error[:2000])
    if i >= definition.pivot_index:
        # The pivot (or a step past it) may have taken effect: nobody can undo that blindly.
        _escalate(saga, rec, step=step.name, error=f"step_failed at or after the pivot: {error}")
    else:
        _start_compensation(
            definition,
            saga,
            rec,
            reason="step_failed",
            failed_index=i,
            failed_may_have_effect=maybe_effect,
        )
    return write(saga, rec, inline_ok=inline_ok)


def _compensate(definition: SagaDefinition, saga: Saga, *, inline_ok: bool) -> Saga | None:
    rec = Record()
    i = definition.index_of(saga.current_step)
    step = definition.steps[i]
    rec.step_name = step.name
    max_attempts = max_attempts_of(step, compensating=True)
    if saga.attempt > max_attempts:
        rec.step_fields = {"status": StepStatus.COMPENSATION_FAILED}
        _escalate(saga, rec, step=step.name, error="compensation attempts exhausted (worker lost)")
        return write(saga, rec, inline_ok=False)
    ticket = gate(step)
    if isinstance(ticket, provider_breaker.Wait):
        return _park_for_provider(saga, rec, step=step.name, wait=ticket, inline_ok=inline_ok)
    ctx = step_context(definition, saga, compensating=True)
    tx = StepTransaction(step.transactional)
    started = time.perf_counter()
    try:
        assert step.compensate is not None
        with tracing.saga_span(
            f"saga.compensate {step.name}", saga, step=step.name, phase="compensation"
        ):
            call_step(step.compensate, ctx, ticket, tx=tx, rec=rec, timeout=step_timeout(step))
    except Exception as exc:  # noqa: BLE001 - a compensation must eventually succeed or escalate
        tx.rollback()
        duration = _took(saga, step, started, "compensation")
        error = _describe(exc)
        wait = held_back(saga, step, ticket, last=saga.attempt >= max_attempts)
        if wait is not None:
            rec.step_fields = {"status": StepStatus.COMPENSATING, "last_error": error}
            rec.fields["last_error"] = error
            return _park_for_provider(saga, rec, step=step.name, wait=wait, inline_ok=inline_ok)
        if saga.attempt >= max_attempts:
            rec.step_fields = {
                "status": StepStatus.COMPENSATION_FAILED,
                "compensation_attempts": saga.attempt,
                "last_error": error,
            }
            rec.event(
                "compensation_failed",
                saga,
                step=step.name,
                detail=error,
                duration_ms=duration * 1e3,
            )
            _escalate(saga, rec, step=step.name, error=f"compensation failed: {error}")
            return write(saga, rec, inline_ok=False)
        rec.step_fields = {
            "status": StepStatus.COMPENSATING,
            "compensation_attempts": saga.attempt,
            "last_error": error,
        }
        _schedule_retry(
            saga,
            rec,
            step=step.name,
            phase="compensation",
            error=error,
            took=duration,
            policy=step.compensation_retry,
        )
        return write(saga, rec, inline_ok=inline_ok)
    except BaseException:
        tx.rollback()
        raise

    duration = _took(saga, step, started, "compensation")
    metrics.COMPENSATIONS.labels(saga.saga_type, step.name).inc()
    rec.step_fields = {"status": StepStatus.COMPENSATED, "compensation_attempts": saga.attempt}
    rec.event("compensation_succeeded", saga, step=step.name, duration_ms=duration * 1e3)
    nxt = next_compensable(definition, saga, i, *ladder_rows(saga.id))
    if nxt is None:
        rec.transitions.append("finish_compensation")
        rec.fields.update(
            next_attempt_at=None, lease_until=None, finished_at=timezone.now(), attempt=0
        )
        rec.event("compensated", saga, detail=f"reason: {saga.failure_code}")
        rec.finished = "compensated"
    else:
        rec.fields.update(step_index=nxt, current_step=definition.steps[nxt].name)
        rec.go_on = True
    return write(saga, rec, inline_ok=inline_ok, tx=tx)


# ---------------------------------------------------------------------------------------------
# Parked steps (Wait, Sleep): see sagas.waits for the decision
# ---------------------------------------------------------------------------------------------
def _unpark(saga: Saga, rec: Record, *, wait_seconds: float | None = None) -> None:
    """Leaving a parked step, whichever way: the saga no longer waits for anything. The wait
    ended early by its signal (``wait_seconds``: its length) gives back what it did not use."""
    if saga.waiting_since is not None or saga.waiting_for:
        rec.fields.update(waiting_for="", waiting_since=None)
        if wait_seconds:
            _unused_wait_back(saga, rec, wait_seconds)


def _unused_wait_back(saga: Saga, rec: Record, seconds: float) -> None:
    """The deadline moved by the wait's whole length when it began (:func:`_park`); a wait
    that ended early (its signal came) gives back what it did not use, so the deadline bounds
    the saga's working time, not the time its wait might have taken. ``seconds`` is the length
    the step's row kept, the one the deadline moved by, whatever the setting says now. (A wait
    left for compensation or a person needs none: the deadline only bounds running forward,
    and a person resuming a saga gives it its working time again.)"""
    if saga.deadline_at is None or saga.waiting_since is None:
        return
    unused = saga.waiting_since + timedelta(seconds=seconds) - timezone.now()
    if unused > timedelta(0):
        rec.fields["deadline_at"] = saga.deadline_at - unused


def _park(
    saga: Saga, step: Step, rec: Record, decision: waits.WaitDecision, now: datetime
) -> Saga | None:
    """Park the saga: no lease, due at its timeout (or never), and nothing else to do (unless
    a cancel request came while it decided: then the saga to honour it with).

    The first time it parks at this step, the wait starts (``waiting_since``), the timeline
    says what it waits for, and its deadline moves by the wait's length: the deadline bounds
    the time a saga works, and a declared wait bounds itself (what it does not use is given
    back when it ends, :func:`_unused_wait_back`).
    """
    park = step.park
    assert park is not None
    rec.fields.update(
        waiting_for=park.signal, next_attempt_at=decision.wake_at, lease_until=None, attempt=0
    )
    if saga.waiting_since is None:
        rec.fields["waiting_since"] = now
        rec.step_name = step.name
        # The row's count as the park leaves the saga's (0): see _park_for_provider.
        rec.step_fields = {
            "status": StepStatus.WAITING,
            "attempts": 0,
            "wait_seconds": decision.seconds,
        }
        until = f"until {decision.wake_at.isoformat()}" if decision.wake_at else "with no timeout"
        what = f"for signal {park.signal}" if park.signal else "timer"
        rec.event("waiting", saga, step=step.name, detail=f"{what} {until}")
        if saga.deadline_at is not None and decision.seconds:
            rec.fields["deadline_at"] = saga.deadline_at + timedelta(seconds=decision.seconds)
    if decision.wake_at is not None:
        # Short timers also get a doorbell with a countdown (on time, no sweep needed); long
        # ones rely on the sweeper alone, so a million parked sagas are only rows.
        delay = (decision.wake_at - now).total_seconds()
        if delay <= settings.SAGA_TIMER_RING_WITHIN:
            rec.ring_after = max(delay, 0.0)
    return write(saga, rec, inline_ok=False)


def _wait_timed_out(
    definition: SagaDefinition, saga: Saga, step: Step, rec: Record, *, inline_ok: bool
) -> Saga | None:
    park = step.park
    assert park is not None
    i = definition.index_of(saga.current_step)
    error = f"no {park.signal} signal within {park.duration or 0:g}s"
    rec.step_name = step.name
    rec.step_fields = {"status": StepStatus.FAILED, "attempts": saga.attempt, "last_error": error}
    rec.event("wait_timed_out", saga, step=step.name, detail=error)
    rec.fields.update(failed_step=step.name, last_error=error)
    if park.on_timeout == "escalate" or i > definition.pivot_index:
        _escalate(saga, rec, step=step.name, error=error)
    else:
        _start_compensation(
            definition, saga, rec, reason="timed_out", failed_index=i, failed_may_have_effect=False
        )
    return write(saga, rec, inline_ok=inline_ok)


def _consume(signal: SagaSignal, step: str) -> Callable[[], None]:
    def mark() -> None:
        SagaSignal.objects.filter(pk=signal.pk, consumed_at__isnull=True).update(
            consumed_at=timezone.now(), consumed_by=step
        )

    return mark


def run_claimed(saga: Saga, *, inline_ok: bool) -> Saga | None:
    """Do the one piece of work a claimed saga has; return it if the task should go on."""
    definition = definition_of(saga)
    timeout = step_timeout(definition.step(saga.current_step))
    if timeout > current_task_timeout() + TIMEOUT_SLACK:
        batch = current_batch()
        if batch is not None and batch.pending:
            raise batch.broken()  # not reached: a batch only goes on into a step that fits
        _hand_back(saga, timeout)
        return None
    if saga.state == SagaState.RUNNING:
        return _forward(definition, saga, inline_ok=inline_ok)
    if saga.state == SagaState.COMPENSATING:
        return _compensate(definition, saga, inline_ok=inline_ok)
    return None


def _hand_back(saga: Saga, timeout: float) -> None:
    """The claimed step needs longer than this task may run (its doorbell was rung without the
    step's timeout): release the claim as if it never happened (no attempt counted) and ring
    again with time limits that fit the step."""
    _let_go(saga, timeout, attempt=saga.attempt - 1)
    log.info("saga.handed_back", saga_id=str(saga.id), step=saga.current_step, timeout=timeout)
    return None


def _let_go(saga: Saga, timeout: float, **fields: Any) -> None:
    """End this task's claim (the lease) with the saga due now, and ring for a task of its own
    with time limits that fit ``timeout``; ``fields``: more columns to set in the same write."""
    now = timezone.now()
    with transaction.atomic():
        updated = fenced_update(
            saga.id,
            saga.version,
            {"lease_until": released_lease(timeout, now), "next_attempt_at": now, **fields},
        )
        if updated is not None:
            ring_on_commit(saga.id, updated.version, None, timeout)


def _after_broken_batch(snapshot: Saga) -> Saga | None:
    """The saga to go on with after a batch was rolled back, or ``None`` if it is not ours.

    The row as it is now: the batch changed nothing, so a row at the claimed version is the
    claimed saga, with whatever was recorded without a new version meanwhile (a cancel
    request, which the next boundary then honours before any step runs again). A newer
    version means a newer claim or an operator holds the saga: this delivery is stale.
    """
    row = Saga.objects.filter(pk=snapshot.pk).first()
    if row is None or row.version != snapshot.version:
        metrics.STALE_DELIVERIES.inc()
        log.info("saga.batch_fenced", saga_id=str(snapshot.id), version=snapshot.version)
        return None
    return row


def advance(
    saga_id: Any, version: int, timeout: float | None = None, *, pump: str | None = None
) -> None:
    """The body of the ``sagas.run`` task: claim, then run due work within a time budget.

    ``timeout`` is the step timeout the task was sent for (its time limits derive from it);
    ``None`` (a direct call) means :func:`~sagas.timing.task_step_timeout`. ``pump``: the
    doorbell came with a pump slot, so the task goes on to other due sagas after this one
    (:mod:`sagas.pumps`).
    """
    started = time.monotonic()
    token = task_timeout.set(timeout)
    until = inline_until.set(started + settings.SAGA_INLINE_BUDGET)
    try:
        if pump is not None:
            _pump(lambda: claim(saga_id, version, timeout), pump)
            return
        saga = claim(saga_id, version, timeout)
        if saga is None:
            metrics.STALE_DELIVERIES.inc()
            return
        _drive(saga)
    finally:
        # Outcomes of calls in steps' own transactions that nothing carried (the task's
        # last step was one): reported before the task ends, not left for the next.
        provider_breaker.report_deferred()
        provider_breaker.drop_ahead()  # an admission made for a step this task did not run
        inline_until.reset(until)
        task_timeout.reset(token)


def _drive(claimed: Saga) -> None:
    """Run a claimed saga's due work, step after step, while this task's budget lasts."""
    # A saga claimed again (its last task died, or its record was fenced off) runs this task
    # step by step, so a step that keeps failing is found and charged.
    batching = open_batch(enabled=claimed.attempt == 1)
    saga: Saga | None = claimed
    try:
        with tracing.saga_span("saga.task", claimed):
            while saga is not None:
                try:
                    saga = run_claimed(saga, inline_ok=within_inline_budget())
                except BatchBroken as broken:
                    # Rolled back: go on step by step, one record each, as usual; or, past the
                    # budget (the batch's last step ran long), in a task of its own.
                    close_batch(batching)
                    batching = open_batch(enabled=False)
                    saga = _after_broken_batch(broken.snapshot)
                    if saga is not None and not within_inline_budget():
                        # The attempt the claim counted stays counted: that task goes step by
                        # step, so it lands on the step that needs it.
                        _let_go(saga, timeout_at(saga, saga.current_step))
                        saga = None
    finally:
        close_batch(batching)


def _pump(first: Callable[[], Saga | None], slot: str) -> None:
    """Claim and run the doorbell's own saga (``first``), then the oldest due sagas, while the
    budget lasts; then give the slot back and look once more (see :mod:`sagas.pumps`).

    The last look comes after the slot is back: a start that found every slot taken rang
    nothing, and counts on it. If it finds a due saga, the task takes a slot again and goes on
    (within its budget) or hands the slot to a doorbell for that saga; with every slot taken,
    their holders look after this one; see :func:`_last_look` for Redis not answering. A task
    that fails gives its slot back and looks too.
    """
    # A task sent with shorter limits than a pump needs (a sender with other settings or
    # definitions) would hand back sagas it took: it runs its own saga only, but still looks at
    # the end.
    pumping = current_task_timeout() + TIMEOUT_SLACK >= task_step_timeout()
    held: str | None = slot
    with claiming_ahead() if pumping else contextlib.nullcontext() as ahead:
        try:
            # Its own saga may well be gone (a pump took it meanwhile): that is not a stale
            # delivery worth counting, it is how pumps share the work.
            saga = first()
            if saga is not None:
                _drive(saga)
            while True:
                took = 0
                while pumping:
                    # Mostly claimed already, by the record that let go of the saga before;
                    # otherwise claimed here. Either way only within the budget: a record
                    # claims ahead and the task may go on with its own saga (a cancel seen
                    # at the record), so the budget may have run out since.
                    saga = ahead.take() if ahead is not None else None
                    if not within_inline_budget():
                        if saga is not None:
                            _release_claimed_ahead(saga)
                        break
                    if saga is None:
                        saga = claim_due()
                        if saga is None:
                            break
                    took += 1
                    metrics.PUMP_CLAIMS.inc()
                    _drive(saga)
                held = None
                pumps.release(slot)
                again = _last_look(go_on=pumping and bool(took), slotless=slot == pumps.NO_SLOT)
                if again is None:
                    return
                held = slot = again
        except BaseException:
            if ahead is not None:
                _hand_back_ahead(ahead)
            if held is not None:
                pumps.release(held)
                with contextlib.suppress(Exception):  # the task is failing: the look is a bonus
                    _last_look(go_on=False, slotless=held == pumps.NO_SLOT)
            raise


def _hand_back_ahead(ahead: ClaimAhead) -> None:
    """A failing pump's sagas claimed ahead and not run: each released as if never claimed,
    with a doorbell. If that fails too, the leases run out and the sweeper rings for them."""
    while (saga := ahead.take()) is not None:
        with contextlib.suppress(Exception):
            _release_claimed_ahead(saga)


def _release_claimed_ahead(saga: Saga) -> None:
    """A saga a pump claimed ahead and will not run: its claim undone (no attempt counted, no
    lease) and a doorbell rung for it."""
    _let_go(saga, timeout_at(saga, saga.current_step), attempt=saga.attempt - 1)
    log.info("saga.claim_ahead_released", saga_id=str(saga.id), step=saga.current_step)


def _last_look(*, go_on: bool, slotless: bool) -> str | None:
    """The look after a pump gave its slot back: a slot to go on pumping with, or ``None``.

    If a saga is due and the task does not go on, a doorbell for it: with a new slot if one is
    free; none if every slot is taken (their holders look after this one). With Redis not
    answering, a pump that held a slot goes on, or sends a pump doorbell, holding none (the
    sagas started before Redis stopped answering still have a pump; those started since ring
    their own doorbells); one that held none, or one on a worker with slots off, sends a plain
    doorbell for the saga and ends the chain.

    A look the database does not answer (its connection was dropped by a server restart or an
    idle timeout) ends the chain with a warning instead of failing a task whose sagas are done
    and recorded: the sweeper sends a pump for any saga left waiting (:func:`sagas.sweeper.sweep`),
    and the worker replaces the connection before its next task.
    """
    try:
        due = due_saga()
    except (OperationalError, InterfaceError) as exc:  # not a bug in the query: those raise
        log.warning("saga.pump_last_look_failed", error=repr(exc))
        return None
    if due is None:
        return None
    got = pumps.acquire()
    if got is None:
        return None
    if got is pumps.OFF or (got is pumps.DOWN and slotless):
        ring(due[0], due[1])
        return None
    slot = got if isinstance(got, str) else pumps.NO_SLOT
    if go_on and within_inline_budget():
        return slot
    # Out of budget; or this round took nothing (the saga it sees was locked a moment ago): a
    # doorbell with the slot, rather than looking again here.
    ring(due[0], due[1], pump=slot)
    return None
