"""The provider seam: a gate before a participant call, an outcome report after it.

A step that names its ``provider`` asks that provider's breaker (:mod:`providers.breaker`)
for a call first and reports how the call went afterwards; the runner decides what a closed
gate or a failure means for the saga. Steps without a provider, or with breakers off, are
called as they are.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import DataError, IntegrityError
from django.db.transaction import TransactionManagementError

from providers import breaker as provider_breaker
from providers.config import breakers_enabled
from sagas.definition import BusinessFailure, ProviderAnswered, Step, StepContext, StepFunction
from sagas.models import Saga, SagaStep
from sagas.store import Carried, Record, StepTransaction
from sagas.timing import step_deadline, step_timeout
from sagas.transactions import StepTransactionSpoiled, spoiled

#: Errors that say the call's own data is wrong, whatever the provider's health: our database
#: refused a row or a value (a constraint, SQLSTATE class 23; a value it cannot hold, class
#: 22). They are retried like any transient error and end, as usual, in a compensation or a
#: person; but they are no sign of an outage. Counted as failures, one bad row would open the
#: breaker and park every saga bound for that provider, and the failing sagas' own canaries
#: would keep it open. Everything else still counts: a lost connection (OperationalError), and
#: a ProgrammingError too, since a missing table or a revoked grant fails every call alike.
NOT_AN_OUTAGE: tuple[type[BaseException], ...] = (IntegrityError, DataError)
# Retried, but the provider is not down: it answered, or the call is at fault.
# A step function that swallowed an error of its transactional step and went on: the function
# is at fault (StepTransactionSpoiled, or Django refusing its next query), not the provider.
_NOT_DOWN: tuple[type[BaseException], ...] = (
    ProviderAnswered,
    StepTransactionSpoiled,
    TransactionManagementError,
    *NOT_AN_OUTAGE,
)


def gate(step: Step) -> provider_breaker.Ticket | provider_breaker.Wait | None:
    """Ask the step's provider for a call: a ticket, a wait, or ``None`` if it is not gated.

    The admission carries the outcomes of earlier calls made in a step's own transaction
    (:func:`~providers.breaker.defer_outcome`); a step that asks for none reports them first.
    """
    if not step.provider or not breakers_enabled():
        provider_breaker.report_deferred()
        provider_breaker.drop_ahead()
        return None
    return provider_breaker.admit(step.provider, step_timeout(step))


def gate_ahead(step: Step, landed: str) -> Carried | None:
    """The admission of ``step`` for the record that hands the saga straight on to it to carry
    (:func:`~providers.breaker.admission_ahead`): the step's :func:`gate` then asks nothing of
    the database in the usual case, one round trip fewer per provider call. ``landed``: the
    record's SQL condition that it landed, without which no call slot is taken."""
    if not step.provider or not breakers_enabled() or step.park is not None:
        return None
    admission = provider_breaker.admission_ahead(step.provider, step_timeout(step), landed)
    if admission is None:
        return None
    return Carried(
        admission.ctes,
        admission.params,
        done=_nothing,
        alone=_nothing,
        columns=admission.columns,
        took=admission.took,
    )


def _nothing() -> None:
    return None


