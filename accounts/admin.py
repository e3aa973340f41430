"""API tokens in the ops console: staff see every token (never the token itself: only its
digest is stored) and revoke any of them. Revoking is deleting, and goes to the audit log.

Login lockouts (django-axes' attempts) are re-registered only so that deleting one in the
console is recorded once: an active lockout as ``login.unlocked`` (:mod:`accounts.lockout`),
anything else as the console's usual ``object.deleted``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from axes.admin import AccessAttemptAdmin as AxesAccessAttemptAdmin
from axes.models import AccessAttempt
from django.contrib import admin
from django.db.models import Model, QuerySet
from django.http import HttpRequest
from django.utils import timezone
from knox.models import AuthToken

from accounts.lockout import is_active_lockout
from accounts.tokens import token_label, token_revoke
from audit.console import AuditedAdminMixin

admin.site.unregister(AuthToken)
admin.site.unregister(AccessAttempt)


@admin.register(AuthToken)
class AuthTokenAdmin(AuditedAdminMixin, admin.ModelAdmin):
    list_display = ["label", "user", "created", "expiry", "expired"]
    list_select_related = ["user"]
    search_fields = ["=user__username"]
    ordering = ["-created"]
    fields = ("label", "user", "created", "expiry")  # a tuple: shared with readonly_fields
    readonly_fields = fields
    actions = ["revoke"]
    audited_actions = frozenset(actions)  # token_revoke writes a token.revoked entry each

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

    def audit_edit(
        self, request: HttpRequest, verb: str, objects: Iterable[Model], message: Any
    ) -> None:
        if verb != "deleted":  # a deletion is a revocation: token_revoke writes its entry
            super().audit_edit(request, verb, objects, message)


@admin.register(AccessAttempt)
class AccessAttemptAdmin(AuditedAdminMixin, AxesAccessAttemptAdmin):
    def audit_edit(
        self, request: HttpRequest, verb: str, objects: Iterable[Model], message: Any
    ) -> None:
        if verb == "deleted":  # an active lockout's deletion is a login.unlocked entry
            objects = [a for a in objects if not is_active_lockout(a)]
        super().audit_edit(request, verb, objects, message)
