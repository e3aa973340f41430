"""Our side of a payment: ask the provider, then record what it says.

The provider call and the update of our ``Payment`` row are separate, short transactions, as
they would be with a real provider over the network: no row of ours stays locked while the
provider thinks. If we die in between, the retry asks the provider again with the same key, gets
the first answer back, and records it then. Our amounts are *copied* from the provider's view of
the authorization (never added to), so recording twice changes nothing.

Results are JSON-ready: amounts are strings of ``Decimal``, never floats.
"""

from __future__ import annotations

import contextlib
import uuid
from decimal import Decimal
from typing import Any

from django.db import IntegrityError, transaction

from config.db import savepoint_if_nested
from payments.errors import PaymentDeclined, PaymentStateConflict
from payments.models import AuthorizationStatus, Payment, PaymentStatus
from payments.money import from_minor, to_minor
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
    # One autocommitted INSERT (a retry finds it there: order_id is unique), instead of
    # get_or_create's SELECT, BEGIN, INSERT and COMMIT (a savepoint only inside a transaction).
    with contextlib.suppress(IntegrityError), savepoint_if_nested():
        Payment.objects.create(
            order_id=order_uuid, amount=amount, currency=currency, payment_method=payment_method
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
    recorded = _record(order_uuid, response["id"])
    return {
        "payment_id": str(recorded.id) if recorded else None,
        "authorization_id": response["id"],
        "amount": str(from_minor(response["amount_minor"], response["currency"])),
        "currency": response["currency"],
    }


@fault_point("payments.capture")
def payment_capture(*, key: str, order_id: uuid.UUID | str, authorize_key: str) -> dict[str, Any]:
    """Take the money held by the authorization made under ``authorize_key``.

    Raises :class:`PaymentDeclined` if the provider refuses (or nothing was authorized).
    """
    order_uuid = uuid.UUID(str(order_id))
    provider = get_provider()
    authorization = provider.lookup(authorize_key)
    if authorization is None or not authorization["took_effect"]:
        raise PaymentDeclined(
            "no_authorization", f"nothing was authorized under {authorize_key!r} to capture"
        )
    if authorization["reference"] != str(order_uuid):
        raise PaymentStateConflict(
            f"the authorization under {authorize_key!r} belongs to another order"
        )
    try:
        response = provider.capture(key=key, authorization_id=authorization["authorization_id"])
    except PaymentDeclined as exc:
        Payment.objects.filter(order_id=order_uuid).update(decline_code=exc.decline_code)
        raise
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


def _record(order_id: uuid.UUID, authorization_id: str) -> Payment | None:
    """Copy the provider's current view of the authorization onto our ``Payment``.

    Assigned, not incremented, and read under the row lock, so concurrent or repeated records
    all converge on what the provider says now.
    """
    with transaction.atomic():
        payment = Payment.objects.select_for_update().filter(order_id=order_id).first()
        if payment is None:
            return None  # the order's payment was never started on our side
        auth = get_provider().retrieve_authorization(authorization_id)
        currency = auth["currency"]
        payment.authorization_id = auth["id"]
        payment.capture_id = auth["capture_id"]
        payment.authorized_amount = from_minor(auth["amount_minor"], currency)
        payment.captured_amount = from_minor(auth["captured_minor"], currency)
        payment.refunded_amount = from_minor(auth["refunded_minor"], currency)
        payment.voided_amount = (
            payment.authorized_amount
            if auth["status"] == AuthorizationStatus.VOIDED
            else Decimal("0.00")
        )
        payment.status = auth["status"]
        payment.save(
            update_fields=[
                "authorization_id",
                "capture_id",
                "authorized_amount",
                "captured_amount",
                "refunded_amount",
                "voided_amount",
                "status",
                "updated_at",
            ]
        )
        return payment
