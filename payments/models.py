"""Two sides of one payment: our record of it, and the fake provider's ledger.

``Payment`` is what this shop believes about an order's money. Its amounts are always
*assigned* from the provider's authorization (never incremented), so a repeated or replayed
call cannot count money twice.

``ProviderOperation`` and ``ProviderAuthorization`` stand in for the provider's own database
(Stripe's, in production). They live in this app only so the fake can be inspected in tests
and by the chaos checks; nothing outside :mod:`payments.provider` writes them.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

from django.db import models
from django.db.models import F, Q

ZERO = Decimal("0.00")


class PaymentStatus(models.TextChoices):
    PENDING = "pending", "pending"
    DECLINED = "declined", "declined"
    AUTHORIZED = "authorized", "authorized"
    CAPTURED = "captured", "captured"
    VOIDED = "voided", "voided"
    REFUNDED = "refunded", "refunded"


class Payment(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    order_id = models.UUIDField()
    currency = models.CharField(max_length=3)
    #: What the order asked to be paid.
    amount = models.DecimalField(max_digits=12, decimal_places=2)
    authorized_amount = models.DecimalField(max_digits=12, decimal_places=2, default=ZERO)
    captured_amount = models.DecimalField(max_digits=12, decimal_places=2, default=ZERO)
    voided_amount = models.DecimalField(max_digits=12, decimal_places=2, default=ZERO)
    refunded_amount = models.DecimalField(max_digits=12, decimal_places=2, default=ZERO)
    payment_method = models.CharField(max_length=64, blank=True, default="")
    authorization_id = models.CharField(max_length=64, blank=True, default="")
    capture_id = models.CharField(max_length=64, blank=True, default="")
    status = models.CharField(
        max_length=16, choices=PaymentStatus.choices, default=PaymentStatus.PENDING
    )
    #: The provider's decline code when the provider said no.
    decline_code = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(fields=["order_id"], name="payments_payment_unique_order"),
            models.CheckConstraint(
                condition=Q(amount__gte=0)
                & Q(authorized_amount__gte=0)
                & Q(captured_amount__gte=0)
                & Q(voided_amount__gte=0)
                & Q(refunded_amount__gte=0),
                name="payments_payment_amounts_non_negative",
            ),
            models.CheckConstraint(
                condition=Q(captured_amount__lte=F("authorized_amount"))
                & Q(refunded_amount__lte=F("captured_amount")),
                name="payments_payment_amounts_consistent",
            ),
        ]

    def __str__(self) -> str:
        return f"payment {self.id} for order {self.order_id} ({self.status})"


# ---------------------------------------------------------------------------------------------
# The fake provider's ledger
# ---------------------------------------------------------------------------------------------
class OperationKind(models.TextChoices):
    AUTHORIZE = "authorize", "authorize"
    CAPTURE = "capture", "capture"
    VOID = "void", "void"
    REFUND = "refund", "refund"


class OperationOutcome(models.TextChoices):
    SUCCEEDED = "succeeded", "succeeded"
    DECLINED = "declined", "declined"
    #: Written under a forward key by a void or refund that found nothing to undo; a late
    #: authorize or capture with that key is refused.
    TOMBSTONE = "tombstone", "tombstone"


class ProviderOperation(models.Model):
    """One idempotent request the provider has answered, replayed verbatim on a repeat key."""

    id = models.BigAutoField(primary_key=True)
    key = models.CharField(max_length=255)
    kind = models.CharField(max_length=16, choices=OperationKind.choices)
    outcome = models.CharField(max_length=16, choices=OperationOutcome.choices)
    amount_minor = models.BigIntegerField(default=0)
    currency = models.CharField(max_length=3, blank=True, default="")
    #: The merchant's reference: our order id.
    reference = models.CharField(max_length=64, blank=True, default="")
    authorization = models.ForeignKey(
        "ProviderAuthorization",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="operations",
    )
    response = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["key"], name="payments_provider_op_unique_key"),
            models.CheckConstraint(
                condition=Q(amount_minor__gte=0), name="payments_provider_op_amount_non_negative"
            ),
            # Guarantee 2: the provider records at most one capture per authorization (and
            # so per order, as there is at most one authorization per order).
            models.UniqueConstraint(
                fields=["authorization"],
                condition=Q(kind="capture", outcome="succeeded"),
                name="payments_provider_one_capture_per_authorization",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.key} ({self.outcome})"


class AuthorizationStatus(models.TextChoices):
    AUTHORIZED = "authorized", "authorized"
    CAPTURED = "captured", "captured"
    VOIDED = "voided", "voided"
    REFUNDED = "refunded", "refunded"


class ProviderAuthorization(models.Model):
    id = models.CharField(primary_key=True, max_length=64)  # "auth_<hex>"
    reference = models.CharField(max_length=64)
    currency = models.CharField(max_length=3)
    amount_minor = models.BigIntegerField()
    captured_minor = models.BigIntegerField(default=0)
    refunded_minor = models.BigIntegerField(default=0)
    status = models.CharField(
        max_length=16, choices=AuthorizationStatus.choices, default=AuthorizationStatus.AUTHORIZED
    )
    payment_method = models.CharField(max_length=64)
    capture_id = models.CharField(max_length=64, blank=True, default="")
    refund_id = models.CharField(max_length=64, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            # Guarantee 2: at most one authorization per order, whatever keys are used.
            models.UniqueConstraint(
                fields=["reference"], name="payments_provider_one_authorization_per_reference"
            ),
            models.CheckConstraint(
                condition=Q(amount_minor__gte=0)
                & Q(captured_minor__gte=0)
                & Q(captured_minor__lte=F("amount_minor"))
                & Q(refunded_minor__gte=0)
                & Q(refunded_minor__lte=F("captured_minor")),
                name="payments_provider_authorization_amounts_consistent",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"
