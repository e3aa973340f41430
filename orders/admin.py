"""Orders in the ops console: what the client sees (status derived from the saga) and links.

An order is a financial record: the admin shows it and never edits it. Its saga page gets
links to the order, its payment, reservation and shipment from here (:func:`_saga_links`), so
the sagas app keeps importing no business app.
"""

from __future__ import annotations

from django.contrib import admin
from django.db.models import Q, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html

from config.admin import ReadOnlyTabularInline
from inventory.models import Reservation
from orders.models import Order, OrderItem
from orders.selectors import OrderStatus, order_state, order_status_expression
from payments.models import Payment
from sagas.admin import (
    SagaLink,
    SagaOwner,
    ScalableAdminMixin,
    admin_url,
    parse_uuid,
    register_saga_owner,
)
from sagas.models import Saga
from shipping.models import Shipment


def _saga_links(saga: Saga, order: Order) -> list[SagaLink]:
    """The order of a saga and what the participants hold for it: three indexed reads."""
    links = [SagaLink("order", f"{order.id} ({order_state(saga).status})", admin_url(order))]
    payment = Payment.objects.filter(order_id=order.id).first()
    links.append(
        SagaLink(
            "payment",
            f"{payment.status}, captured {payment.captured_amount} {payment.currency}"
            if payment
            else "none yet",
            admin_url(payment),
        )
    )
    reservations: list[Reservation | None] = [
        *Reservation.objects.filter(order_id=order.id).order_by("created_at")[:3]
    ]
    for reservation in reservations or [None]:
        links.append(
            SagaLink(
                "reservation",
                reservation.status if reservation else "none yet",
                admin_url(reservation),
            )
        )
    shipments: list[Shipment | None] = [
        *Shipment.objects.filter(order_id=order.id).order_by("created_at")[:3]
    ]
    for shipment in shipments or [None]:
        links.append(
            SagaLink(
                "shipment",
                f"{shipment.status} {shipment.tracking_number}".strip() if shipment else "none yet",
                admin_url(shipment),
            )
        )
    return links


register_saga_owner(SagaOwner(accessor="order", label="order", links=_saga_links))


class OrderStatusFilter(admin.SimpleListFilter):
    """The client-facing status, computed in SQL from the saga (never stored twice)."""

    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [(status, status.replace("_", " ")) for status in OrderStatus.ALL]

    def queryset(self, request, queryset):
        if not self.value():
            return queryset
        return queryset.alias(status=order_status_expression()).filter(status=self.value())


class OrderItemInline(ReadOnlyTabularInline):
    model = OrderItem
    fields = ("sku", "quantity", "unit_price", "line_total")
    readonly_fields = fields

    @admin.display(description="line total")
    def line_total(self, item: OrderItem) -> str:
        return str(item.line_total)


@admin.register(Order)
class OrderAdmin(ScalableAdminMixin, admin.ModelAdmin):
    list_display = (
        "order_link",
        "created_at",
        "owner",
        "status",
        "step_or_reason",
        "total_with_currency",
        "payment_method",
        "saga_link",
    )
    list_display_links = None
    list_select_related = ("saga", "owner")
    list_filter = (OrderStatusFilter,)
    date_hierarchy = None
    ordering = ("-created_at",)
    search_fields = ("id",)
    search_help_text = "Exact order id or saga id (the whole value)."
    list_per_page = 50
    inlines = (OrderItemInline,)
    fieldsets = (
        (
            "Order",
            {
                "fields": (
                    "id",
                    "owner",
                    "status",
                    "step_or_reason",
                    "total_with_currency",
                    "payment_method",
                    "saga_link",
                    "created_at",
                    "updated_at",
                )
            },
        ),
        (
            "Shipping address (personal data)",
            {
                "classes": ("collapse",),
                "fields": (
                    "shipping_name",
                    "shipping_line1",
                    "shipping_city",
                    "shipping_postal_code",
                    "shipping_country",
                ),
            },
        ),
    )
    readonly_fields = ("status", "step_or_reason", "total_with_currency", "saga_link")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Order | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Order | None = None) -> bool:
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet[Order]:
        return super().get_queryset(request).select_related("saga", "owner")

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Order], search_term: str
    ) -> tuple[QuerySet[Order], bool]:
        term = search_term.strip()
        if not term:
            return queryset, False
        as_uuid = parse_uuid(term)
        if as_uuid is None:
            return queryset.none(), False
        return queryset.filter(Q(pk=as_uuid) | Q(saga_id=as_uuid)), False

    @admin.display(description="order", ordering="created_at")
    def order_link(self, order: Order) -> str:
        url = reverse("admin:orders_order_change", args=[order.pk])
        return format_html(
            '<a href="{}" title="{}"><code>{}</code></a>', url, order.pk, str(order.pk)[:8]
        )

    @admin.display(description="status")
    def status(self, order: Order) -> str:
        return order_state(order.saga).status.replace("_", " ")

    @admin.display(description="step / cancellation reason")
    def step_or_reason(self, order: Order) -> str:
        state = order_state(order.saga)
        return state.step or state.cancellation_reason or "-"

    @admin.display(description="total")
    def total_with_currency(self, order: Order) -> str:
        return f"{order.total} {order.currency}"

    @admin.display(description="saga")
    def saga_link(self, order: Order) -> str:
        url = reverse("admin:sagas_saga_change", args=[order.saga_id])
        return format_html(
            '<a href="{}"><span class="saga-state saga-state-{}">{}</span> saga</a>',
            url,
            order.saga.state,
            order.saga.get_state_display(),
        )

    class Media:
        css = {"all": ("sagas/ops.css",)}
