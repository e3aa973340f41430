"""Signals: the outside world answers a saga that waits (a review decision, a 3-D Secure step).

A signal is a row (:class:`~sagas.models.SagaSignal`), written under the saga's row lock:

- the same ``(saga, name, key)`` again is a replay: accepted, nothing changes;
- a saga that waits for it now is made due (version bumped, lease cleared, doorbell on commit):
  deciding a ``Wait`` only reads rows, so a worker deciding at this very moment is simply
  fenced out and the next claim consumes the signal;
- a saga that will reach a ``Wait`` for it later keeps it until it gets there;
- a saga that escalated to a person because its ``Wait`` timed out goes on with it;
- anything else (finished, compensating, past the wait, a different signal already pending)
  is refused with a code the API turns into a ``409``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.utils import timezone

from config.idempotency import MAX_KEY_LENGTH, IdempotencyKeyInvalid, clean_key
from config.text import MAX_DEPTH, deeper_than, has_control_characters, unstorable_text
from sagas import tracing, waits
from sagas.definition import Park, SagaDefinition, definition_of, step_context
from sagas.doorbell import ring_on_commit
from sagas.exceptions import (
    SagaOperationRefused,
    SignalKeyInvalid,
    SignalKeyReused,
    SignalPayloadInvalid,
)
from sagas.models import Saga, SagaSignal, SagaState, state_said
from sagas.services import (
    OPS_PERMISSION,
    _actor,
    _attempts_start_over,
    _definition,
    _event,
    _locked,
    _save,
    resumed_forward,
)
from sagas.store import effect_possible

#: A payload is a small JSON object; anything bigger belongs in the participant's own tables.
MAX_PAYLOAD_BYTES = 8192


@dataclass(frozen=True)
class SignalOutcome:
    signal: SagaSignal
    #: The same key was seen before: nothing changed.
    replayed: bool
    #: The saga was waiting for it and was made due now (else it keeps it for later).
    delivered_now: bool


def client_signal_names(definition: SagaDefinition) -> list[str]:
    """Signals of a saga type that its own client may send (the rest are for ops staff)."""
    return [
        s.park.signal
        for s in definition.steps
        if s.park is not None and s.park.signal and s.park.client is not None
    ]


def _may_send(user: Any, park: Park, saga: Saga) -> bool:
    return _ops_or_client(user, saga, [park.client] if park.client is not None else [])


def _refuse_unless_may_send(user: Any, park: Park, saga: Saga, name: str) -> None:
    if not _may_send(user, park, saga):
        raise PermissionDenied(
            f"Only ops staff{' or the client' if park.client else ''} may send {name!r}."
        )


def _ops_or_client(user: Any, saga: Saga, clients: Iterable[Callable[[str], Any]]) -> bool:
    """An active user who is ops staff, or whom one of ``clients`` names for this saga."""
    if user is None or not user.is_active:
        return False
    if user.has_perm(OPS_PERMISSION):
        return True
    return any(client(str(saga.id)) == user.pk for client in clients)


def may_signal_saga(user: Any, saga: Saga) -> bool:
    """Whether ``user`` may send this saga any signal at all: ops staff, or the client of one
    of its client-facing waits. Anyone else must not learn from the answer that it exists."""
    try:
        definition = definition_of(saga)
    except LookupError:
        return user is not None and user.is_active and user.has_perm(OPS_PERMISSION)
    clients = {step.park.client for step in definition.steps if step.park and step.park.client}
    return _ops_or_client(user, saga, clients)


def _check_payload(park: Park, payload: Any) -> dict:
    if payload is None:
        payload = {}
    if not isinstance(payload, Mapping):
        raise SignalPayloadInvalid("The payload must be a JSON object.")
    # The API's parser refuses these already; the ops console's form and other callers too.
    if deeper_than(payload, MAX_DEPTH):
        raise SignalPayloadInvalid(f"The payload may nest at most {MAX_DEPTH} levels deep.")
    unstorable = unstorable_text(payload)
    if unstorable is not None:
        raise SignalPayloadInvalid(f"payload.{unstorable[0]}: {unstorable[1]}")
    if len(json.dumps(payload, default=str)) > MAX_PAYLOAD_BYTES:
        raise SignalPayloadInvalid(f"The payload may not exceed {MAX_PAYLOAD_BYTES} bytes.")
    if park.validate is not None:
        problem = park.validate(payload)
        if problem:
            raise SignalPayloadInvalid(problem)
    return dict(payload)


def _comparable(payload: Any) -> Any:
    """``payload`` as JSON values with every number exact, so a replay compares equal to the
    stored signal: PostgreSQL's ``jsonb`` keeps numbers as decimals (``1e23`` reads back as
    ``100000000000000000000000``, which no float equals)."""
    try:
        text = json.dumps({} if payload is None else payload, default=str)
        return json.loads(text, parse_float=Decimal, parse_int=Decimal)
    except (TypeError, ValueError):
        return payload


def _takes(definition: SagaDefinition, saga: Saga, indexes: list[int]) -> tuple[bool, bool]:
    """``(resume, takes_it)``: the saga waits in ``needs_manual`` at one of these waits (the
    signal resumes it), or is running and will still wait at one of them."""
    try:
        at = definition.index_of(saga.current_step)
    except (KeyError, ValueError):  # settled, or a step this version does not have
        return False, False
    resume = (
        saga.state == SagaState.NEEDS_MANUAL
        and saga.escalated_from == SagaState.RUNNING
        and at in indexes
        and saga.failed_step == definition.steps[at].name
    )
    takes_it = (
        saga.state == SagaState.RUNNING
        and not _will_be_cancelled(definition, saga, at)
        and not _timed_out_to_compensate(definition, saga, at, indexes)
        and any(i >= at and _will_wait(definition, saga, i) for i in indexes)
    )
    return resume, takes_it


def _will_be_cancelled(definition: SagaDefinition, saga: Saga, at: int) -> bool:
    """A cancel is recorded (or the deadline has passed) before the pivot: the next boundary
    undoes the saga, and a signal accepted now would never be consumed."""
    if at > definition.pivot_index:
        return False
    late = saga.deadline_at is not None and timezone.now() >= saga.deadline_at
    if not (saga.cancel_reason or late):
        return False
    # At the pivot the boundary honours it only while no run of the pivot may have taken
    # effect (as sagas.runner does): a wait at the pivot has not run.
    return at < definition.pivot_index or not effect_possible(
        saga, definition.steps[at].name, claimed=False
    )


def _timed_out_to_compensate(
    definition: SagaDefinition, saga: Saga, at: int, indexes: list[int]
) -> bool:
    """Parked at one of these waits, whose timeout has passed and whose saga compensates on
    it: the signal comes too late (a worker has only not got to the timer yet). Accepted, it
    would win over the timeout, so whether a 3-D Secure confirmation counted would depend on
    how busy the workers were. A wait that escalates takes a late signal: a person would let
    the saga go on with it anyway."""
    if at not in indexes or saga.waiting_since is None or at > definition.pivot_index:
        return False  # past its pivot a wait escalates on timeout, whatever it declares
    park = definition.steps[at].park
    if park is None or park.on_timeout != "compensate":
        return False
    if waits.pending_signal(saga.id, park.signal) is not None:
        return False  # one came in time: the wait takes it (another key is already_signalled)
    seconds = waits.wait_seconds(park, saga)
    return seconds is not None and timezone.now() >= saga.waiting_since + timedelta(seconds=seconds)


def signals_taken(definition: SagaDefinition, saga: Saga) -> list[str]:
    """The signals of the saga's type it can still take now (the ops console offers these)."""
    return [n for n in definition.signals if any(_takes(definition, saga, definition.waits_for(n)))]


