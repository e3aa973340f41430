"""The audit log in the ops console: read-only, newest first, filterable by action and channel.

Any staff member with the ``audit.view_auditentry`` permission reads it; nobody adds, changes
or deletes entries here.
"""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from audit.models import AuditEntry


@admin.register(AuditEntry)
class AuditEntryAdmin(admin.ModelAdmin):
    list_display = ["at", "actor_name", "action", "target", "ip", "source"]
    list_filter = ["action", "source"]
    search_fields = ["=actor_name", "=target"]
    list_per_page = 100
    show_full_result_count = False
    # A tuple: the admin types ``fields`` as a list or tuple of names or name groups, and a
    # list of plain names is not one (lists are invariant); a tuple is.
    readonly_fields = (
        "at",
        "actor",
        "actor_name",
        "action",
        "target",
        "detail",
        "ip",
        "source",
    )
    fields = readonly_fields

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False
