"""Reads of orders.

The status mapping lives in :mod:`orders.status` (the model uses it too); its names are
re-exported here for the callers that read orders.
"""

from __future__ import annotations

from django.db.models import QuerySet

from orders.models import Order
from orders.status import (
    RESOLVED_PAST_PIVOT,
    STATUS_BY_SAGA_STATE,
    OrderState,
    OrderStatus,
    order_state,
    order_status,
    order_status_expression,
)

__all__ = [
    "RESOLVED_PAST_PIVOT",
    "STATUS_BY_SAGA_STATE",
    "OrderState",
    "OrderStatus",
    "order_list",
    "order_state",
    "order_status",
    "order_status_expression",
]


def order_list(*, user) -> QuerySet[Order]:
    """The orders a user may see: their own, or all of them for staff. Newest first."""
    qs = Order.objects.select_related("saga").prefetch_related("items")
    if user.is_staff:
        return qs
    return qs.filter(owner=user)