def _will_wait(definition: SagaDefinition, saga: Saga, index: int) -> bool:
    """Whether a running saga at or before the ``Wait`` at ``index`` will wait there.

    Parked at that very wait, it does; parked at an earlier one (a 3-D Secure confirmation
    before a fraud review), the later wait's own condition still decides.
    """
    park = definition.steps[index].park
    if park is None or park.when is None:
        return True
    if saga.waiting_since is not None and definition.index_of(saga.current_step) == index:
        return True
    probe = Saga(**{f.attname: getattr(saga, f.attname) for f in Saga._meta.concrete_fields})
    probe.step_index, probe.current_step = index, definition.steps[index].name
    try:
        return bool(park.when(step_context(definition, probe, compensating=False)))
    except Exception:  # noqa: BLE001 - when in doubt keep it: the wait decides again
        return True


def saga_signal(
    *,
    saga_id: Any,
    name: str,
    payload: Any = None,
    key: str | None = None,
    user: Any,
) -> SignalOutcome:
    """Deliver signal ``name`` to a saga; see the module docstring for what happens when.

    Raises :class:`PermissionDenied` (neither ops staff nor the client the signal is for),
    :class:`SignalPayloadInvalid` and :class:`SagaOperationRefused` (``unknown_signal``,
    ``not_waiting``, ``already_signalled``, ``not_found``).
    """
    if key is None:
        key = uuid.uuid4().hex
    else:  # refused as an order's key is, in the same words (a blank one would not replay)
        try:
            key = clean_key(key)
        except IdempotencyKeyInvalid as invalid:
            raise SignalKeyInvalid(invalid.detail) from None
        assert key is not None
    with transaction.atomic():
        saga = _locked(saga_id)
        with tracing.saga_span(f"saga.signal {name}", saga, signal=name):
            return _deliver(saga, name, payload, key, user)


