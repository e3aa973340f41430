"""Stock and the reservations that hold it.

The invariants live in the database, not only in Python: ``0 <= reserved <= stock_on_hand`` is
a check constraint, so a bug or a concurrent writer that would oversell fails loudly instead of
committing. A reservation is keyed by the saga step's forward idempotency key, which makes a
repeated or raced reserve find the first one instead of holding stock twice.
"""

from __future__ import annotations

import uuid

from django.db import models
from django.db.models import F, Q


class Product(models.Model):
    sku = models.CharField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    price = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3, default="EUR")
    #: Units physically in the warehouse; falls only when a reservation is committed.
    stock_on_hand = models.IntegerField(default=0)
    #: Units promised to orders that have not been confirmed or released yet.
    reserved = models.IntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["sku"]
        constraints = [
            models.CheckConstraint(
                condition=Q(stock_on_hand__gte=0), name="inventory_product_stock_non_negative"
            ),
            models.CheckConstraint(
                condition=Q(reserved__gte=0), name="inventory_product_reserved_non_negative"
            ),
            models.CheckConstraint(
                condition=Q(reserved__lte=F("stock_on_hand")),
                name="inventory_product_reserved_within_stock",
            ),
            models.CheckConstraint(
                condition=Q(price__gte=0), name="inventory_product_price_non_negative"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.sku} ({self.name})"

    @property
    def available(self) -> int:
        return self.stock_on_hand - self.reserved


class ReservationStatus(models.TextChoices):
    HELD = "held", "held"
    RELEASED = "released", "released"
    COMMITTED = "committed", "committed"


class Reservation(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    #: The forward idempotency key of the saga step that asked for it. A release that arrives
    #: first leaves a row here too (a tombstone, status released, no lines), so a late reserve
    #: under the same key is refused instead of holding stock nobody will release.
    key = models.CharField(max_length=255)
    order_id = models.UUIDField(null=True, blank=True)
    status = models.CharField(
        max_length=16, choices=ReservationStatus.choices, default=ReservationStatus.HELD
    )
    #: True for a row written by a release that found nothing to release.
    tombstone = models.BooleanField(default=False)
    #: The key of the release or commit that settled it; kept for the audit trail.
    settled_by_key = models.CharField(max_length=255, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["key"], name="inventory_reservation_unique_key"),
        ]
        indexes = [
            models.Index(
                fields=["order_id"],
                name="inv_reservation_order_idx",
                condition=Q(order_id__isnull=False),
            ),
        ]

    def __str__(self) -> str:
        return f"reservation {self.id} ({self.status})"


class ReservationLine(models.Model):
    # Indexed by inventory_line_unique_product (reservation, product), which starts with it.
    reservation = models.ForeignKey(
        Reservation, on_delete=models.CASCADE, related_name="lines", db_index=False
    )
    product = models.ForeignKey(Product, on_delete=models.PROTECT, related_name="+")
    quantity = models.PositiveIntegerField()

    class Meta:
        ordering = ["reservation", "product__sku"]
        constraints = [
            models.UniqueConstraint(
                fields=["reservation", "product"], name="inventory_line_unique_product"
            ),
            models.CheckConstraint(
                condition=Q(quantity__gt=0), name="inventory_line_quantity_positive"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.quantity} x {self.product_id}"
