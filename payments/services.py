"""Our side of a payment: ask the provider, then record what it says.

The provider call and the update of our ``Payment`` row are separate, short transactions, as
they would be with a real provider over the network: no row of ours stays locked while the
provider thinks. If we die in between, the retry asks the provider again with the same key, gets
the first answer back, and records it then. Our amounts are *copied* from the provider's view of
the authorization (never added to), and a view never replaces a newer one, so recording twice,
or an older view late, changes nothing.

Results are JSON-ready: amounts are strings of ``Decimal``, never floats.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any, NamedTuple

from django.conf import settings
from django.db import connection
from django.db.models import F
from django.utils import timezone

from config.db import NO_FLUSH_WAIT, insert_unless_taken
from config.money import from_minor, to_minor
from payments.errors import PaymentDeclined, PaymentStateConflict
from payments.models import AuthorizationStatus, Payment, PaymentStatus
from payments.provider import FakePaymentProvider
from sagas.faults import fault_point


def get_provider() -> FakePaymentProvider:
    """The provider client; one place to swap the fake for a real gateway."""
    return FakePaymentProvider()


@fault_point("payments.authorize")
def payment_authorize(
    *,
    key: str,
    order_id: uuid.UUID | str,
    amount: Decimal,
    currency: str,
    payment_method: str,
) -> dict[str, Any]:
    """Put a hold on the order's money; raises :class:`PaymentDeclined` if the card says no.

    A repeat with the same key gets the first answer, a decline included.
    """
    order_uuid = uuid.UUID(str(order_id))
    currency = currency.upper()
    amount_minor = to_minor(amount, currency)
    # Our row exists before the provider is asked, so its answer always has a row to land in.
    # One INSERT that a retry finds taken (order_id is unique) and leaves alone, instead of
    # get_or_create's SELECT, BEGIN, INSERT and COMMIT; no error, so no savepoint either. Its
    # commit does not wait for the disk: as the order saga calls it, the engine's claim of this
    # step, or the record that went straight on into it, already waited (a step that may leave
    # the database), and a server crash that lost the row lost everything after it, the step's
    # record among them, so the step's retry inserts it again. (Cancelled in that window
    # instead, the order's void finds no row of ours to record on: the order reads as
    # cancelled before its payment began, and the provider keeps the hold and its void.)
    insert_unless_taken(
        Payment(
            order_id=order_uuid, amount=amount, currency=currency, payment_method=payment_method
        ),
        wait_flush=not settings.SAGA_ASYNC_LEASE_COMMITS,
    )
    try:
        response = get_provider().authorize(
            key=key,
            reference=str(order_uuid),
            amount_minor=amount_minor,
            currency=currency,
            payment_method=payment_method,
        )
    except PaymentDeclined as exc:
        Payment.objects.filter(order_id=order_uuid, status=PaymentStatus.PENDING).update(
            status=PaymentStatus.DECLINED, decline_code=exc.decline_code
        )
        raise
    # The answer is the authorization as it stands: recorded as is, not asked for again.
    recorded = _record_view(order_uuid, response)
    return {
        "payment_id": str(recorded.id) if recorded else None,
        "authorization_id": response["id"],
        "amount": str(from_minor(response["amount_minor"], response["currency"])),
        "currency": response["currency"],
    }


@fault_point("payments.capture")
def payment_capture(
    *,
    key: str,
    order_id: uuid.UUID | str,
    authorize_key: str,
    authorization_id: str | None = None,
) -> dict[str, Any]:
    """Take the money held by the authorization made under ``authorize_key``.

    ``authorization_id``: that authorization's id, when the caller holds the authorize's own
    answer (the order saga keeps it in the step's result); without it, the provider is asked
    what the request under ``authorize_key`` did, a call more.

    Raises :class:`PaymentDeclined` if the provider refuses (or nothing was authorized).
    """
    order_uuid = uuid.UUID(str(order_id))
    provider = get_provider()
    if authorization_id is None:
        authorization = provider.lookup(authorize_key)
        if authorization is None or not authorization["took_effect"]:
            raise PaymentDeclined(
                "no_authorization", f"nothing was authorized under {authorize_key!r} to capture"
            )
        if authorization["reference"] != str(order_uuid):
            raise PaymentStateConflict(
                f"the authorization under {authorize_key!r} belongs to another order"
            )
        authorization_id = authorization["authorization_id"]
    try:
        response = provider.capture(key=key, authorization_id=authorization_id)
    except PaymentDeclined as exc:
        Payment.objects.filter(order_id=order_uuid).update(decline_code=exc.decline_code)
        raise
    view = response.get("authorization")
    if view is not None:  # the authorization as the capture left it
        payment = _record_view(order_uuid, view)
    else:  # a capture answered before its answers carried the authorization
        payment = _record(order_uuid, response["authorization_id"])
    return {
        "payment_id": str(payment.id) if payment else None,
        "authorization_id": response["authorization_id"],
        "capture_id": response["id"],
        "amount": str(from_minor(response["amount_minor"], response["currency"])),
        "currency": response["currency"],
    }


@fault_point("payments.void")
def payment_void(*, key: str, order_id: uuid.UUID | str, forward_key: str) -> dict[str, Any]:
    """Release the hold made under ``forward_key``; succeeds if there is none (tombstone).

    Raises :class:`~payments.errors.ProviderUnavailable` (transient) while the provider fails.
    """
    response = get_provider().void(key=key, authorize_key=forward_key)
    return _undo_result(uuid.UUID(str(order_id)), response)


@fault_point("payments.refund")
def payment_refund(*, key: str, order_id: uuid.UUID | str, forward_key: str) -> dict[str, Any]:
    """Give back what the capture under ``forward_key`` took; succeeds if it took nothing.

    Raises :class:`~payments.errors.ProviderUnavailable` (transient) while the provider fails.
    """
    response = get_provider().refund(key=key, capture_key=forward_key)
    return _undo_result(uuid.UUID(str(order_id)), response)


# ---------------------------------------------------------------------------------------------
# An undo a person did at the provider (its dashboard), recorded on our side
# ---------------------------------------------------------------------------------------------
def payment_void_done_by_hand(*, order_id: uuid.UUID | str) -> dict[str, Any]:
    """Record on our ``Payment`` that a person voided the order's hold at the provider.

    The void the saga kept asking for never went through, so no answer of the provider's ever
    reached our row: it said ``authorized`` with nothing voided, and the order's client read
    its money as still held. The amount voided is the one authorized, as a provider's voided
    authorization reads; only a row still ``authorized`` changes (a hold captured, or one
    already voided or refunded, has no hold left to void), so recording it twice changes
    nothing, and a later view of the hold as still authorized (a provider that has not caught
    up) never takes it back (:data:`_PROGRESS`). Nothing is asked of the provider: the
    caller's transaction holds the saga's row locked.
    """
    return _done_by_hand(
        order_id,
        PaymentStatus.AUTHORIZED,
        status=PaymentStatus.VOIDED,
        voided_amount=F("authorized_amount"),
    )


def payment_refund_done_by_hand(*, order_id: uuid.UUID | str) -> dict[str, Any]:
    """Record on our ``Payment`` that a person refunded the order's capture at the provider:
    the amount refunded is the one captured. As :func:`payment_void_done_by_hand`, only a row
    still ``captured`` changes (nothing captured: nothing to give back)."""
    return _done_by_hand(
        order_id,
        PaymentStatus.CAPTURED,
        status=PaymentStatus.REFUNDED,
        refunded_amount=F("captured_amount"),
    )


def _done_by_hand(order_id: uuid.UUID | str, from_status: str, **values: Any) -> dict[str, Any]:
    """One conditional UPDATE: ``recorded`` is false when the row was not ``from_status`` (told
    before, or nothing of ours to change)."""
    updated = Payment.objects.filter(order_id=uuid.UUID(str(order_id)), status=from_status).update(
        **values, updated_at=timezone.now()
    )
    return {"recorded": bool(updated)}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _undo_result(order_id: uuid.UUID, response: dict[str, Any]) -> dict[str, Any]:
    payment = None
    if response.get("authorization_id"):
        payment = _record(order_id, response["authorization_id"])
    amount_minor = response.get("amount_minor", 0)
    currency = response.get("currency") or (payment.currency if payment else "")
    return {
        "payment_id": str(payment.id) if payment else None,
        "undone": response["undone"],
        "reason": response.get("reason", ""),
        "authorization_id": response.get("authorization_id"),
        "refund_id": response.get("refund_id"),
        "amount": str(from_minor(amount_minor, currency)) if currency else "0",
        "currency": currency,
    }


class Recorded(NamedTuple):
    """Our payment row, as a recording of the provider's view leaves it."""

    id: uuid.UUID
    currency: str


#: How far along an authorization is at the provider. It only moves forward: authorized, then
#: captured or voided, then (captured only) refunded; each step happens at most once.
_PROGRESS = {
    AuthorizationStatus.AUTHORIZED: 1,
    AuthorizationStatus.CAPTURED: 2,
    AuthorizationStatus.VOIDED: 2,
    AuthorizationStatus.REFUNDED: 3,
}


def _record(order_id: uuid.UUID, authorization_id: str) -> Recorded | None:
    """Copy the provider's current view of the authorization onto our ``Payment``."""
    return _record_view(order_id, get_provider().retrieve_authorization(authorization_id))


def _record_view(order_id: uuid.UUID, auth: dict[str, Any]) -> Recorded | None:
    """Write one view of the authorization onto our row, unless the row holds a newer one.

    Amounts are assigned, never incremented, and a view only replaces one that is not further
    along (:data:`_PROGRESS`), so recorders that race, repeat or arrive late all converge on
    the newest view the provider gave, without holding our row locked while the provider is
    asked: one autocommitted UPDATE after the provider's answer (``None``: the order's payment
    was never started on our side).

    On PostgreSQL, outside a caller's transaction, that commit does not wait for its WAL flush
    (``SAGA_ASYNC_LEASE_COMMITS``): the row is a copy of the provider's answer, which the
    provider keeps under the step's key. A server crash that lost it would lose everything
    after it too (the WAL is one sequence), the step's record among them, so the step runs
    again, asks again under the same key and records the same answer; and everything that
    tells anyone outside (a webhook, a terminal state, a hand-over) commits later and waits,
    flushing this with it. What an API reader could see in between is the payment's amounts
    going back to zero and forward again, as the saga's own records that go straight on can.
    Nothing here needs to wait before the provider is asked either: the engine's claim of a
    step that may leave the database, or the record that goes straight on into it, waits for
    the disk before the step runs.
    """
    currency = auth["currency"]
    authorized = from_minor(auth["amount_minor"], currency)
    status = auth["status"]
    values: dict[str, Any] = {
        "authorization_id": auth["id"],
        "capture_id": auth["capture_id"],
        "authorized_amount": authorized,
        "captured_amount": from_minor(auth["captured_minor"], currency),
        "refunded_amount": from_minor(auth["refunded_minor"], currency),
        "voided_amount": authorized if status == AuthorizationStatus.VOIDED else Decimal("0.00"),
        "status": status,
        "updated_at": timezone.now(),
    }
    table = connection.ops.quote_name(Payment._meta.db_table)
    fields = {f.name: f for f in Payment._meta.concrete_fields}
    sets = ", ".join(f"{connection.ops.quote_name(str(fields[k].column))} = %s" for k in values)
    progress = " ".join(f"WHEN %s THEN {rank}" for rank in _PROGRESS.values())
    sql = (
        f"UPDATE {table} SET {sets} WHERE order_id = %s "
        f"AND (CASE status {progress} ELSE 0 END) <= %s RETURNING id, currency"
    )
    if (
        connection.vendor == "postgresql"
        and not connection.in_atomic_block
        and settings.SAGA_ASYNC_LEASE_COMMITS
    ):
        sql = f"WITH {NO_FLUSH_WAIT}, u AS ({sql}) SELECT u.id, u.currency FROM u, nf"
    params = [fields[k].get_db_prep_save(v, connection) for k, v in values.items()]
    params.append(fields["order_id"].get_db_prep_value(order_id, connection))
    params += [*(str(s) for s in _PROGRESS), _PROGRESS[status]]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    if row is not None:
        return Recorded(fields["id"].to_python(row[0]), row[1])
    # A newer view is there already (or there is no row): leave it, say which row it is.
    found = Payment.objects.filter(order_id=order_id).values_list("id", "currency").first()
    return Recorded(*found) if found else None