def check_may_send(*, saga_id: Any, name: str, user: Any) -> None:
    """Raise :class:`PermissionDenied` when ``user`` may not send ``name`` to this saga at all
    (a staff-only signal sent by the saga's own client), before the API reads the body: who
    may send a signal does not depend on what it carries, so a client is told it may not
    before it is told how to mend a payload it cannot send anyway. Everything else (an unknown
    saga, name or definition) is left to :func:`saga_signal`, which says why."""
    saga = Saga.objects.filter(pk=saga_id).first()
    if saga is None:
        return
    try:
        definition = definition_of(saga)
    except LookupError:
        return
    indexes = definition.waits_for(name)
    park = definition.steps[indexes[0]].park if indexes else None
    if park is not None:
        _refuse_unless_may_send(user, park, saga, name)


def signal_sent_under(
    *, saga_id: Any, name: str, key: str | None, payload: Any, user: Any
) -> SignalOutcome | None:
    """The signal ``name`` that ``key`` already delivered to this saga, as a replay, if any:
    the API answers a retry with it before it checks the body, so a signal sent before a rule
    that now refuses its body (a top-level name the route no longer takes) is still replayed,
    as an order is. ``payload`` is the body's, unchecked; another one (whatever it holds) is
    :class:`SignalKeyReused`, as :func:`saga_signal` says. None when there is no such signal
    or ``user`` may not send it: :func:`saga_signal` then decides, and says why."""
    key = key.strip() if key is not None else ""
    if not key or len(key) > MAX_KEY_LENGTH or has_control_characters(key):
        return None
    existing = SagaSignal.objects.filter(saga_id=saga_id, name=name, key=key).first()
    if existing is None:
        return None
    saga = Saga.objects.get(pk=saga_id)
    try:
        definition = definition_of(saga)
    except LookupError:
        return None
    indexes = definition.waits_for(name)
    park = definition.steps[indexes[0]].park if indexes else None
    if park is None or not _may_send(user, park, saga):
        return None
    return _replayed(existing, name, key, payload)


def _replayed(existing: SagaSignal, name: str, key: str, payload: Any) -> SignalOutcome:
    # A caller that does not restate the payload (``None``) asks about the first one.
    if payload is not None and _comparable(existing.payload) != _comparable(payload):
        raise SignalKeyReused(
            f"The Idempotency-Key {key!r} was already used for {name!r} with another "
            "payload; that signal stands. Send a changed one under a new key."
        )
    return SignalOutcome(existing, replayed=True, delivered_now=False)


