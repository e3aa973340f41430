"""What every read-only page of the ops console shares.

Participant rows (payments, reservations, shipments), orders and the audit log are written only
by their services; in the console staff look at them and nobody adds, edits or deletes. The
participants link each row to its order by id without importing ``orders`` (a link to a page,
not a dependency), and find rows by their own id or their order's id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID

from django.contrib import admin
from django.contrib.admin.options import ShowFacets
from django.db.models import Model, Q, QuerySet
from django.http import HttpRequest
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html


class ReadOnlyAdmin(admin.ModelAdmin):
    """A page to look at rows that only services write; no counts of the whole table."""

    show_full_result_count = False
    show_facets = ShowFacets.NEVER

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False


class ReadOnlyTabularInline(admin.TabularInline):
    """The lines of a read-only row (an order's items, a reservation's lines)."""

    extra = 0
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Model | None = None) -> bool:
        return False


def order_link(order_id: Any) -> str:
    """A link to the order's console page, by id (the id as text if orders is not installed)."""
    if not order_id:
        return "-"
    try:
        url = reverse("admin:orders_order_change", args=[order_id])
    except NoReverseMatch:
        return str(order_id)
    return format_html('<a href="{}"><code>{}</code></a>', url, str(order_id)[:8])


def search_by_id_or_order(
    queryset: QuerySet, search_term: str, *, other: Callable[[str], Q]
) -> tuple[QuerySet, bool]:
    """Exact search: a UUID matches the row's id or its order's id; anything else ``other``.

    Exact matches use the indexes; a ``LIKE`` over millions of rows would not.
    """
    term = search_term.strip()
    if not term:
        return queryset, False
    try:
        as_uuid = UUID(term)
    except ValueError:
        return queryset.filter(other(term)), False
    return queryset.filter(Q(pk=as_uuid) | Q(order_id=as_uuid)), False
