"""``Idempotency-Key`` on ``POST /orders/`` (guarantee 5 in the README's Guarantees section).

A request with a key goes through two short transactions:

1. :func:`idempotency_begin` inserts the ``(user, key)`` record *in flight* and commits it, so a
   second request with the key finds it at once: the same body while the first is still running
   is a ``409``, another body is a ``422``, and once the first has finished it is a replay of
   the first response, status and body.
2. :func:`idempotency_finish` runs inside the transaction that creates the order and its saga:
   one conditional ``UPDATE`` stores the response if this attempt still holds the record. The
   order and the finished record commit together, so a key maps to at most one order.

If the request fails before committing (bad input, a crash), :func:`idempotency_release`
deletes the in-flight record, so the key can be used again. A process that dies between the
two steps leaves an in-flight record behind; after :data:`IN_FLIGHT_STALE_AFTER` the next
request with the key takes it over instead of getting ``409`` until the record expires.

Records older than ``IDEMPOTENCY_KEY_TTL_HOURS`` are deleted by :func:`idempotency_expire`
(the ``orders.expire_idempotency_keys`` periodic task).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from config.idempotency import IdempotencyError, IdempotencyKeyReused
from orders.models import IdempotencyRecord, IdempotencyState, Order

#: An in-flight record older than this belongs to a request that died; the next one takes over.
#: Far above the few milliseconds placing an order takes, so a live request is never robbed.
IN_FLIGHT_STALE_AFTER = timedelta(seconds=60)
EXPIRE_BATCH = 5000


class IdempotencyRequestInFlight(IdempotencyError):
    """The first request with this key has not finished yet (a ``409``; retry shortly)."""

    code = "idempotency_request_in_flight"
    http_status = 409
    headers = {"Retry-After": "1"}


@dataclass(frozen=True)
class Claim:
    """This request holds the key: it may place the order."""

    record_id: int
    attempt: uuid.UUID


@dataclass(frozen=True)
class Replay:
    """The key's first request has finished: answer with its response."""

    status: int
    body: str
    order_id: uuid.UUID | None


def idempotency_begin(*, user, key: str, fingerprint: str) -> Claim | Replay:
    """Claim ``key`` for this request, or say how the request that holds it answered.

    Raises :class:`IdempotencyKeyReused` (another body) or :class:`IdempotencyRequestInFlight`.
    Commits on its own: call it outside the transaction that places the order.
    """
    for _ in range(3):
        now = timezone.now()
        try:
            with transaction.atomic():
                record = IdempotencyRecord.objects.create(
                    user=user, key=key, fingerprint=fingerprint, started_at=now
                )
            return Claim(record.pk, record.attempt)
        except IntegrityError:
            pass
        existing = IdempotencyRecord.objects.filter(user=user, key=key).first()
        if existing is None:
            continue  # expired and deleted in between: try to claim it again
        if existing.fingerprint != fingerprint:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was already used with a different request body; "
                "use a new key for a new order."
            )
        if existing.state == IdempotencyState.DONE:
            # A done record has its status: orders_idempotency_done_has_response checks it.
            assert existing.response_status is not None
            return Replay(existing.response_status, existing.response_body, existing.order_id)
        if existing.started_at > now - IN_FLIGHT_STALE_AFTER:
            raise IdempotencyRequestInFlight(
                "A request with this Idempotency-Key is still being processed; "
                "retry in a moment to get its response."
            )
        # Abandoned by a request that died: take it over, unless someone else just did.
        attempt = uuid.uuid4()
        taken = IdempotencyRecord.objects.filter(
            pk=existing.pk, state=IdempotencyState.IN_FLIGHT, attempt=existing.attempt
        ).update(attempt=attempt, started_at=now)
        if taken:
            return Claim(existing.pk, attempt)
    raise IdempotencyRequestInFlight(
        "A request with this Idempotency-Key is still being processed; retry in a moment."
    )


def idempotency_finish(*, claim: Claim, status: int, body: str, order: Order | None) -> None:
    """Store the response of the claimed request, inside the transaction that placed the order.

    Raises :class:`IdempotencyRequestInFlight` (rolling that transaction back) if the claim was
    taken over meanwhile: the other attempt answers for the key.
    """
    # One conditional UPDATE: it matches only while this attempt still holds the key, and its
    # row lock keeps a takeover out until the order commits (or rolls back).
    finished = IdempotencyRecord.objects.filter(
        pk=claim.record_id, state=IdempotencyState.IN_FLIGHT, attempt=claim.attempt
    ).update(
        state=IdempotencyState.DONE,
        response_status=status,
        response_body=body,
        order=order,
        finished_at=timezone.now(),
    )
    if not finished:
        raise IdempotencyRequestInFlight(
            "Another request with this Idempotency-Key took over; retry to get its response."
        )


def idempotency_release(*, claim: Claim) -> None:
    """Free a key whose request failed before committing (bad input, an error)."""
    IdempotencyRecord.objects.filter(
        pk=claim.record_id, state=IdempotencyState.IN_FLIGHT, attempt=claim.attempt
    ).delete()


def idempotency_expire(*, now=None, batch: int = EXPIRE_BATCH) -> int:
    """Delete records older than ``IDEMPOTENCY_KEY_TTL_HOURS``, in batches; return how many."""
    now = now or timezone.now()
    cutoff = now - timedelta(hours=settings.IDEMPOTENCY_KEY_TTL_HOURS)
    deleted = 0
    while True:
        ids = list(
            IdempotencyRecord.objects.filter(created_at__lt=cutoff)
            .order_by("created_at")
            .values_list("pk", flat=True)[:batch]
        )
        if not ids:
            return deleted
        count, _ = IdempotencyRecord.objects.filter(pk__in=ids, created_at__lt=cutoff).delete()
        deleted += count
