"""Reads of our payments and of the fake provider's ledger (for checks of guarantee 2)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from django.db.models import Count, Q

from payments.models import (
    AuthorizationStatus,
    OperationKind,
    OperationOutcome,
    Payment,
    ProviderAuthorization,
    ProviderOperation,
)


def payment_get(*, order_id: uuid.UUID | str) -> Payment | None:
    return Payment.objects.filter(order_id=order_id).first()


def payments_by_order(*, order_ids: Iterable[uuid.UUID | str]) -> dict[Any, Payment]:
    """The payment of each of these orders, by order id: one query for any number of orders."""
    return {p.order_id: p for p in Payment.objects.filter(order_id__in=list(order_ids))}


def provider_summary(*, order_id: uuid.UUID | str) -> dict[str, Any]:
    """What the provider recorded for one order: how many authorizations and captures, and
    whether a hold is still open, in the terms guarantee 2 is stated in."""
    reference = str(order_id)
    ops = ProviderOperation.objects.filter(reference=reference, outcome=OperationOutcome.SUCCEEDED)
    counts = ops.aggregate(
        authorizations=Count("id", filter=Q(kind=OperationKind.AUTHORIZE)),
        captures=Count("id", filter=Q(kind=OperationKind.CAPTURE)),
    )
    auth = ProviderAuthorization.objects.filter(reference=reference).first()
    return {
        "authorizations": counts["authorizations"],
        "captures": counts["captures"],
        "captured_minor": auth.captured_minor if auth else 0,
        "refunded_minor": auth.refunded_minor if auth else 0,
        "open_authorization": bool(auth and auth.status == AuthorizationStatus.AUTHORIZED),
        "status": str(auth.status) if auth else None,
    }
