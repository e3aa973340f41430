"""Payments in the ops console: our record per order, and the fake provider's ledger.

Read-only: money moves only through the payment services (and, for a saga that needs a
person, by hand in the provider, then noted when the saga is resolved).
"""

from __future__ import annotations

from uuid import UUID

from django.contrib import admin
from django.contrib.admin.options import ShowFacets
from django.db.models import Q
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html

from payments.models import Payment, ProviderAuthorization, ProviderOperation


def _order_link(order_id) -> str:
    if not order_id:
        return "-"
    try:
        url = reverse("admin:orders_order_change", args=[order_id])
    except NoReverseMatch:
        return str(order_id)
    return format_html('<a href="{}"><code>{}</code></a>', url, str(order_id)[:8])


class ReadOnlyAdmin(admin.ModelAdmin):
    show_full_result_count = False
    show_facets = ShowFacets.NEVER

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


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
        return _order_link(payment.order_id)

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset, False
        try:
            as_uuid = UUID(term)
        except ValueError:
            return queryset.filter(authorization_id=term), False
        return queryset.filter(Q(pk=as_uuid) | Q(order_id=as_uuid)), False


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
