"""Writes of the webhooks app: endpoints, the outbox, and staff's redelivery.

:func:`event_emit` is the outbox's only writer. It must be called inside the transaction that
makes the change it describes (for orders: the saga record, through the order saga's change
hook), so the event commits or rolls back with that change; its deliveries' doorbells ring only
after the commit.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import structlog
from django.conf import settings
from django.core.exceptions import PermissionDenied
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.db.models.functions import Greatest, Least
from django.utils import timezone
from rest_framework.renderers import JSONRenderer

from audit.services import audit_record
from config.db import ValuesBy
from config.idempotency import IdempotencyKeyReused
from webhooks import delivery
from webhooks.models import EVENT_TYPES, Delivery, DeliveryStatus, Endpoint, Event, Stream
from webhooks.security import UrlRefused, check_new_url
from webhooks.signals import subscribed

log = structlog.get_logger("webhooks")

#: How many endpoints one client may have.
MAX_ENDPOINTS_PER_OWNER = 20


class EndpointInvalid(Exception):
    """A refused registration; ``code`` is machine-readable, ``field`` is to blame."""

    def __init__(self, code: str, detail: str, field: str = "url") -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.field = field


def _new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


# ---------------------------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------------------------
def endpoint_create(
    *,
    owner: Any,
    url: str,
    events: Iterable[str],
    key: str | None = None,
    fingerprint: str = "",
) -> tuple[Endpoint, str, bool]:
    """Register an endpoint; return it with its signing secret (shown to the client once) and
    whether it is a replay.

    With ``key`` (the request's ``Idempotency-Key``) and ``fingerprint`` (of its body), a retry
    whose answer was lost gets the endpoint the first request registered, with its secret,
    instead of a second endpoint whose secret the client never saw (every delivery to it
    would fail the client's signature check). The key is the client's as long as the endpoint
    lives. Raises :class:`~config.idempotency.IdempotencyKeyReused` for the same key with
    another body.
    """
    if key is not None:
        earlier = _registered_under(owner, key, fingerprint)
        if earlier is not None:
            return earlier, earlier.secret, True
    events = list(dict.fromkeys(events))
    unknown = [e for e in events if e not in EVENT_TYPES]
    if not events or unknown:
        raise EndpointInvalid(
            "invalid_events", f"Choose events among {', '.join(EVENT_TYPES)}.", field="events"
        )
    try:
        check_new_url(url)
    except UrlRefused as exc:
        raise EndpointInvalid(exc.code, exc.detail) from None
    secret = _new_secret()
    try:
        with transaction.atomic():
            # Counted under the owner's lock: two registrations at 19 do not make 21; and two
            # requests with one key register one endpoint (the second finds the first's here).
            _lock_owner(owner.pk)
            if key is not None:
                earlier = _registered_under(owner, key, fingerprint)
                if earlier is not None:
                    return earlier, earlier.secret, True
            if Endpoint.objects.filter(owner=owner).count() >= MAX_ENDPOINTS_PER_OWNER:
                raise EndpointInvalid(
                    "too_many_endpoints",
                    f"At most {MAX_ENDPOINTS_PER_OWNER} endpoints per client.",
                )
            endpoint = Endpoint.objects.create(
                owner=owner,
                url=url,
                events=events,
                secret=secret,
                idempotency_key=key or "",
                request_fingerprint=fingerprint if key is not None else "",
            )
            subscribed.send(sender=Endpoint, owner_id=owner.pk)
    except IntegrityError:
        # Without the owner's lock (not PostgreSQL), the key's unique constraint decides.
        earlier = _registered_under(owner, key, fingerprint) if key is not None else None
        if earlier is None:
            raise
        return earlier, earlier.secret, True
    log.info("webhooks.endpoint_created", endpoint_id=str(endpoint.id), owner_id=owner.pk)
    return endpoint, secret, False


def endpoint_registered_under(*, owner: Any, key: str, fingerprint: str) -> Endpoint | None:
    """The endpoint ``key`` registered for this body, if any: the API answers a retry with it
    before it checks the body, so a registration a later rule would refuse (a name the body no
    longer may carry) is still replayed, its secret with it, as an order is. Raises
    :class:`~config.idempotency.IdempotencyKeyReused` for the same key with another body."""
    return _registered_under(owner, key, fingerprint)


def _registered_under(owner: Any, key: str, fingerprint: str) -> Endpoint | None:
    """The endpoint the client registered with ``key``, if any (see :func:`endpoint_create`)."""
    earlier = Endpoint.objects.filter(owner=owner, idempotency_key=key).first()
    if earlier is None:
        return None
    if earlier.request_fingerprint != fingerprint:
        raise IdempotencyKeyReused(
            "This Idempotency-Key was already used with a different request body; "
            "use a new key for a new endpoint."
        )
    if earlier.deleting:
        raise IdempotencyKeyReused(
            "The endpoint this Idempotency-Key registered is being deleted; "
            "use a new key for a new endpoint."
        )
    return earlier


#: Replaced secrets that sign beside the current one at most (a header of at most four
#: ``v1=``): a fourth rotation within one grace period ends the oldest one's grace early.
MAX_SECRETS_IN_GRACE = 3


def endpoint_rotate_secret(*, endpoint: Endpoint) -> str:
    """A new secret; the old one keeps signing for WEBHOOKS_SECRET_GRACE seconds, so a client
    can deploy the new one without refusing deliveries meanwhile.

    Every replaced secret keeps its own grace: a second rotation soon after the first (the
    first new secret leaked on its way, say) does not end the grace of the original one, which
    the client's receiver may still be verifying with. At most
    :data:`MAX_SECRETS_IN_GRACE` of them sign at once.
    """
    with transaction.atomic():
        endpoint = Endpoint.objects.select_for_update(no_key=True).get(pk=endpoint.pk)
        now = timezone.now()
        replaced = {
            "secret": endpoint.secret,
            "expires_at": (now + timedelta(seconds=settings.WEBHOOKS_SECRET_GRACE)).isoformat(),
        }
        kept = [replaced, *endpoint.secrets_in_grace(now)]
        endpoint.previous_secrets = kept[:MAX_SECRETS_IN_GRACE]
        secret = endpoint.secret = _new_secret()
        endpoint.save(update_fields=["secret", "previous_secrets"])
    log.info("webhooks.secret_rotated", endpoint_id=str(endpoint.id))
    return secret


def endpoint_set_active(
    *, endpoint: Endpoint, active: bool, user: Any, reason: str = ""
) -> Endpoint:
    """Staff switch an endpoint off (events for it are still written, their deliveries held)
    or back on (what was held goes out at once).

    Switched back on, its pending deliveries are due now and get a full retry window from now
    (``retry_until``): staff held them back, so the time they waited must not make them dead
    at their first failure. That also makes it an ordinary endpoint again if a delete of it was
    left unfinished (``deleting``).
    """
    endpoint.is_active = active
    endpoint.disabled_reason = "" if active else reason[:200]
    fields = ["is_active", "disabled_reason"]
    if active:
        endpoint.deleting = False
        fields.append("deleting")
    with transaction.atomic():
        if active:
            _lock_owner(endpoint.owner_id)
        endpoint.save(update_fields=fields)
        if active:
            now = timezone.now()
            Delivery.objects.filter(endpoint_id=endpoint.pk, status=DeliveryStatus.PENDING).update(
                next_attempt_at=Least(F("next_attempt_at"), now),
                retry_until=Greatest(
                    F("retry_until"), now + timedelta(seconds=settings.WEBHOOKS_RETRY_FOR)
                ),
            )
            # Events are written for a switched-off endpoint, but not for one being deleted:
            # orders placed meanwhile may not tell the outbox yet.
            subscribed.send(sender=Endpoint, owner_id=endpoint.owner_id)
    audit_record(
        "webhook_enable" if active else "webhook_disable",
        actor=user,
        target=f"webhook endpoint {endpoint.pk}",
        detail={"url": endpoint.url, "reason": endpoint.disabled_reason},
    )
    if active:
        transaction.on_commit(lambda: ring(endpoint.pk))
    return endpoint


class EndpointBusy(Exception):
    """Events kept arriving for an endpoint being deleted; it is disabled, not yet gone."""


def endpoint_delete(*, endpoint: Endpoint, tries: int = 5) -> None:
    """Delete an endpoint and its deliveries, also while orders are telling it about changes.

    An event being written reads the client's subscribed endpoints, then inserts their
    deliveries and commits; one that read this endpoint before the delete and commits during it
    leaves a delivery the delete did not see, and the delete's commit failed its foreign key
    check (a 500). So the endpoint is marked as being deleted first (:func:`endpoint_delete_begin`:
    events written from then on pass it by), the foreign keys are checked when the endpoint's
    row goes rather than at commit, and the delete is made again, taking such late deliveries
    with it, until none came in meanwhile. Inside a caller's transaction too (the ops
    console's delete): each try is a savepoint.
    """
    endpoint_delete_begin(endpoint.pk)
    for _ in range(tries):
        try:
            with transaction.atomic():
                _constraints("IMMEDIATE")
                Delivery.objects.filter(endpoint_id=endpoint.pk).delete()
                Endpoint.objects.filter(pk=endpoint.pk).delete()
                _constraints("DEFERRED")  # Django's foreign keys are INITIALLY DEFERRED
            return
        except IntegrityError:
            continue  # a delivery committed for it meanwhile: take it too
    raise EndpointBusy(endpoint.pk)


def endpoint_delete_begin(endpoint_id: Any) -> None:
    """Mark the endpoint as being deleted, switched off: no new events are written for it (as
    for one switched off by staff, whose events are held for it), so a delete that has to be
    made again (``EndpointBusy``) is not raced by new ones. Its client asked for it to go: the
    changes from now on are no longer its business."""
    Endpoint.objects.filter(pk=endpoint_id).update(
        is_active=False, deleting=True, disabled_reason="being deleted"
    )


def _constraints(when: str) -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f"SET CONSTRAINTS ALL {when}")


# ---------------------------------------------------------------------------------------------
# The outbox
# ---------------------------------------------------------------------------------------------
def _next_sequence(subject: uuid.UUID) -> int:
    """The subject's next sequence number, in the caller's transaction.

    One upsert: the row lock it takes orders concurrent writers about the same subject (and
    the order saga already holds the saga row, so in practice there are none).
    """
    qn = connection.ops.quote_name
    table = qn(Stream._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} ({qn('subject')}, {qn('last_sequence')}) VALUES (%s, 1) "
            f"ON CONFLICT ({qn('subject')}) DO UPDATE SET "
            f"{qn('last_sequence')} = {table}.{qn('last_sequence')} + 1 "
            f"RETURNING {qn('last_sequence')}",
            [Stream._meta.pk.get_db_prep_value(subject, connection)],
        )
        return cursor.fetchone()[0]


# Asked on every order placed: the SQL is built once (config.db.ValuesBy).
_subscribed_endpoints_of = ValuesBy(
    Endpoint.objects.filter(deleting=False).order_by().values_list("pk"), "owner"
)


def subscribers(owner_id: Any) -> bool:
    """Whether the client has an endpoint events are written for at all (one small query):
    switched on or off by staff, not one being deleted. Read so that a registration of the
    client's first endpoint never slips past the caller's transaction.

    Asked by an order being placed, to note in its saga whether to tell the outbox. On
    PostgreSQL the same statement takes a shared per-client lock (an advisory lock, held to
    the end of the caller's transaction) without waiting for it; a registration takes it
    exclusively (:func:`_lock_owner`) before it marks the client's orders in flight, so it
    waits for this order to commit and marks it. If a registration holds it right now, the
    read waits for it and is made again afterwards, in a statement of its own that sees the
    new endpoint.
    """
    if owner_id is None:
        return False
    if connection.vendor != "postgresql":
        return bool(_subscribed_endpoints_of(owner_id))
    table = connection.ops.quote_name(Endpoint._meta.db_table)
    exists = f"EXISTS (SELECT 1 FROM {table} WHERE owner_id = %s AND NOT deleting)"
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT pg_try_advisory_xact_lock_shared(%s, %s), {exists}",
            [_LOCK_SPACE, _lock_key(owner_id), owner_id],
        )
        locked, found = cursor.fetchone()
        if locked:
            return bool(found)
        cursor.execute(
            "SELECT pg_advisory_xact_lock_shared(%s, %s)", [_LOCK_SPACE, _lock_key(owner_id)]
        )
        cursor.execute(f"SELECT {exists}", [owner_id])
        return bool(cursor.fetchone()[0])


#: The advisory locks' first key: this module's (any fixed number no other lock uses).
_LOCK_SPACE = 0x5E8B


def _lock_key(owner_id: Any) -> int:
    return int(owner_id) % 2_147_483_647


def _lock_owner(owner_id: Any) -> None:
    """Hold the client's webhook lock exclusively until the caller's transaction ends: orders
    being placed that read "no endpoint" (:func:`subscribers`) commit first, so ``subscribed``'s
    receivers see them; orders placed from now on wait and see the endpoint."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_advisory_xact_lock(%s, %s)", [_LOCK_SPACE, _lock_key(owner_id)]
            )


def _subscribed_endpoints(owner_id: Any, type: str) -> list[Endpoint]:
    """The client's endpoints that want ``type``, switched on or off (not being deleted), each
    held ``FOR KEY SHARE`` until the caller's transaction ends (on PostgreSQL).

    A switched-off one is among them: staff switching an endpoint off holds its deliveries
    back, it does not unsubscribe it (its events would be lost, and the order's ``sequence``
    would not even show the gap).

    The deliveries about to reference them are checked against them only at commit (Django's
    foreign keys are deferred): an endpoint deleted after this read and before that commit
    would fail the whole transaction, a saga's record with it. Held, the endpoint's row can
    only be deleted once this transaction is over (:func:`endpoint_delete` then takes the
    deliveries it left); one being deleted is waited for and passed by. It is the lock the
    foreign key check takes anyway, taken earlier: it conflicts only with a delete or a change
    of the key, not with the claim of a delivery or switching the endpoint off.
    """
    if connection.vendor != "postgresql":
        endpoints = Endpoint.objects.filter(owner_id=owner_id, deleting=False)
        return [e for e in endpoints.only("id", "events", "is_active") if type in e.events]
    qn = connection.ops.quote_name
    return list(
        Endpoint.objects.raw(
            f"SELECT {qn('id')}, {qn('is_active')} FROM {qn(Endpoint._meta.db_table)} "
            f"WHERE {qn('owner_id')} = %s AND NOT {qn('deleting')} "
            f"AND {qn('events')} @> %s::jsonb FOR KEY SHARE",
            [owner_id, json.dumps([type])],
        )
    )


def event_emit(*, owner_id: Any, subject: uuid.UUID, type: str, data: Any) -> Event | None:
    """Write an event and a delivery per subscribed endpoint, in the caller's transaction.

    Writes nothing when no endpoint of the client wants ``type``. An endpoint staff switched
    off gets its delivery all the same, held: the claim and the sweeper pass it by until it
    is switched back on (:func:`endpoint_set_active` rings it then).
    """
    assert type in EVENT_TYPES, type
    endpoints = _subscribed_endpoints(owner_id, type)
    if not endpoints:
        return None
    now = timezone.now()
    event_id = uuid.uuid4()
    sequence = _next_sequence(subject)
    body = JSONRenderer().render(
        {
            "id": str(event_id),
            "type": type,
            "created": now.isoformat().replace("+00:00", "Z"),
            "sequence": sequence,
            "data": data,
        }
    )
    event = Event.objects.create(
        id=event_id,
        owner_id=owner_id,
        type=type,
        subject=subject,
        sequence=sequence,
        body=body.decode(),
        created_at=now,
    )
    retry_until = now + timedelta(seconds=settings.WEBHOOKS_RETRY_FOR)
    Delivery.objects.bulk_create(
        Delivery(
            event=event,
            endpoint_id=endpoint.pk,
            subject=subject,
            sequence=sequence,
            next_attempt_at=now,
            retry_until=retry_until,
        )
        for endpoint in endpoints
    )
    active = [e.pk for e in endpoints if e.is_active]
    if active:
        transaction.on_commit(lambda: ring_each(active))
    return event


# ---------------------------------------------------------------------------------------------
# Staff
# ---------------------------------------------------------------------------------------------
REDELIVER_PERMISSION = "webhooks.redeliver_delivery"
_IDS_PER_STATEMENT = 10_000


def deliveries_redeliver(*, deliveries: Iterable[Delivery], user: Any) -> int:
    """Send dead deliveries again, with a fresh retry window; the rest are left alone.

    Needs ``webhooks.redeliver_delivery``; each endpoint's redelivery is an audit log entry.
    """
    if user is None or not user.is_active or not user.has_perm(REDELIVER_PERMISSION):
        raise PermissionDenied("You need the 'redeliver dead webhook deliveries' permission.")
    now = timezone.now()
    ids = [d.pk for d in deliveries if d.status == DeliveryStatus.DEAD]
    if not ids:
        return 0
    by_endpoint: dict[Any, list[int]] = {}
    changed = 0
    with transaction.atomic():
        # A chunk at a time: an endpoint down for days piles up more dead deliveries than one
        # statement may carry parameters (65,535, bound on the server).
        for start in range(0, len(ids), _IDS_PER_STATEMENT):
            chunk = ids[start : start + _IDS_PER_STATEMENT]
            dead = Delivery.objects.select_for_update().filter(
                pk__in=chunk, status=DeliveryStatus.DEAD
            )
            for delivery_id, endpoint_id in dead.values_list("id", "endpoint_id"):
                by_endpoint.setdefault(endpoint_id, []).append(delivery_id)
            changed += Delivery.objects.filter(pk__in=chunk, status=DeliveryStatus.DEAD).update(
                status=DeliveryStatus.PENDING,
                attempts=0,
                next_attempt_at=now,
                lease_until=None,
                retry_until=now + timedelta(seconds=settings.WEBHOOKS_RETRY_FOR),
            )
        for endpoint_id, delivery_ids in by_endpoint.items():
            audit_record(
                "webhook_redeliver",
                actor=user,
                target=f"webhook endpoint {endpoint_id}",
                detail={"deliveries": delivery_ids},
            )
        transaction.on_commit(lambda: ring_each(by_endpoint))
    return changed


def ring_each(endpoint_ids: Iterable[Any]) -> None:
    """Ring for each endpoint: a statement, so an on_commit hook returns nothing."""
    for endpoint_id in endpoint_ids:
        ring(endpoint_id)


def ring(endpoint_id: Any, countdown: float | None = None) -> None:
    """Ring the endpoint's doorbell (:func:`webhooks.delivery.ring`, looked up per call)."""
    delivery.ring(endpoint_id, countdown)
