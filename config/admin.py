"""What every read-only page of the ops console shares, and the guard of pages whose rows hold
secrets.

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
from django.db.models.constants import LOOKUP_SEP
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


class FilterLookupsOnly:
    """Put in front of ``admin.ModelAdmin`` for a model with a column staff must not read (a
    signing secret, a token's digest): its list takes only the lookups of its own filters.

    Django's admin filters a list by any lookup on the model's own fields that the URL names,
    shown or not: ``?secret__startswith=whsec_A`` lists the row only when the guess is right,
    which reads a hidden secret a character at a time. Here a lookup must start at a field
    path of ``list_filter`` (or a simple filter's parameter, or ``date_hierarchy``); anything
    else is refused, and the admin answers ``400`` rather than a filtered list. Search (``q``)
    is not a lookup and goes by ``search_fields`` as before.
    """

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        paths = _filter_paths(self, request)
        if not any(lookup == p or lookup.startswith(p + LOOKUP_SEP) for p in paths):
            return False
        return super().lookup_allowed(lookup, value, request)  # type: ignore[misc]


def _filter_paths(model_admin: Any, request: HttpRequest | None) -> set[str]:
    """The field paths (and simple filters' parameters) the admin's own filters query by."""
    filters = (
        model_admin.get_list_filter(request) if request is not None else model_admin.list_filter
    )
    paths = {model_admin.date_hierarchy} if model_admin.date_hierarchy else set()
    for item in filters:
        if isinstance(item, type) and issubclass(item, admin.SimpleListFilter):
            paths.add(item.parameter_name)
        elif isinstance(item, list | tuple):
            paths.add(item[0] if isinstance(item[0], str) else item[0].name)
        else:
            paths.add(item)
    return paths


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
