"""API tokens in the ops console: staff see every token (never the token itself: only its
digest is stored) and revoke any of them. Revoking is deleting, and goes to the audit log."""

from __future__ import annotations

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone
from knox.models import AuthToken

from accounts.tokens import token_label, token_revoke

admin.site.unregister(AuthToken)


@admin.register(AuthToken)
class AuthTokenAdmin(admin.ModelAdmin):
    list_display = ["label", "user", "created", "expiry", "expired"]
    list_select_related = ["user"]
    search_fields = ["=user__username"]
    ordering = ["-created"]
    fields = ("label", "user", "created", "expiry")  # a tuple: shared with readonly_fields
    readonly_fields = fields
    actions = ["revoke"]

    @admin.display(description="token")
    def label(self, obj: AuthToken) -> str:
        return f"{token_label(obj)}..."

    @admin.display(boolean=True)
    def expired(self, obj: AuthToken) -> bool:
        return obj.expiry is not None and obj.expiry < timezone.now()

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # issued by `manage.py issue_token`, shown once

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def get_actions(self, request: HttpRequest) -> dict:
        actions = super().get_actions(request)
        actions.pop("delete_selected", None)  # "revoke" does it, with an audit entry each
        return actions

    @admin.action(description="Revoke selected tokens", permissions=["delete"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[AuthToken]) -> None:
        tokens = list(queryset.select_related("user"))
        for token in tokens:
            token_revoke(token=token, actor=request.user, reason="revoked in the ops console")
        self.message_user(request, f"Revoked {len(tokens)} token(s).")

    def delete_model(self, request: HttpRequest, obj: AuthToken) -> None:
        token_revoke(token=obj, actor=request.user, reason="revoked in the ops console")

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[AuthToken]) -> None:
        self.revoke(request, queryset)