def _deliver(saga: Saga, name: str, payload: Any, key: str, user: Any) -> SignalOutcome:
    try:
        definition = definition_of(saga)
    except LookupError:  # a type or version of another release: refused, to ops staff only
        if not may_signal_saga(user, saga):
            raise PermissionDenied("Only ops staff or the saga's client may signal it.") from None
        definition = _definition(saga)  # raises definition_missing
    indexes = definition.waits_for(name)
    if not indexes:
        if not may_signal_saga(user, saga):
            raise PermissionDenied("Only ops staff or the saga's client may signal it.")
        raise SagaOperationRefused(
            "unknown_signal", f"This {saga.saga_type} saga never waits for {name!r}."
        )
    park = definition.steps[indexes[0]].park
    assert park is not None
    _refuse_unless_may_send(user, park, saga, name)
    existing = SagaSignal.objects.filter(saga=saga, name=name, key=key).first()
    if existing is not None:
        return _replayed(existing, name, key, payload)
    payload = _check_payload(park, payload)

    resume, takes_it = _takes(definition, saga, indexes)
    if not (resume or takes_it) and saga.state == SagaState.RUNNING:
        try:
            at = definition.index_of(saga.current_step)
        except (KeyError, ValueError):  # a step this version does not have: not_waiting below
            at = -1
        if at >= 0 and _will_be_cancelled(definition, saga, at):
            raise SagaOperationRefused(
                "not_waiting",
                f"The saga is being cancelled: it will not take {name!r}.",
            )
        if at >= 0 and _timed_out_to_compensate(definition, saga, at, indexes):
            raise SagaOperationRefused(
                "not_waiting",
                f"The wait for {name!r} has timed out: the saga compensates.",
            )
    if not (resume or takes_it):
        where = state_said(saga.state, at=saga.current_step)
        raise SagaOperationRefused(
            "not_waiting", f"The saga {where}: it is not waiting for {name!r}, and will not."
        )
    at = definition.index_of(saga.current_step)  # a step of this version: _takes checked it
    if SagaSignal.objects.filter(saga=saga, name=name, consumed_at__isnull=True).exists():
        raise SagaOperationRefused(
            "already_signalled",
            f"A {name!r} signal with another key is already waiting to be consumed.",
        )
    now = timezone.now()
    signal = SagaSignal.objects.create(
        saga=saga, name=name, key=key, payload=payload, actor=_actor(user), received_at=now
    )
    delivered_now = resume or at in indexes
    if delivered_now:
        more = resumed_forward(saga) if resume else []
        if saga.waiting_for == name:
            # Waiting no longer, though the wait has not ended (``waiting_since`` stays, for
            # the deadline's give-back): an order reads ``processing`` from now, not
            # ``requires_action`` until a worker takes the signal, and its client may be told.
            saga.waiting_for = ""
            more.append("waiting_for")
        _attempts_start_over(saga)
        saga.next_attempt_at = now
        saga.lease_until = None
        _save(saga, ["attempt", "next_attempt_at", "lease_until", *more])
        ring_on_commit(saga.id, saga.version)
    # What was decided is the point of the entry (``{"approved": false}``): the payload, cut
    # short, goes with the name.
    said = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    said = said if len(said) <= 300 else said[:299] + "…"
    detail = f"{name} {said} (key {key})" + ("; resumed from needs_manual" if resume else "")
    step = definition.steps[at].name if delivered_now else ""
    # From ops staff it is an ops action (``ops_signal``: the audit log records it too);
    # from the saga's own client it is that client's answer.
    kind = "ops_signal" if user.has_perm(OPS_PERMISSION) else "signal_received"
    _event(saga, kind, actor=_actor(user), detail=detail, step=step)
    return SignalOutcome(signal, replayed=False, delivered_now=delivered_now)
