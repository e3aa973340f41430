"""The fake carrier's shipments.

A shipment is keyed by the saga step's forward idempotency key, so a repeated arrange returns
the first shipment. A cancel that arrives before any arrange writes a cancelled row under that
key (a tombstone), and a late arrange with it is refused rather than shipping a cancelled order.
A refusal (an unserved country) is recorded too, so a repeat gets the same answer.
"""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import Q


class ShipmentStatus(models.TextChoices):
    ARRANGED = "arranged", "arranged"
    CANCELLED = "cancelled", "cancelled"
    REFUSED = "refused", "refused"


class Shipment(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    key = models.CharField(max_length=255)
    #: Empty only on a tombstone: a cancel does not know which order it was for.
    order_id = models.UUIDField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=ShipmentStatus.choices)
    carrier = models.CharField(max_length=64, blank=True, default="")
    tracking_number = models.CharField(max_length=64, blank=True, default="")
    country = models.CharField(max_length=2, blank=True, default="")
    #: True for a row written by a cancel that found nothing to cancel.
    tombstone = models.BooleanField(default=False)
    #: The key of the cancel that settled it; kept for the audit trail.
    cancelled_by_key = models.CharField(max_length=255, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["key"], name="shipping_shipment_unique_key"),
            models.UniqueConstraint(
                fields=["tracking_number"],
                condition=~Q(tracking_number=""),
                name="shipping_shipment_unique_tracking",
            ),
        ]
        indexes = [
            models.Index(
                fields=["order_id"],
                name="shipping_shipment_order_idx",
                condition=Q(order_id__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"shipment {self.id} ({self.status})"
