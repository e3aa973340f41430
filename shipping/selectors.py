"""Reads of shipments (for checks of guarantee 4: one active shipment per confirmed order)."""

from __future__ import annotations

import uuid

from django.db.models import QuerySet

from shipping.models import Shipment, ShipmentStatus


def shipment_active_for_order(*, order_id: uuid.UUID | str) -> QuerySet[Shipment]:
    return Shipment.objects.filter(order_id=order_id, status=ShipmentStatus.ARRANGED)
