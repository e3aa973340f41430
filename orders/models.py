"""Orders: what a client asked for, priced when it was asked.

An order's progress is its saga's progress. ``status``, ``step`` and ``cancellation_reason``
are therefore *derived* from the saga row (``orders.status.order_state``), never stored a
second time: two copies of one truth drift apart exactly when a worker dies between writing
them.

The shipping address is personal data and lives only here, where it can be protected and
erased; the saga's ``data`` carries the order id, amounts and codes, and steps read the address
from this row by id.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import TYPE_CHECKING

from django.conf import settings
from django.db import models
from django.db.models import Q

from orders.status import order_state

if TYPE_CHECKING:
    from payments.models import Payment
    from shipping.models import Shipment


class Order(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    #: Orders are financial records: a user with orders is deactivated, not deleted.
    # Indexed by order_owner_created_idx (owner, -created_at), which starts with it.
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="orders", db_index=False
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

    # Not fields: the API attaches the order's payment and shipment for one response (two
    # queries for a whole page, orders.api.attach_payments_and_shipments); None otherwise.
    _payment: Payment | None = None
    _shipment: Shipment | None = None

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

    # -- derived from the saga (see orders.status); never stored twice.
    @property
    def status(self) -> str:
        return order_state(self.saga).status

    @property
    def step(self) -> str | None:
        return order_state(self.saga).step

    @property
    def cancellation_reason(self) -> str | None:
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
    separate services in spirit (none imports another), and the price that matters is the one
    captured here at order time, not the product's current one.
    """

    # Indexed by order_item_unique_sku (order, sku), which starts with it.
    order = models.ForeignKey(Order, on_delete=models.CASCADE, related_name="items", db_index=False)
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


class IdempotencyState(models.TextChoices):
    IN_FLIGHT = "in_flight", "in flight"
    DONE = "done", "done"


class IdempotencyRecord(models.Model):
    """One ``Idempotency-Key`` of ``POST /api/v1/orders/``, per user.

    Written ``in_flight`` (and committed) before the order is placed, so a second request with
    the key sees it and gets a ``409``; turned ``done`` with the response in the very
    transaction that creates the order and its saga, so a key maps to at most one order
    (guarantee 5) and a replay returns exactly the first response. Kept at least
    ``IDEMPOTENCY_KEY_TTL_HOURS``; a periodic task deletes older ones.
    """

    id = models.BigAutoField(primary_key=True)
    # Indexed by orders_idempotency_user_key (user, key), which starts with it.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.CASCADE,
        related_name="idempotency_records",
        db_index=False,
    )
    key = models.CharField(max_length=255)
    #: sha256 of the canonical JSON of the request body: the same key with another body is a
    #: client bug (``422``), not a replay.
    fingerprint = models.CharField(max_length=64)
    state = models.CharField(
        max_length=16, choices=IdempotencyState.choices, default=IdempotencyState.IN_FLIGHT
    )
    #: The attempt holding an in-flight record. A request that takes over an abandoned one (its
    #: process died before finishing) sets a new token, so the old attempt can no longer finish.
    attempt = models.UUIDField(default=uuid.uuid4)
    response_status = models.PositiveSmallIntegerField(null=True, blank=True)
    #: The rendered body of the first response, replayed byte for byte (a JSON column would
    #: reorder its keys).
    response_body = models.TextField(blank=True, default="")
    order = models.OneToOneField(
        Order, on_delete=models.SET_NULL, null=True, blank=True, related_name="idempotency_record"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    #: When the current attempt started (a takeover moves it).
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["user", "key"], name="orders_idempotency_user_key"),
            models.CheckConstraint(
                condition=Q(state="in_flight") | Q(response_status__isnull=False),
                name="orders_idempotency_done_has_response",
            ),
        ]
        indexes = [
            # The cleanup task: records past the TTL.
            models.Index(fields=["created_at"], name="orders_idempotency_created_idx"),
        ]

    def __str__(self) -> str:
        return f"idempotency key {self.key!r} of user {self.user_id} ({self.state})"
