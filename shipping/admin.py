"""Shipments in the ops console: read-only (the carrier's answers, tombstones included)."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import Q

from config.admin import ReadOnlyAdmin, order_link, search_by_id_or_order
from shipping.models import Shipment


@admin.register(Shipment)
class ShipmentAdmin(ReadOnlyAdmin):
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

    @admin.display(description="order")
    def order(self, shipment: Shipment) -> str:
        return order_link(shipment.order_id)

    def get_search_results(self, request, queryset, search_term):
        return search_by_id_or_order(
            queryset, search_term, other=lambda term: Q(tracking_number=term) | Q(key=term)
        )
