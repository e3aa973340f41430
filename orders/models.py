"""Orders: what a client asked for, priced when it was asked.

An order's progress is its saga's progress. ``status``, ``step`` and ``cancellation_reason``
are therefore *derived* from the saga row (``orders.selectors.order_state``), never stored a
second time: two copies of one truth drift apart exactly when a worker dies between writing
them.

The shipping address is personal data and lives only here, where it can be protected and
erased; the saga's ``data`` carries the order id, amounts and codes, and steps read the address
from this row by id.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q


class Order(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    #: Orders are financial records: a user with orders is deactivated, not deleted.
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="orders"
    )
    currency = models.CharField(max_length=3)
    #: Sum of the items' ``unit_price * quantity``, computed once at order time.
    total = models.DecimalField(max_digits=12, decimal_places=2)
    payment_method = models.CharField(max_length=64)
    shipping_name = models.CharField(max_length=200)
    shipping_line1 = models.CharField(max_length=200)
    shipping_city = models.CharField(max_length=100)
    shipping_postal_code = models.CharField(max_length=20)
    #: ISO 3166-1 alpha-2, upper case.
    shipping_country = models.CharField(max_length=2)
    #: The one source of the order's status. PROTECT: an order without its saga has no truth.
    saga = models.OneToOneField("sagas.Saga", on_delete=models.PROTECT, related_name="order")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # "My orders, newest first": the client list view.
            models.Index(fields=["owner", "-created_at"], name="order_owner_created_idx"),
            models.Index(fields=["-created_at"], name="order_created_idx"),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(total__gte=0), name="order_total_not_negative"),
        ]

    def __str__(self) -> str:
        return f"order {self.id}"

    # -- derived from the saga (see orders.selectors); never stored twice.
    @property
    def status(self) -> str:
        from orders.selectors import order_state

        return order_state(self.saga).status

    @property
    def step(self) -> str | None:
        from orders.selectors import order_state

        return order_state(self.saga).step

    @property
    def cancellation_reason(self) -> str | None:
        from orders.selectors import order_state

        return order_state(self.saga).cancellation_reason

    @property
    def shipping_address(self) -> dict[str, str]:
        """The address in the shape the API takes it in."""
        return {
            "name": self.shipping_name,
            "line1": self.shipping_line1,
            "city": self.shipping_city,
            "postal_code": self.shipping_postal_code,
            "country": self.shipping_country,
        }


class OrderItem(models.Model):
    """One line of an order.

    Holds the sku rather than a foreign key to ``inventory.Product``: the participants are
    separate services in spirit (GUIDE section 3), and the price that matters is the one
    captured here at order time, not the product's current one.
    """

    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="items")
    sku = models.CharField(max_length=64)
    quantity = models.PositiveIntegerField()
    #: The product's price when the order was placed; later price changes do not touch it.
    unit_price = models.DecimalField(max_digits=12, decimal_places=2)

    class Meta:
        ordering = ["order", "sku"]
        constraints = [
            models.UniqueConstraint(fields=["order", "sku"], name="order_item_unique_sku"),
            models.CheckConstraint(condition=Q(quantity__gte=1), name="order_item_quantity_min"),
            models.CheckConstraint(
                condition=Q(unit_price__gte=0), name="order_item_price_not_negative"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.quantity} x {self.sku}"

    @property
    def line_total(self) -> Decimal:
        return self.unit_price * self.quantity
