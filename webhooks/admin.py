"""The ops console's view of webhooks: endpoints (disable, enable) and their deliveries.

Redelivering dead deliveries needs the ``webhooks.redeliver_delivery`` permission; it, and
switching an endpoint off or on, are audit log entries with the acting user.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, TypedDict

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from config.admin import FilterLookupsOnly
from webhooks.models import Delivery, DeliveryStatus, Endpoint, Event
from webhooks.services import (
    REDELIVER_PERMISSION,
    EndpointBusy,
    deliveries_redeliver,
    endpoint_delete,
    endpoint_delete_begin,
    endpoint_set_active,
)

if TYPE_CHECKING:
    from django_stubs_ext import WithAnnotations


class _DeliveryCounts(TypedDict):
    """What the changelist's queryset annotates on each endpoint."""

    _pending: int
    _dead: int


@admin.register(Endpoint)
class EndpointAdmin(FilterLookupsOnly, admin.ModelAdmin):
    """Never shows an endpoint's secrets, and takes no URL lookup on them either (a list
    filtered by ``?secret__startswith=`` would tell a right guess from a wrong one)."""

    list_display = ["url", "owner", "events", "is_active", "pending", "dead", "created_at"]
    list_filter = ["is_active"]
    search_fields = ["=id", "url", "owner__username"]
    list_select_related = ["owner"]
    # Nothing is edited in the form. is_active is switched by the actions only
    # (endpoint_set_active: audited; switched off, its events are still written and held;
    # switched on, what was held is rung at once with a fresh retry window, and its client's
    # orders in flight are marked for events).
    readonly_fields = fields = (
        "id",
        "owner",
        "url",
        "events",
        "created_at",
        "deliveries_link",
        "secrets_in_grace",
        "is_active",
        "disabled_reason",
        "deleting",
    )
    actions = ["disable", "enable", "redeliver_dead"]
    audited_actions = frozenset(actions)  # the services write the audit entries
    show_full_result_count = False

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        return (
            super()
            .get_queryset(request)
            .annotate(
                _pending=Count("deliveries", filter=Q(deliveries__status=DeliveryStatus.PENDING)),
                _dead=Count("deliveries", filter=Q(deliveries__status=DeliveryStatus.DEAD)),
            )
        )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # clients register endpoints through the API (their own secret)

    def delete_view(self, request: HttpRequest, object_id: str, extra_context=None):
        if request.method == "POST" and self.has_delete_permission(request):
            # Committed before the admin's own transaction: events written from now on pass
            # the endpoint by while endpoint_delete runs (inside that transaction).
            with contextlib.suppress(ValueError, ValidationError):  # a malformed id: a 404
                endpoint_delete_begin(object_id)
        return super().delete_view(request, object_id, extra_context)

    def delete_model(self, request: HttpRequest, obj: Endpoint) -> None:
        self._delete(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet) -> None:
        for endpoint in queryset:
            self._delete(request, endpoint)

    def _delete(self, request: HttpRequest, endpoint: Endpoint) -> None:
        try:
            endpoint_delete(endpoint=endpoint)  # also while events are being written for it
        except EndpointBusy:
            messages.error(
                request,
                f"Events kept arriving for {endpoint.url}; it is disabled, not deleted, and "
                "gets no new events. Delete it again.",
            )

    @admin.display(description="pending", ordering="_pending")
    def pending(self, endpoint: WithAnnotations[Endpoint, _DeliveryCounts]) -> int:
        return endpoint._pending

    @admin.display(description="dead", ordering="_dead")
    def dead(self, endpoint: WithAnnotations[Endpoint, _DeliveryCounts]) -> int:
        return endpoint._dead

    @admin.display(description="deliveries")
    def deliveries_link(self, endpoint: Endpoint) -> str:
        url = reverse("admin:webhooks_delivery_changelist") + f"?endpoint__id__exact={endpoint.pk}"
        return format_html('<a href="{}">deliveries of this endpoint</a>', url)

    @admin.display(description="replaced secrets still signing")
    def secrets_in_grace(self, endpoint: Endpoint) -> str:
        """When each replaced secret stops signing; never the secrets themselves."""
        grace = endpoint.secrets_in_grace(timezone.now())
        return ", ".join(f"one until {p['expires_at']}" for p in grace) or "none"

    @admin.action(description="Disable the selected endpoints (deliveries wait)")
    def disable(self, request: HttpRequest, queryset: QuerySet) -> None:
        if not self.has_change_permission(request):
            raise PermissionDenied
        for endpoint in queryset:
            endpoint_set_active(
                endpoint=endpoint,
                active=False,
                user=request.user,
                reason=f"disabled by {request.user.get_username()}",
            )
        self.message_user(request, f"Disabled {queryset.count()} endpoint(s).")

    @admin.action(description="Enable the selected endpoints")
    def enable(self, request: HttpRequest, queryset: QuerySet) -> None:
        if not self.has_change_permission(request):
            raise PermissionDenied
        for endpoint in queryset:
            endpoint_set_active(endpoint=endpoint, active=True, user=request.user)
        self.message_user(request, f"Enabled {queryset.count()} endpoint(s).")

    @admin.action(
        description="Redeliver every dead delivery of the selected endpoints",
        permissions=["redeliver"],
    )
    def redeliver_dead(self, request: HttpRequest, queryset: QuerySet) -> None:
        dead = list(Delivery.objects.filter(endpoint__in=queryset, status=DeliveryStatus.DEAD))
        _redeliver(self, request, dead)

    def has_redeliver_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(REDELIVER_PERMISSION)


def _redeliver(model_admin: admin.ModelAdmin, request: HttpRequest, dead: list[Delivery]) -> None:
    count = deliveries_redeliver(deliveries=dead, user=request.user)
    model_admin.message_user(
        request, f"{count} dead deliver{'y' if count == 1 else 'ies'} sent again.", messages.INFO
    )


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "endpoint",
        "event_type",
        "sequence",
        "status",
        "attempts",
        "last_status_code",
        "last_error",
        "next_attempt_at",
        "delivered_at",
    ]
    list_filter = ["status"]
    search_fields = ["=endpoint__id", "=subject", "=event__id"]
    list_select_related = ["endpoint", "event"]
    readonly_fields = [
        "event",
        "endpoint",
        "subject",
        "sequence",
        "status",
        "attempts",
        "next_attempt_at",
        "retry_until",
        "lease_until",
        "last_status_code",
        "last_error",
        "response_excerpt",
        "last_attempt_at",
        "delivered_at",
        "created_at",
    ]
    actions = ["redeliver"]
    audited_actions = frozenset(actions)  # deliveries_redeliver writes the audit entry
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False  # read only; redelivery is an action with its own permission

    @admin.display(description="event", ordering="event__type")
    def event_type(self, delivery: Delivery) -> str:
        return delivery.event.type

    @admin.action(description="Redeliver the selected dead deliveries", permissions=["redeliver"])
    def redeliver(self, request: HttpRequest, queryset: QuerySet) -> None:
        _redeliver(self, request, list(queryset.filter(status=DeliveryStatus.DEAD)))

    def has_redeliver_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm(REDELIVER_PERMISSION)


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):
    list_display = ["id", "type", "subject", "sequence", "owner", "created_at"]
    list_filter = ["type"]
    search_fields = ["=id", "=subject"]
    list_select_related = ["owner"]
    readonly_fields = ["id", "type", "subject", "sequence", "owner", "created_at", "body"]
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False
