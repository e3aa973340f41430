"""Shipments in the ops console: read-only (the carrier's answers, tombstones included)."""

from __future__ import annotations

from uuid import UUID

from django.contrib import admin
from django.contrib.admin.options import ShowFacets
from django.db.models import Q
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html

from shipping.models import Shipment


def _order_link(order_id) -> str:
    if not order_id:
        return "-"
    try:
        url = reverse("admin:orders_order_change", args=[order_id])
    except NoReverseMatch:
        return str(order_id)
    return format_html('<a href="{}"><code>{}</code></a>', url, str(order_id)[:8])


@admin.register(Shipment)
class ShipmentAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "order",
        "status",
        "carrier",
        "tracking_number",
        "country",
        "tombstone",
        "created_at",
    )
    list_filter = ("status",)
    search_fields = ("id",)
    search_help_text = "Exact shipment id, order id, tracking number or saga step key."
    ordering = ("-created_at",)
    readonly_fields = ("order",)
    fields = (
        "id",
        "order",
        "key",
        "status",
        "carrier",
        "tracking_number",
        "country",
        "tombstone",
        "cancelled_by_key",
        "created_at",
        "updated_at",
    )
    show_full_result_count = False
    show_facets = ShowFacets.NEVER

    @admin.display(description="order")
    def order(self, shipment: Shipment) -> str:
        return _order_link(shipment.order_id)

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        if not term:
            return queryset, False
        try:
            as_uuid = UUID(term)
        except ValueError:
            return queryset.filter(Q(tracking_number=term) | Q(key=term)), False
        return queryset.filter(Q(pk=as_uuid) | Q(order_id=as_uuid)), False
