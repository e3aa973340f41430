"""The webhooks' number on the ops console's index: dead deliveries."""

from __future__ import annotations

from django import template

register = template.Library()


@register.simple_tag(takes_context=True)
def webhook_overview(context):
    """Dead deliveries (bounded count) and where to see them, for staff who may view them."""
    request = context.get("request")
    if request is None or not request.user.has_perm("webhooks.view_delivery"):
        return None
    from django.urls import reverse

    from webhooks.models import Delivery, DeliveryStatus

    cap = 10_000
    dead = Delivery.objects.filter(status=DeliveryStatus.DEAD).values("id")[:cap].count()
    return {
        "dead": dead,
        "dead_more": dead >= cap,
        "dead_url": reverse("admin:webhooks_delivery_changelist") + "?status__exact=dead",
        "endpoints_url": reverse("admin:webhooks_endpoint_changelist"),
    }
