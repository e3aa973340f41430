"""Reads of shipments (for checks of guarantee 4: one active shipment per confirmed order)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from django.db.models import QuerySet

from shipping.models import Shipment, ShipmentStatus


def shipment_active_for_order(*, order_id: uuid.UUID | str) -> QuerySet[Shipment]:
    return Shipment.objects.filter(order_id=order_id, status=ShipmentStatus.ARRANGED)


def shipments_by_order(*, order_ids: Iterable[uuid.UUID | str]) -> dict[Any, Shipment]:
    """The newest shipment of each of these orders, by order id: one query for any number.

    An order normally has exactly one; oldest first, so the newest wins.
    """
    shipments: dict[Any, Shipment] = {}
    for shipment in Shipment.objects.filter(order_id__in=list(order_ids)).order_by(
        "created_at", "id"
    ):
        shipments[shipment.order_id] = shipment
    return shipments
