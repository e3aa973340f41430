"""Engine services: start a saga, request its cancellation, and the ops operations.

The admin and the REST API call these and nothing else to change a saga: each operation checks
its permission, refuses with a clear :class:`SagaOperationRefused` where it makes no sense,
writes a timeline event naming the acting user, and fences its write on the saga's version so
it can never race a worker into an inconsistent row.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import structlog
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.utils import timezone

from audit.services import audit_record
from config.text import trimmed
from sagas import metrics, tracing
from sagas.definition import (
    SagaDefinition,
    UnknownDefinition,
    change_hook,
    definition_of,
    forward_key,
    get_definition,
    next_compensable,
    step_context,
    undo_key,
)
from sagas.doorbell import ring_on_commit
from sagas.exceptions import SagaOperationRefused
from sagas.models import (
    TERMINAL_STATES,
    Saga,
    SagaEvent,
    SagaState,
    SagaStep,
    StepStatus,
    state_said,
)
from sagas.store import (
    effect_possible,
    insert_new,
    ladder_rows,
    mark_unrecorded_run,
    run_suspects,
)
from sagas.timing import step_timeout

log = structlog.get_logger("sagas.services")

OPS_PERMISSION = "sagas.operate_saga"
#: The longest note or reason a person may give an ops action (resolve, undo done, compensate),
#: on the ops console and the API alike: what a timeline line keeps. Longer is refused, not cut.
NOTE_MAX = 2000


def _event(saga: Saga, kind: str, *, actor: str, detail: str = "", step: str = "") -> None:
    SagaEvent.objects.create(
        saga=saga,
        at=timezone.now(),
        kind=kind,
        step=step,
        attempt=saga.attempt,
        detail=detail[:NOTE_MAX],
        actor=actor[:150],
    )
    log.info(
        f"saga.{kind}",
        saga_id=str(saga.id),
        saga_type=saga.saga_type,
        step=step or saga.current_step,
        actor=actor,
        correlation_id=saga.correlation_id,
    )


def audit_ops_events(events: Iterable[SagaEvent]) -> None:
    """One audit entry per ``ops_*`` event (the engine's own events are skipped): the operator,
    the saga, and the address and channel of the request being served.

    ``sagas.audit_hooks`` calls it for each event saved one by one; code that writes ops events
    with ``bulk_create`` (no ``post_save``: ``saga_migrate --apply``) calls it itself. Call it
    inside the transaction that wrote the events, so both commit or neither does.
    """
    users: dict[str, Any] = {}
    for event in events:
        if not event.kind.startswith("ops_"):
            continue
        name = event.actor.removeprefix("user:")
        if name not in users:
            users[name] = (
                get_user_model().objects.filter(username=name).first()
                if event.actor.startswith("user:")
                else None
            )
        audit_record(
            f"saga.{event.kind.removeprefix('ops_')}",
            actor=users[name],
            actor_name=name,
            target=f"saga:{event.saga_id}",
            detail={"step": event.step, "note": event.detail},
        )


def _actor(user: Any) -> str:
    return f"user:{user.get_username()}" if user is not None else "system"


def _require_ops(user: Any) -> None:
    if user is None or not user.is_active or not user.has_perm(OPS_PERMISSION):
        raise PermissionDenied("You need the 'operate sagas' permission (the ops group).")


def _save(saga: Saga, fields: list[str]) -> None:
    """Write a locked saga row, bumping its version so any queued doorbell becomes stale."""
    saga.version += 1
    saga.updated_at = timezone.now()
    Saga.objects.filter(pk=saga.pk).update(
        version=saga.version,
        updated_at=saga.updated_at,
        state=saga.state,
        **{f: getattr(saga, f) for f in fields},
    )
    _told(saga)


def _told(saga: Saga) -> None:
    """Tell the saga type's change hook (see ``ChangeHook``), in the caller's transaction,
    what changed since :func:`_locked` read the row (or since the last time it was told)."""
    before = saga.__dict__.pop("_before", None)
    hook = change_hook(saga)
    if hook is not None and before is not None:
        hook(before, saga)
    saga.__dict__["_before"] = copy.copy(saga)  # beside the fields, as _told pops it


def _locked(saga_id: Any, expected_version: int | None = None) -> Saga:
    """The saga's row, locked until the transaction ends.

    ``expected_version`` is the version a person's decision was made on (the page they saw):
    a saga that has moved since is refused (``changed``), so a double submit or a stale page
    does not act a second time or on a saga nobody looked at. Without it, only the rules of
    the operation are checked (the API, the engine).
    """
    try:
        saga = Saga.objects.select_for_update().get(pk=saga_id)
    except Saga.DoesNotExist:
        raise SagaOperationRefused("not_found", "No such saga.") from None
    if expected_version is not None and saga.version != expected_version:
        now = state_said(saga.state, at=saga.current_step)
        raise SagaOperationRefused(
            "changed",
            f"The saga changed since your page showed it: it {now} now; reload and decide again.",
        )
    saga.__dict__["_before"] = copy.copy(saga)  # what _told() compares with
    return saga


def _leased(saga: Saga) -> bool:
    return saga.lease_until is not None and saga.lease_until > timezone.now()


# ---------------------------------------------------------------------------------------------
# Start and cancel
# ---------------------------------------------------------------------------------------------
def saga_start(
    *,
    saga_type: str,
    data: dict[str, Any],
    correlation_id: str = "",
    saga_id: uuid.UUID | None = None,
    deadline_seconds: float | None = None,
    version: int | None = None,
) -> Saga:
    """Create a saga, its step rows and its first timeline event; ring on commit.

    Usable inside the caller's transaction: if the caller rolls back, no saga exists and no
    doorbell rings. The saga starts on the newest registered version of its type and stays
    on it (its row records the version and the definition's fingerprint). ``version`` starts
    it on another registered version instead (a canary, a test).
    """
    definition = get_definition(saga_type, version)
    now = timezone.now()
    deadline = deadline_seconds if deadline_seconds is not None else _working_time(definition)
    first = definition.steps[0].name
    saga = Saga(
        id=saga_id or uuid.uuid4(),
        saga_type=saga_type,
        definition_version=definition.version,
        definition_fingerprint=definition.fingerprint,
        current_step=first,
        step_index=0,
        next_attempt_at=now,
        deadline_at=now + timedelta(seconds=deadline),
        data=data,
        correlation_id=correlation_id,
        trace_context=tracing.current_carrier(),
    )
    insert_new(
        saga,
        [(s.name, forward_key(saga.id, s.name)) for s in definition.steps],
        SagaEvent(
            saga=saga, at=now, kind="started", detail=f"type {saga_type} v{definition.version}"
        ),
    )
    ring_on_commit(saga.id, saga.version, None, step_timeout(definition.steps[0]), due_now=True)
    transaction.on_commit(lambda: metrics.SAGAS_STARTED.labels(saga_type).inc())
    return saga


def saga_data_flag(*, saga_ids: Any, key: str) -> int:
    """Set ``data[key] = true`` on those of ``saga_ids`` (ids or a subquery) not yet settled;
    return how many changed.

    For a change hook whose ``wants`` reads a flag in ``data`` (see ``ChangeHook``), when what
    it depends on changes after a saga started (a client registers a webhook endpoint while
    its orders run). The version does not move, so a step in flight still records, and tells
    the hook in the record's own transaction like every later record: it reads the flag back
    with its row, or, had it been one autocommitted statement, is guarded on the ``data`` its
    claim read and made again in a transaction (``sagas.store.write``). Runs in the caller's
    transaction, under the rows' locks.
    """
    changed = 0
    with transaction.atomic():
        rows = (
            Saga.objects.select_for_update()
            .filter(pk__in=saga_ids)
            .exclude(state__in=TERMINAL_STATES)
            .only("id", "data")
        )
        for saga in rows:
            if not saga.data.get(key):
                Saga.objects.filter(pk=saga.pk).update(data={**saga.data, key: True})
                changed += 1
    return changed


# ---------------------------------------------------------------------------------------------
# Whether an operation is allowed: the one place the rules live
# ---------------------------------------------------------------------------------------------
def _definition(saga: Saga) -> SagaDefinition:
    """The definition the saga runs on, or a refusal (``definition_missing``) when this code
    does not register it (a type or version from another release): an operation that needs it
    is refused with the reason instead of failing with an error."""
    try:
        return definition_of(saga)
    except UnknownDefinition:
        raise _definition_missing(saga) from None


def _definition_missing(saga: Saga) -> SagaOperationRefused:
    return SagaOperationRefused(
        "definition_missing",
        f"This code does not register {saga.saga_type} v{saga.definition_version}, the "
        "definition the saga runs on; deploy code that has it, then try again.",
    )


def saga_definition_refusal(saga: Saga) -> SagaOperationRefused | None:
    """The refusal (``definition_missing``) of every operation that needs the saga's
    definition, when this code does not register it; None when it does. For a caller that
    must answer before the engine is asked (the orders API: the engine cannot tell a
    client's signal from another's without the definition, and would deny it)."""
    try:
        definition_of(saga)
    except UnknownDefinition:
        return _definition_missing(saga)
    return None


def saga_waits_on_undo(saga: Saga) -> bool:
    """Stopped because the undo of its current step kept failing (see :func:`saga_undo_done`)."""
    return saga.state == SagaState.NEEDS_MANUAL and saga.escalated_from == SagaState.COMPENSATING


def resumed_forward(saga: Saga) -> list[str]:
    """Back to running from ``needs_manual`` by a person (retry now, or the signal it waited
    for): the transition, and a deadline that gives it its working time again. The deadline
    kept running while the saga waited for the person; left as it was, the first boundary
    would time out the saga the person just let go on. Returns the columns to save."""
    saga.resume_forward()
    if saga.deadline_at is None:
        return []
    seconds = _working_time(_definition(saga))
    saga.deadline_at = max(saga.deadline_at, timezone.now() + timedelta(seconds=seconds))
    return ["deadline_at"]


def _working_time(definition: SagaDefinition) -> float:
    """Seconds a saga of this type may run forward: its own ``deadline``, else SAGA_DEADLINE."""
    return definition.deadline if definition.deadline is not None else settings.SAGA_DEADLINE


def saga_stopped_before_pivot(saga: Saga) -> bool:
    """Stopped for a person while going forward, before its pivot ever ran.

    Only a :func:`~sagas.definition.Wait` with ``on_timeout="escalate"`` does this (every
    other forward escalation happens at or past the pivot). Nothing it did is out of reach:
    it can still be compensated (or cancelled by its client), and resolving it gives its
    effects up rather than keeping them, so it is refused while they are in place.
    """
    if saga.state != SagaState.NEEDS_MANUAL or saga.escalated_from != SagaState.RUNNING:
        return False
    return step_before_pivot(saga, saga.current_step)


def step_before_pivot(saga: Saga, step: str) -> bool:
    """Whether ``step`` comes before the pivot in the saga's own definition version."""
    try:
        definition = definition_of(saga)
        return definition.index_of(step) < definition.pivot_index
    except (LookupError, ValueError):  # a version or step this process does not have
        return False


def saga_refusal(saga: Saga, operation: str) -> SagaOperationRefused | None:
    """Why ``operation`` would be refused on ``saga`` as it stands now, or None.

    ``operation`` is ``cancel``, ``compensate``, ``resolve``, ``retry`` or ``undo_done``. The
    services ask this under the row lock before they act; the ops console asks it first, so an
    operator sees what will be refused (and why, in the same words) before confirming. An
    operation that needs the saga's definition is refused (``definition_missing``) where this
    code does not register it.
    """
    try:
        return _rule_refusal(saga, operation)
    except SagaOperationRefused as refusal:  # the definition it needs is not registered here
        return refusal


def _rule_refusal(saga: Saga, operation: str) -> SagaOperationRefused | None:
    if operation == "compensate" and saga_waits_on_undo(saga):
        return SagaOperationRefused(
            "already_compensating",
            "This saga is already compensating and a compensation needs help: "
            "use retry now, or resolve it with a note.",
        )
    if operation in ("cancel", "compensate"):
        verb = "compensated" if operation == "compensate" else "cancelled"
        if saga.state != SagaState.RUNNING and not saga_stopped_before_pivot(saga):
            return SagaOperationRefused(
                "not_running",
                f"The saga {state_said(saga.state)}; only a running saga can be {verb}.",
            )
        if operation == "compensate" and saga.state == SagaState.RUNNING and saga.cancel_reason:
            # A cancel asked for again changes nothing (a client retrying is told yes), but an
            # operator told "compensation requested" would believe the order now stops as
            # step_failed: it stops as its client asked, with the client's reason.
            return SagaOperationRefused(
                "already_cancelling",
                f"A cancel is already in progress ({saga.cancel_reason}): the saga stops at its "
                "next step boundary and undoes what took effect; there is nothing to add.",
            )
        definition = _definition(saga)
        if definition.index_of(saga.current_step) >= definition.pivot_index:
            return SagaOperationRefused(
                "pivot_reached",
                f"The saga has reached {definition.steps[definition.pivot_index].name}, "
                f"its point of no return; it can no longer be {verb}.",
            )
    if operation == "resolve" and saga.state != SagaState.NEEDS_MANUAL:
        return SagaOperationRefused(
            "not_needs_manual",
            f"Only a saga in needs_manual can be resolved; this one {state_said(saga.state)}.",
        )
    if operation == "undo_done" and not saga_waits_on_undo(saga):
        return SagaOperationRefused(
            "not_waiting_on_undo", f"The saga {state_said(saga.state)} and waits on no undo."
        )
    if operation in ("resolve", "undo_done"):
        _definition(saga)  # its on_resolve settles the records; its ladder goes on below
    if operation == "retry":
        return _retry_refusal(saga)
    return None


def _retry_refusal(saga: Saga) -> SagaOperationRefused | None:
    if saga.state == SagaState.NEEDS_MANUAL:
        if saga.escalated_from != SagaState.COMPENSATING:
            _definition(saga)  # resuming forward gives back the working time it declares
        return None
    if saga.state not in (SagaState.RUNNING, SagaState.COMPENSATING):
        return SagaOperationRefused(
            "settled", f"The saga {state_said(saga.state)}; there is nothing to retry."
        )
    if _leased(saga):
        return SagaOperationRefused(
            "in_flight", f"{saga.current_step} is running right now; wait for its outcome."
        )
    if saga.state == SagaState.RUNNING and saga.waiting_since is not None:
        # A wait ends with its signal or its timer; running the step again would only park it
        # again, while the timeline said an operator had retried the order.
        what = f"signal {saga.waiting_for}" if saga.waiting_for else "its timer"
        return SagaOperationRefused(
            "waiting",
            f"The saga waits at {saga.current_step} for {what}; there is nothing to retry. "
            "Send the signal, or compensate.",
        )
    return None


def _refuse_unless_allowed(saga: Saga, operation: str) -> None:
    refusal = saga_refusal(saga, operation)
    if refusal is not None:
        raise refusal


def _attempts_start_over(saga: Saga) -> None:
    """Give the saga's current step fresh attempts, keeping what the count knew: a run of a
    forward step with no record of its own (its worker died) may have taken effect, and once
    the count starts over only the step's row can say so. The row's count starts over too, so
    a run after this one that leaves no record shows as one above it (see
    ``store.effect_possible``). Likewise for the steps a run of the current step recorded
    once may have reached (``store.mark_unrecorded_run``): once the count starts over, their
    rows are all that can say so."""
    if saga.state == SagaState.RUNNING:
        fields: dict[str, Any] = {"attempts": 0}
        if effect_possible(saga, saga.current_step, claimed=False):
            fields["maybe_effect"] = True
            definition = _definition(saga)
            mark_unrecorded_run(definition, saga.id, definition.index_of(saga.current_step))
        SagaStep.objects.filter(saga_id=saga.id, name=saga.current_step).update(**fields)
    saga.attempt = 0


def saga_request_cancel(*, saga_id: Any, reason: str, actor: str = "engine") -> Saga:
    """Record a cancel request; the saga honours it at its next step boundary.

    Refused once the saga has reached its pivot (or stopped running). If no step is in flight
    the saga is made due at once and rung, so an idle saga (waiting out a backoff) compensates
    now instead of after its retry. A saga that stopped for a person before its pivot (a wait
    that timed out into ``needs_manual``) goes back to running to honour it: nothing it did is
    past undoing.
    """
    with transaction.atomic():
        saga = _locked(saga_id)
        _refuse_unless_allowed(saga, "cancel")
        if saga_stopped_before_pivot(saga):
            saga.resume_forward()
            saga.cancel_reason = reason
            _attempts_start_over(saga)
            saga.lease_until = None
            saga.next_attempt_at = timezone.now()
            _save(saga, ["cancel_reason", "attempt", "lease_until", "next_attempt_at"])
            ring_on_commit(saga.id, saga.version)
            _event(saga, "cancel_requested", actor=actor, detail=f"reason: {reason}")
            return saga
        if saga.cancel_reason:
            # Already requested: nothing new to record. A request no boundary has seen while
            # the saga waits (a park that landed past it before records were fenced on it)
            # is made due now, so asking again is never in vain.
            now = timezone.now()
            if not _leased(saga) and (saga.next_attempt_at is None or saga.next_attempt_at > now):
                saga.next_attempt_at = now
                _save(saga, ["next_attempt_at"])
                ring_on_commit(saga.id, saga.version)
            return saga
        saga.cancel_reason = reason
        fields = ["cancel_reason"]
        if not _leased(saga):
            saga.next_attempt_at = timezone.now()
            fields.append("next_attempt_at")
            _save(saga, fields)
            ring_on_commit(saga.id, saga.version)
        else:
            # A step is in flight: keep its version so its record lands; it sees the request.
            saga.updated_at = timezone.now()
            Saga.objects.filter(pk=saga.pk).update(cancel_reason=reason, updated_at=saga.updated_at)
            _told(saga)
        _event(saga, "cancel_requested", actor=actor, detail=f"reason: {reason}")
    return saga


# ---------------------------------------------------------------------------------------------
# Ops operations (admin and API)
# ---------------------------------------------------------------------------------------------
def saga_retry_now(*, saga_id: Any, user: Any, expected_version: int | None = None) -> Saga:
    """Run the saga's next piece of work now: skip a backoff, or resume from needs_manual.

    ``expected_version``, here and in the other ops operations: see :func:`_locked`.
    """
    _require_ops(user)
    with transaction.atomic():
        saga = _locked(saga_id, expected_version)
        _refuse_unless_allowed(saga, "retry")
        more: list[str] = []
        if saga.state == SagaState.NEEDS_MANUAL:
            if saga.escalated_from == SagaState.COMPENSATING:
                saga.resume_compensation()
            else:
                more = resumed_forward(saga)
            detail = f"resumed {saga.state} at {saga.current_step}"
        else:
            detail = f"retry {saga.current_step} now"
        _attempts_start_over(saga)
        saga.next_attempt_at = timezone.now()
        saga.lease_until = None
        _save(saga, ["attempt", "next_attempt_at", "lease_until", *more])
        _event(saga, "ops_retry", actor=_actor(user), detail=detail, step=saga.current_step)
        ring_on_commit(saga.id, saga.version)
    return saga


def saga_compensate(
    *, saga_id: Any, user: Any, reason: str, expected_version: int | None = None
) -> Saga:
    """Stop a running saga and undo what it did, as a cancel with the operator's reason.

    The saga's ``failure_code`` becomes ``step_failed`` (to a client, an operator stopping
    their order means processing failed); the operator's words go to the timeline. Refused
    (``already_cancelling``) when a cancel is in progress already (its client's): the saga
    stops anyway, and keeps that reason.
    """
    _require_ops(user)
    reason = trimmed(reason or "")
    if not reason:
        raise SagaOperationRefused("reason_required", "Say why you compensate this saga.")
    with transaction.atomic():
        saga = _locked(saga_id, expected_version)
        _refuse_unless_allowed(saga, "compensate")
        _event(saga, "ops_compensate", actor=_actor(user), detail=reason, step=saga.current_step)
        # In the same transaction: a refused cancel (pivot reached, not running) must not leave
        # an ops_compensate event behind that says an operator compensated.
        return saga_request_cancel(saga_id=saga_id, reason="step_failed", actor=_actor(user))


def saga_effects_in_place(saga: Saga) -> list[dict[str, Any]]:
    """Steps that took effect (or may have), whose undo has not run, and that a resolve would
    leave in place, newest first.

    Only a saga that stopped while undoing, or before its pivot (a wait that timed out), has
    any: one that stopped at or past its pivot is meant to keep what its steps did. The steps
    the type's ``on_resolve`` settles itself (``settled_on_resolve``: an order's reservation,
    released as it resolves) are left out: naming them told the person the stock stayed
    reserved when resolving released it. Each entry is a compensation-plan entry (step,
    compensation, idempotency key, status).
    """
    if not (saga_waits_on_undo(saga) or saga_stopped_before_pivot(saga)):
        return []
    settled = set(_definition(saga).settled_on_resolve)
    return [e for e in saga_compensation_plan(saga_id=saga.pk) if e["step"] not in settled]


def describe_effects(effects: list[dict[str, Any]]) -> list[str]:
    """One line per effect still in place, as the refusal and the confirmation page say it."""
    return [f"{e['step']} ({e['compensation']} has not run)" for e in effects]


def saga_undo_done(
    *, saga_id: Any, user: Any, step: str, note: str, expected_version: int | None = None
) -> Saga:
    """Record that a person did the waiting undo by hand; the engine goes on with the rest.

    For a saga in ``needs_manual`` because the compensation of ``step`` kept failing (say the
    provider refuses every void): the person voids in the provider's dashboard, says so here,
    and the ladder continues below that step by itself (releasing the reservation, ...). The
    step is marked ``compensated_by_hand`` and the note goes to the timeline with the user.
    The step's ``undone_by_hand`` hook, if it declares one, runs first in the same
    transaction: the compensation that would have told its participant never ran, so without
    it an order's client read its authorization as still held (``voided`` 0.00) after the
    person had voided it. A hook that raises refuses the operation (``undo_record_failed``)
    and nothing is written.
    """
    _require_ops(user)
    note = trimmed(note or "")
    step = (step or "").strip()
    if not note:
        raise SagaOperationRefused(
            "note_required", "A note is required: say how the undo was done by hand."
        )
    with transaction.atomic():
        saga = _locked(saga_id, expected_version)
        if not (saga_waits_on_undo(saga) and saga.current_step == step):
            waiting = (
                f"it waits on the undo of {saga.current_step}"
                if saga_waits_on_undo(saga)
                else f"it {state_said(saga.state)} and waits on no undo"
            )
            raise SagaOperationRefused(
                "not_waiting_on_undo",
                f"The saga is not waiting on the undo of {step or '(no step given)'}: {waiting}.",
            )
        definition = _definition(saga)
        _record_undone_by_hand(definition, saga)
        SagaStep.objects.filter(saga=saga, name=saga.current_step).update(
            status=StepStatus.COMPENSATED_BY_HAND, updated_at=timezone.now()
        )
        _event(saga, "ops_undo_done", actor=_actor(user), detail=note, step=step)
        saga.resume_compensation()
        nxt = next_compensable(
            definition, saga, definition.index_of(saga.current_step), *ladder_rows(saga.id)
        )
        saga.attempt = 0
        saga.lease_until = None
        if nxt is None:
            saga.finish_compensation()
            saga.finished_at = timezone.now()
            saga.next_attempt_at = None
            _save(saga, ["attempt", "lease_until", "finished_at", "next_attempt_at"])
            _event(saga, "compensated", actor="engine", detail=f"reason: {saga.failure_code}")
            saga_type, code = saga.saga_type, "compensated"
            transaction.on_commit(lambda: metrics.SAGAS_FINISHED.labels(saga_type, code).inc())
        else:
            saga.step_index = nxt
            saga.current_step = definition.steps[nxt].name
            saga.next_attempt_at = timezone.now()
            _save(saga, ["attempt", "lease_until", "step_index", "current_step", "next_attempt_at"])
            ring_on_commit(saga.id, saga.version)
    return saga


def _record_undone_by_hand(definition: SagaDefinition, saga: Saga) -> None:
    """Tell the participant of the saga's current step that a person did its undo (the step's
    ``undone_by_hand``), in a savepoint of the caller's transaction: a refusal leaves it
    usable, and nothing the hook wrote is kept."""
    hook = definition.step(saga.current_step).undone_by_hand
    if hook is None:
        return
    try:
        with transaction.atomic():
            hook(step_context(definition, saga, compensating=True))
    except Exception as exc:  # noqa: BLE001 - refused with the reason, nothing written
        raise SagaOperationRefused(
            "undo_record_failed",
            f"Could not record the undo of {saga.current_step} as done by hand: {exc}",
        ) from exc


def saga_resolve(
    *,
    saga_id: Any,
    user: Any,
    note: str,
    accept_effects: bool = False,
    expected_version: int | None = None,
) -> Saga:
    """Close a saga that needs a person, with a note saying what the person did.

    Refused (``effects_in_place``, naming them) while steps that took effect have not been
    undone, unless ``accept_effects``: the person then says those effects stay, knowingly.
    The saga type's ``on_resolve`` runs in the same transaction, so a resolved order never
    keeps stock reserved.
    """
    _require_ops(user)
    note = trimmed(note or "")
    if not note:
        raise SagaOperationRefused("note_required", "A note is required to resolve a saga.")
    with transaction.atomic():
        saga = _locked(saga_id, expected_version)
        _refuse_unless_allowed(saga, "resolve")
        effects = describe_effects(saga_effects_in_place(saga))
        before_pivot = saga_stopped_before_pivot(saga)
        if effects and not accept_effects:
            how = "compensate" if before_pivot else "retry now, or mark the undo done by hand"
            raise SagaOperationRefused(
                "effects_in_place",
                f"Still in place: {'; '.join(effects)}. Undo them ({how}), or confirm that "
                "they stay (accept_effects) to resolve anyway.",
                {"accept_effects": effects},
            )
        hook = _definition(saga).on_resolve
        if hook is not None:
            try:
                with transaction.atomic():
                    hook(saga)
            except Exception as exc:  # noqa: BLE001 - refused with the reason, nothing written
                raise SagaOperationRefused(
                    "resolve_failed", f"Could not settle the saga's records: {exc}"
                ) from exc
        saga.resolve()
        saga.finished_at = timezone.now()
        saga.next_attempt_at = None
        fields = ["finished_at", "next_attempt_at"]
        if before_pivot and not saga.failure_code:
            # Given up before its pivot: its outcome is a cancellation, and says why (a wait
            # that timed out is the only way here), as a compensated saga's would.
            saga.failure_code = "timed_out"
            fields.append("failure_code")
        _save(saga, fields)
        detail = note + (f" (effects kept: {'; '.join(effects)})" if effects else "")
        _event(saga, "ops_resolve", actor=_actor(user), detail=detail, step=saga.current_step)
    return saga


#: Errors that mean the call got no answer (it may have taken effect): a timeout, a lost
#: response, or a worker that died mid-call. Anything else answered with an error.
_NO_ANSWER_MARKERS = ("Timeout", "timed out", "without an answer", "worker lost")


def how_it_ended(error: str) -> str:
    """``"got no answer"`` or ``"answered with an error"``, from an attempt's recorded error."""
    return (
        "got no answer"
        if any(marker in error for marker in _NO_ANSWER_MARKERS)
        else "answered with an error"
    )


def _plan_why(row: SagaStep, took_effect: bool) -> str:
    """Why this undo is in the plan, in the words of what happened to the step."""
    if row.compensation_attempts and row.status in (
        StepStatus.COMPENSATING,
        StepStatus.COMPENSATION_FAILED,
    ):
        n = row.compensation_attempts
        return (
            f"it took effect; its undo {how_it_ended(row.last_error)} "
            f"({n} attempt{'s' if n != 1 else ''}, last: {row.last_error[:200]})"
        )
    if took_effect:
        return "it took effect"
    if row.last_error:
        return (
            f"its last attempt {how_it_ended(row.last_error)} ({row.last_error[:200]}); an "
            "attempt may have taken effect, so it is undone to be safe"
        )
    return "an attempt may have taken effect (its worker stopped), so it is undone to be safe"


_LOST_RUN_WHY = (
    "it may have run with {step} in one task whose record of them was lost (they are recorded "
    "once for the run), so it is undone to be safe"
)


def saga_compensation_plan(*, saga_id: Any) -> list[dict[str, Any]]:
    """The dry run: the compensations that compensating now would run, in order, with keys.

    For a running saga (or one that stopped for a person before its pivot): every step that
    took effect, plus the current step if an earlier attempt of it may have, and the steps
    after it that a run recorded once may have reached (their rows marked, or the current
    step's first run unrecorded, see ``store.mark_unrecorded_run``). For a compensating
    saga (or one waiting for a person mid-ladder): what is left of the ladder. For a settled
    saga: nothing. Refused (``definition_missing``) when this code does not register the
    definition of a saga that is not finished; a finished saga's plan is empty whatever code
    is deployed (it is settled: nothing will be compensated, so no release could add to it).
    """
    saga = Saga.objects.get(pk=saga_id)
    if saga.state in TERMINAL_STATES:
        return []
    definition = _definition(saga)
    rows = {s.name: s for s in SagaStep.objects.filter(saga=saga)}
    current = definition.index_of(saga.current_step)
    candidates: list[int] = []
    # Steps of a run recorded once that a lost task may have run with the current one, before
    # the engine has marked them (it does when it claims the saga again).
    suspects: set[str] = set()
    if saga.state == SagaState.RUNNING or saga_stopped_before_pivot(saga):
        if current >= definition.pivot_index:
            return []
        row = rows.get(saga.current_step)
        if row is not None and effect_possible(saga, saga.current_step, claimed=False):
            if row.attempts == 0 and saga.attempt >= 1:
                suspects = set(run_suspects(definition, current))
            candidates.append(current)
        # Steps after the current one count only if marked or suspect, as when the undo starts
        # (sagas.runner._start_compensation): from the last of them before the pivot, down.
        candidates = list(range(definition.pivot_index - 1, current, -1)) + candidates
        candidates += list(range(current - 1, -1, -1))
    elif saga.state == SagaState.COMPENSATING or (
        saga.state == SagaState.NEEDS_MANUAL and saga.escalated_from == SagaState.COMPENSATING
    ):
        candidates = list(range(current, -1, -1))
    plan = []
    for j in candidates:
        step = definition.steps[j]
        row = rows.get(step.name)
        if step.compensate is None or row is None:
            continue
        if row.status in (StepStatus.COMPENSATED, StepStatus.COMPENSATED_BY_HAND):
            continue
        suspect = step.name in suspects
        if not (step.name in saga.results or row.maybe_effect or j == current or suspect):
            continue
        took_effect = step.name in saga.results or row.took_effect
        why = _plan_why(row, took_effect=took_effect)
        if j > current and not took_effect:
            why = _LOST_RUN_WHY.format(step=saga.current_step)
        plan.append(
            {
                "step": step.name,
                "compensation": getattr(step.compensate, "__name__", "compensate"),
                "idempotency_key": undo_key(saga.id, step.name),
                "status": row.status,
                "why": why,
            }
        )
    return plan