def call_step(
    fn: StepFunction,
    ctx: StepContext,
    ticket: provider_breaker.Ticket | None,
    definite: tuple[type[BaseException], ...] = (),
    tx: StepTransaction | None = None,
    rec: Record | None = None,
    *,
    timeout: float | None = None,
) -> Any:
    """Call a step function; its provider's health counts transient failures only.

    ``definite`` (the step's ``non_retryable``) are definite answers too: raised again as a
    :class:`BusinessFailure` carrying the exception's ``code`` (else ``step_failed``).

    A transactional step's outcome is reported outside its transaction (after a failure rolled
    it back, or once the record has committed or been fenced off): the provider's counters are
    shared rows that must neither wait for, nor vanish with, one saga's transaction. A healthy
    one rides in the task's next admission or in the next step's record
    (:func:`~providers.breaker.defer_outcome`).

    Any other step that succeeds hands its outcome to ``rec``, the record the runner writes
    next: the slot release and the health count ride in the record's own statement, one round
    trip fewer per provider call.

    ``timeout``: the step's own; the function is cut off past it (:func:`step_deadline`). Only
    the function: an alarm in the bookkeeping around it would turn a definite answer into a
    transient failure, or skip the report that hands the call slot back.
    """
    try:
        if timeout is None:
            result = fn(ctx)
        else:
            with step_deadline(timeout):
                result = fn(ctx)
        if tx is not None and tx.open and spoiled():
            # The function caught an error that left a savepoint-free block and returned
            # anyway: its transaction can only roll back, and its record would die with it.
            raise StepTransactionSpoiled(
                "the step function returned after an error spoiled its step's transaction "
                "(an exception caught after it left step_atomic()); nothing it wrote is kept"
            )
    except BusinessFailure:
        if tx is not None:
            tx.rollback()
        provider_breaker.report(ticket, ok=True)  # a definite answer: the provider is healthy
        raise
    except definite as exc:  # empty: catches nothing
        if tx is not None:
            tx.rollback()
        provider_breaker.report(ticket, ok=True)
        raise BusinessFailure(getattr(exc, "code", "") or "step_failed", str(exc)) from exc
    except _NOT_DOWN:
        if tx is not None:
            tx.rollback()
        provider_breaker.report(ticket, ok=True)  # retried, but the provider is not down
        raise
    except BaseException:
        if tx is not None:
            tx.rollback()
        provider_breaker.report(ticket, ok=False)
        raise
    if tx is not None and tx.open:
        tx.after(lambda: provider_breaker.defer_outcome(ticket))
        return result
    outcome = provider_breaker.carried_outcome(ticket) if rec is not None else None
    if rec is not None and outcome is not None:
        rec.carry(outcome.ctes, outcome.params, done=outcome.carried, alone=outcome.report)
        # An earlier transactional step's outcome, still waiting for a statement (its admission
        # was made ahead, in the record before this step), rides here too.
        deferred = provider_breaker.take_deferred(other_than=outcome.ticket.provider)
        if deferred is not None:
            rec.carry(deferred.ctes, deferred.params, done=deferred.carried, alone=deferred.report)
    else:
        provider_breaker.report(ticket, ok=True)
    return result


def held_back(
    saga: Saga, step: Step, ticket: provider_breaker.Ticket | None, *, last: bool
) -> provider_breaker.Wait | None:
    """A failed call the outage is to blame for, not the request: wait, and spend nothing.

    ``last``: the call was the step's last attempt. Two cases park the saga (the park gives
    the attempt back):

    - **A canary's call failed** while the breaker is not closed. It probed a provider known
      to be failing, on the breaker's behalf. Counted, a long outage would spend the attempts
      of whichever sagas happen to be picked as canaries round after round, and cancel them
      while the provider is still down. If the round closed the breaker anyway (the other
      canaries got through), the failure is the request's own and counts as usual.
    - **The last attempt failed and the provider is failing**: its breaker is open now (maybe
      opened by this very failure), or it opened and closed again while the call ran, or it is
      still closed but has answered nobody since the call before this one, or its most recent
      calls fail at its failure rate (an outage just begun; see
      :func:`providers.breaker.held_back`). The attempts went on the outage, so the saga keeps
      its last one for after it. With the breaker not closed, every time: a saga kept once,
      woken when the provider came back, whose call fails as it goes down again is kept again
      (the gate lets no call through meanwhile but canaries, so this cannot loop on the
      provider). With the breaker closed, a bounded number of times per generation of the
      breaker (its step row counts them): a saga held back so often since the breaker last
      closed gives up as usual (or, the provider still answering nobody, opens the breaker and
      waits on it), so a provider failing below its breaker's threshold does not keep a saga
      calling it for ever, while one woken after a close whose call fails as the provider goes
      down again is held back again.
    """
    if ticket is None:
        return None
    if ticket.canary:
        return provider_breaker.held_back(step.provider)
    if not last:
        return None
    return provider_breaker.held_back(
        step.provider,
        generation=ticket.generation,
        attempts=saga.attempt,
        previous=lambda: _previous_attempt(saga, step),
        kept_before=lambda generation: _held_in(saga, step, generation),
    )


def _held_in(saga: Saga, step: Step, generation: int) -> int:
    """How many times the saga's failed last attempt at ``step`` was held back on the
    provider's closed breaker in ``generation`` (its step row remembers the generation of its
    latest holds and their number)."""
    row = (
        SagaStep.objects.filter(saga_id=saga.id, name=step.name)
        .values_list("held_generation", "held_times")
        .first()
    )
    if row is None or row[0] != generation:
        return 0
    return row[1] or 1  # held back by a worker that did not count its holds: once


def _previous_attempt(saga: Saga, step: Step) -> datetime | None:
    """When the saga's attempt before this one at ``step`` was recorded (its step row's last
    write: this attempt's record is not written yet)."""
    return (
        SagaStep.objects.filter(saga_id=saga.id, name=step.name)
        .values_list("updated_at", flat=True)
        .first()
    )
