"""Payments in the ops console: our record per order, and the fake provider's ledger.

Read-only: money moves only through the payment services (and, for a saga that needs a
person, by hand in the provider, then noted when the saga is resolved).
"""

from __future__ import annotations

from django.contrib import admin
from django.db.models import Q

from config.admin import ReadOnlyAdmin, order_link, search_by_id_or_order
from payments.models import Payment, ProviderAuthorization, ProviderOperation


@admin.register(Payment)
class PaymentAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "order",
        "status",
        "amount",
        "authorized_amount",
        "captured_amount",
        "voided_amount",
        "refunded_amount",
        "currency",
        "payment_method",
        "created_at",
    )
    list_filter = ("status",)
    search_fields = ("id",)
    search_help_text = "Exact payment id, order id or provider authorization id."
    ordering = ("-created_at",)
    readonly_fields = ("order",)
    fields = (
        "id",
        "order",
        "status",
        "currency",
        "amount",
        "authorized_amount",
        "captured_amount",
        "voided_amount",
        "refunded_amount",
        "payment_method",
        "authorization_id",
        "capture_id",
        "decline_code",
        "created_at",
        "updated_at",
    )

    @admin.display(description="order")
    def order(self, payment: Payment) -> str:
        return order_link(payment.order_id)

    def get_search_results(self, request, queryset, search_term):
        return search_by_id_or_order(
            queryset, search_term, other=lambda term: Q(authorization_id=term)
        )


@admin.register(ProviderAuthorization)
class ProviderAuthorizationAdmin(ReadOnlyAdmin):
    """The fake provider's side, to compare with ours when a saga needs a person."""

    list_display = (
        "id",
        "reference",
        "status",
        "amount_minor",
        "captured_minor",
        "refunded_minor",
        "currency",
        "payment_method",
        "created_at",
    )
    list_filter = ("status",)
    search_fields = ("=id", "=reference")
    search_help_text = "Exact authorization id or reference (our order id)."
    ordering = ("-created_at",)


@admin.register(ProviderOperation)
class ProviderOperationAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "kind",
        "outcome",
        "key",
        "amount_minor",
        "currency",
        "reference",
        "created_at",
    )
    list_filter = ("kind", "outcome")
    search_fields = ("=key", "=reference")
    search_help_text = "Exact idempotency key or reference (our order id)."
    ordering = ("-id",)
